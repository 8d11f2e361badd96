//! The conformance corpus (tests/corpus, copied from ../shared/corpus)
//! through the running gateway with policies/corpus.yaml: every blocking
//! case gets its verdict, over a fresh connection, in the protocol it names.

use agentgate_tests::cluster::{Options, GW_USER};
use agentgate_tests::raw::{self, RawConn};
use agentgate_tests::{Cluster, Gateway};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Case {
    id: String,
    sql: String,
    protocol: String,
    expect: String,
    rows: Option<Vec<Vec<serde_json::Value>>>,
    count: Option<usize>,
}

fn corpus(name: &str) -> Vec<Case> {
    let path = format!("{}/corpus/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml_ng::from_str(&text).unwrap()
}

/// Runs a case's SQL in its protocol; returns every message to ReadyForQuery.
fn run(c: &mut RawConn, case: &Case) -> Vec<raw::Msg> {
    match case.protocol.as_str() {
        "simple" => c.simple(&case.sql),
        "extended" | "binary" => {
            let mut m = raw::parse("", &case.sql);
            let format = (case.protocol == "binary").then_some(1);
            m.extend(raw::bind_with_results("", "", &[], format));
            m.extend(raw::describe_portal(""));
            m.extend(raw::execute("", 0));
            m.extend(raw::sync());
            c.send(&m);
            c.until_ready()
        }
        other => panic!("{}: unknown protocol {other}", case.id),
    }
}

/// A DataRow's values, as text (binary integers decoded).
fn row_values(body: &[u8], binary: bool) -> Vec<Option<Vec<u8>>> {
    let n = u16::from_be_bytes([body[0], body[1]]) as usize;
    let mut at = 2;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
        at += 4;
        if len < 0 {
            out.push(None);
            continue;
        }
        let v = &body[at..at + len as usize];
        at += len as usize;
        let _ = binary;
        out.push(Some(v.to_vec()));
    }
    out
}

fn value_matches(expected: &serde_json::Value, got: &Option<Vec<u8>>, binary: bool) -> bool {
    let Some(got) = got else {
        return expected.is_null();
    };
    match expected {
        serde_json::Value::Number(n) if binary => {
            let want = n.as_i64().unwrap_or(i64::MIN);
            match got.len() {
                2 => i64::from(i16::from_be_bytes([got[0], got[1]])) == want,
                4 => i64::from(i32::from_be_bytes([got[0], got[1], got[2], got[3]])) == want,
                8 => i64::from_be_bytes(got[..8].try_into().unwrap()) == want,
                _ => false,
            }
        }
        serde_json::Value::Number(n) => String::from_utf8_lossy(got) == n.to_string(),
        serde_json::Value::String(s) => String::from_utf8_lossy(got) == *s,
        serde_json::Value::Bool(b) => {
            let t = String::from_utf8_lossy(got);
            (t == "t" || got.as_slice() == [1]) == *b
        }
        other => String::from_utf8_lossy(got) == other.to_string(),
    }
}

/// Checks the rows a case pins (`rows`, `count`) against the DataRows received.
fn check_rows(case: &Case, msgs: &[raw::Msg], failures: &mut Vec<String>) {
    let binary = case.protocol == "binary";
    let rows: Vec<_> = msgs
        .iter()
        .filter(|(t, _)| *t == b'D')
        .map(|(_, b)| row_values(b, binary))
        .collect();
    if let Some(want) = &case.rows {
        let same = want.len() == rows.len()
            && want.iter().zip(&rows).all(|(w, g)| {
                w.len() == g.len()
                    && w.iter()
                        .zip(g)
                        .all(|(wv, gv)| value_matches(wv, gv, binary))
            });
        if !same {
            failures.push(format!(
                "{}: rows differ: want {want:?}, got {rows:?}",
                case.id
            ));
        }
    }
    if let Some(n) = case.count {
        if rows.len() != n {
            failures.push(format!("{}: want {n} rows, got {}", case.id, rows.len()));
        }
    }
}

