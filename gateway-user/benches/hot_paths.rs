//! Micro-benchmarks of the hot parts: frame splitting, statement analysis
//! (cold, cached, and a new literal of a cached shape), the policy
//! decision, and masking a DataRow. Run with
//! `cargo bench -p gateway-user` (or as part of `cargo xtask bench`).

use std::path::PathBuf;

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion};

use agentgate::policy::{compile, decide, Who};
use agentgate::sql::{analyze, AnalysisCache};
use agentgate::wire::FrameSplitter;

fn frames(c: &mut Criterion) {
    // A typical result batch: RowDescription, 100 DataRows, CommandComplete.
    let mut batch = Vec::new();
    batch.extend_from_slice(
        b"T\0\0\0\x1b\0\x01id\0\0\0\0\0\0\x01\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
    );
    for _ in 0..100 {
        batch.extend_from_slice(b"D\0\0\0\x0e\0\x01\0\0\0\x041234");
    }
    batch.extend_from_slice(b"C\0\0\0\x0fSELECT 100\0");
    let splitter = FrameSplitter::new(64 << 20);
    let count = |batch: &[u8]| {
        let mut buf = BytesMut::from(batch);
        std::iter::from_fn(|| splitter.split(&mut buf).ok().flatten()).count()
    };
    assert_eq!(count(&batch), 102, "the sample batch must frame exactly");
    c.bench_function("split 102 frames", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&batch[..]);
            let mut n = 0;
            while let Ok(Some(f)) = splitter.split(&mut buf) {
                n += black_box(f).tag() as usize;
            }
            n
        })
    });
}

const SQL: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = 48213";

fn analysis(c: &mut Criterion) {
    c.bench_function("analyze cold", |b| b.iter(|| analyze(black_box(SQL))));
    let cache = AnalysisCache::new(1024);
    cache.analyze(SQL);
    c.bench_function("analyze cached", |b| {
        b.iter(|| cache.analyze(black_box(SQL)))
    });
    // pgbench -M simple sends a new number every time: the shape is cached.
    let texts: Vec<String> = (0..1000)
        .map(|i| format!("SELECT abalance FROM pgbench_accounts WHERE aid = {i}"))
        .collect();
    let mut i = 0;
    c.bench_function("analyze new literal, cached shape", |b| {
        b.iter(|| {
            i = (i + 1) % texts.len();
            cache.analyze(black_box(&texts[i]))
        })
    });
}

fn masking(c: &mut Criterion) {
    use agentgate::mask::plan::{Resolver, RowSource};
    use agentgate::mask::rewrite::{data_row, Counts};
    use agentgate::wire::rows::{self, Field};
    let text = include_str!("../../policies/corpus.yaml");
    let policy =
        compile(&[(PathBuf::from("corpus.yaml"), text.to_owned())]).expect("corpus policy");
    let set = policy.mask_set(&[0]);
    // id, name, email (masked), ssn (masked), tier: computed columns whose
    // lineage says customers.email / customers.ssn, the others scanned.
    let a = analyze("SELECT id, name, lower(email), upper(ssn), tier FROM customers");
    let rows = match &a.statements[0].output.lineage {
        Some(l) => RowSource::Known(std::sync::Arc::clone(l)),
        None => RowSource::Unknown,
    };
    let field = |name: &str, type_oid| Field {
        name: name.into(),
        table_oid: 0,
        attnum: 0,
        type_oid,
        format: 0,
    };
    let fields = [
        field("id", 23),
        field("name", 25),
        field("lower", 25),
        field("upper", 25),
        field("tier", 25),
    ];
    let plan = Resolver {
        set: &set,
        catalog: None,
    }
    .plan(&fields, &rows);
    let values: Vec<Option<&[u8]>> = vec![
        Some(b"1"),
        Some(b"Ada Lovelace"),
        Some(b"zelda.quartz7@example.org"),
        Some(b"523-81-4497"),
        Some(b"gold"),
    ];
    let row = rows::data_row(values.into_iter());
    let mut counts = Counts::new();
    c.bench_function("mask a DataRow (2 masked, 3 scanned)", |b| {
        b.iter(|| data_row(&set, &plan, black_box(row.body()), &mut counts))
    });
}

fn decision(c: &mut Criterion) {
    let text = include_str!("../../policies/corpus.yaml");
    let policy =
        compile(&[(PathBuf::from("corpus.yaml"), text.to_owned())]).expect("corpus policy");
    let who = Who {
        startup_user: "app".into(),
        database: "postgres".into(),
        ..Who::default()
    };
    let ids = policy.identities_of(&who);
    let a = analyze(SQL);
    c.bench_function("policy decision", |b| {
        b.iter(|| decide(Some(&policy), &ids, black_box(&a)))
    });
}

criterion_group!(benches, frames, analysis, decision, masking);
criterion_main!(benches);
