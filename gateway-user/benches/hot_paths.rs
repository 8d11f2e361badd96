//! Micro-benchmarks of the hot parts: frame splitting, statement analysis
//! (cold and cached), and the policy decision. Run with
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

criterion_group!(benches, frames, analysis, decision);
criterion_main!(benches);