fn errors(msgs: &[raw::Msg]) -> Vec<(String, String)> {
    msgs.iter()
        .filter(|(t, _)| *t == b'E')
        .map(|(_, b)| (raw::error_code(b), raw::error_message(b)))
        .collect()
}

#[test]
fn blocking_corpus_gives_every_verdict() {
    let db = Cluster::start_with(Options {
        extra_conf: vec!["log_statement = 'all'".into()],
        ..Default::default()
    });
    // The gateway's own role owns the tables and is a superuser: the
    // gateway is the only line of defence.
    let fixture =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/corpus/fixture.sql"))
            .unwrap();
    db.psql_as(GW_USER, &fixture);
    let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/corpus.yaml");
    let gw = Gateway::start(&db, &["--policy", policy, "--client-auth", "trust"]);
    let log_path = db.dir.path().join("server.log");

    let mut failures = Vec::new();
    for case in corpus("blocking.yaml") {
        let mut c = RawConn::connect(gw.port, "app");
        let msgs = run(&mut c, &case);
        let errs = errors(&msgs);
        match case.expect.as_str() {
            "deny" => {
                let ok = errs.len() == 1
                    && errs[0].0 == "42501"
                    && errs[0].1.starts_with("agentgate:")
                    && errs[0].1.contains("rule ");
                if !ok {
                    failures.push(format!("{}: expected deny, got {errs:?}", case.id));
                    continue;
                }
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let reached = [
                    format!("statement: {}", case.sql),
                    format!("execute <unnamed>: {}", case.sql),
                ];
                if reached.iter().any(|r| log.contains(r.as_str())) {
                    failures.push(format!(
                        "{}: the denied statement reached the database",
                        case.id
                    ));
                }
                let after = c.simple("SELECT 1");
                if !errors(&after).is_empty() || after.last().map(|m| m.1[0]) != Some(b'I') {
                    failures.push(format!(
                        "{}: the session is not usable after the denial",
                        case.id
                    ));
                }
            }
            "allow" => {
                if !errs.is_empty() {
                    failures.push(format!("{}: expected allow, got {errs:?}", case.id));
                    continue;
                }
                check_rows(&case, &msgs, &mut failures);
            }
            other => failures.push(format!("{}: unknown verdict {other}", case.id)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Every denial is audited with the rule, the policy and the mode.
    let denied = gw.wait_audit(1, |r| r["decision"]["action"] == "deny");
    for r in &denied {
        assert!(
            r["decision"]["policy"]
                .as_str()
                .unwrap()
                .starts_with("corpus@sha256:")
                || r["decision"]["policy"] == "builtin"
        );
        assert_eq!(r["decision"]["mode"], "enforce");
        assert!(r["decision"]["reason"]
            .as_str()
            .is_some_and(|s| !s.is_empty()));
    }
    let approvals = gw
        .audit()
        .into_iter()
        .filter(|r| r["decision"]["action"] == "needs_approval")
        .count();
    assert!(
        approvals >= 3,
        "unfiltered writes must be audited as needing approval"
    );
}

#[test]
fn the_blocking_corpus_holds_in_the_extended_protocol_too() {
    let db = Cluster::start();
    let fixture =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/corpus/fixture.sql"))
            .unwrap();
    db.psql_as(GW_USER, &fixture);
    let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/corpus.yaml");
    let gw = Gateway::start(&db, &["--policy", policy]);
    let mut failures = Vec::new();
    // Single-statement simple cases again as extended: the verdict must not
    // depend on the protocol.
    for mut case in corpus("blocking.yaml") {
        if case.protocol != "simple" || statement_count(&case.sql) > 1 {
            continue;
        }
        case.protocol = "extended".into();
        let mut c = RawConn::connect(gw.port, "app");
        let errs = errors(&run(&mut c, &case));
        let denied = errs
            .iter()
            .any(|(code, m)| code == "42501" && m.starts_with("agentgate:"));
        if denied != (case.expect == "deny") {
            failures.push(format!(
                "{} (extended): expected {}, got {errs:?}",
                case.id, case.expect
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// How many statements the text holds, by the gateway's own analysis.
fn statement_count(sql: &str) -> usize {
    // Cheap and sufficient for the corpus: statements are separated by ';'
    // outside quotes in these cases.
    let mut n = 1;
    let mut quote = false;
    let trimmed = sql.trim().trim_end_matches(';');
    for c in trimmed.chars() {
        match c {
            '\'' => quote = !quote,
            ';' if !quote => n += 1,
            _ => {}
        }
    }
    n
}

/// Every protected value of the fixture: the four protected columns of
/// every customer, read straight from the database.
fn protected_values(db: &Cluster) -> Vec<String> {
    let out = db.psql_as(
        GW_USER,
        "COPY (SELECT DISTINCT email, ssn, card, phone FROM customers) TO STDOUT",
    );
    out.split(['\t', '\n'])
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The bytes the client received, rebuilt message by message.
fn received(msgs: &[raw::Msg]) -> Vec<u8> {
    let mut out = Vec::new();
    for (tag, body) in msgs {
        out.push(*tag);
        out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        out.extend_from_slice(body);
    }
    out
}

#[test]
fn masking_corpus_leaks_nothing() {
    let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/corpus.yaml");
    let gw_db = check_masking(&corpus("masking.yaml"), &[], policy);
    let (gw, protected) = gw_db;
    // The audit counts what was masked and holds no protected value.
    let records = gw.wait_audit(1, |r| r["outcome"]["masked"].is_object());
    assert!(records
        .iter()
        .any(|r| r["outcome"]["masked"]["public.customers.email"].as_u64() == Some(4)));
    let audit: Vec<u8> = gw
        .audit()
        .iter()
        .flat_map(|r| r.to_string().into_bytes())
        .collect();
    assert_eq!(agentgate_tests::leak::find(&audit, &protected), None);
}

/// More cases of the same kinds: views, partitions, inheritance, cursors,
/// RETURNING, COPY formats, errors, and data copied out of a protected
/// column into another table.
#[test]
fn more_masking_cases_leak_nothing() {
    let extra = concat!(env!("CARGO_MANIFEST_DIR"), "/corpus-extra");
    let cases: Vec<Case> =
        serde_yaml_ng::from_str(&std::fs::read_to_string(format!("{extra}/masking.yaml")).unwrap())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/corpus.yaml"),
        dir.path().join("corpus.yaml"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("people.yaml"),
        "masking:\n  - name: people-email\n    columns: [public.people.email]\n",
    )
    .unwrap();
    let fixture = std::fs::read_to_string(format!("{extra}/fixture.sql")).unwrap();
    check_masking(&cases, &[&fixture], dir.path().to_str().unwrap());
}

/// Loads the fixtures, runs every case through a gateway with `policy` on
/// a fresh connection, and checks the leak rule and the expected rows.
fn check_masking(cases: &[Case], extra_fixtures: &[&str], policy: &str) -> (Gateway, Vec<String>) {
    let db = Cluster::start();
    let fixture =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/corpus/fixture.sql"))
            .unwrap();
    db.psql_as(GW_USER, &fixture);
    for f in extra_fixtures {
        db.psql_as(GW_USER, f);
    }
    let protected = protected_values(&db);
    assert_eq!(protected.len(), 16, "{protected:?}");
    let gw = Gateway::start(&db, &["--policy", policy]);

    let mut failures = Vec::new();
    for case in cases {
        let mut c = RawConn::connect(gw.port, "app");
        let msgs = run(&mut c, case);
        if let Some((value, form)) = agentgate_tests::leak::find(&received(&msgs), &protected) {
            failures.push(format!("{}: leaked {value:?} as {form:?}", case.id));
        }
        let errs = errors(&msgs);
        if case.rows.is_some() || case.count.is_some() {
            if !errs.is_empty() {
                failures.push(format!("{}: expected rows, got {errs:?}", case.id));
                continue;
            }
            check_rows(case, &msgs, &mut failures);
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}\ngateway log:\n{}",
        failures.len(),
        failures.join("\n"),
        gw.stderr()
    );
    (gw, protected)
}
