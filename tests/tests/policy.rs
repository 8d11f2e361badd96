//! Policies at run time: hot reload (applied and rejected), observe mode,
//! `agentgate policy check`, identities from verified credentials, and the
//! settings pinned at startup.

use std::process::Command;
use std::time::Duration;

use agentgate_tests::raw::{self, RawConn};
use agentgate_tests::{Cluster, Gateway};

const READ_ONLY: &str = "policy: v1\nrules:\n  - {name: reads, action: allow, kinds: [select]}\n  - {name: tables, action: allow, objects: ['*']}\n  - {name: fns, action: allow, functions: ['*']}\n";
const READ_WRITE: &str = "policy: v2\nrules:\n  - {name: reads, action: allow, kinds: [select, ddl, insert]}\n  - {name: tables, action: allow, objects: ['*']}\n  - {name: fns, action: allow, functions: ['*']}\n";

fn error_of(c: &mut RawConn, sql: &str) -> Option<(String, String)> {
    c.simple(sql)
        .iter()
        .find(|(t, _)| *t == b'E')
        .map(|(_, b)| (raw::error_code(b), raw::error_message(b)))
}

#[test]
fn reload_applies_valid_files_and_rejects_broken_ones() {
    let db = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, READ_ONLY).unwrap();
    let gw = Gateway::start(&db, &["--policy", &file.display().to_string()]);

    let mut c = RawConn::connect(gw.port, "agent");
    let (code, msg) = error_of(&mut c, "CREATE TABLE t (a int)").expect("denied under v1");
    assert_eq!(code, "42501");
    assert!(msg.contains("default-deny"), "{msg}");

    // A valid change on disk is picked up without a restart, by a session
    // that was already open.
    std::fs::write(&file, READ_WRITE).unwrap();
    gw.wait_audit(1, |r| {
        r["event"] == "policy.reload" && r["policy"]["status"] == "applied"
    });
    assert_eq!(error_of(&mut c, "CREATE TABLE t (a int)"), None);

    // A broken file is rejected, with file and line, and v2 stays in force.
    std::fs::write(
        &file,
        "policy: v3\nrules:\n  - name: oops\n    action: alow\n    kinds: [select]\n",
    )
    .unwrap();
    let rejected = gw.wait_audit(1, |r| {
        r["event"] == "policy.reload" && r["policy"]["status"] == "rejected"
    });
    let problems = rejected[0]["policy"]["problems"].to_string();
    assert!(problems.contains("policy.yaml:4"), "{problems}");
    assert_eq!(
        error_of(&mut c, "INSERT INTO t VALUES (1)"),
        None,
        "v2 must still be in force"
    );
    let after = gw.audit();
    let last = after
        .iter()
        .rev()
        .find(|r| r["event"] == "statement")
        .unwrap();
    assert!(last["decision"]["policy"]
        .as_str()
        .unwrap()
        .starts_with("v2@sha256:"));

    // SIGHUP reloads too (here: back to v1).
    std::fs::write(&file, READ_ONLY).unwrap();
    let pid = gw.pid();
    Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    let applied = agentgate_tests::wait_for(Duration::from_secs(10), || {
        let n = gw
            .audit()
            .iter()
            .filter(|r| {
                r["event"] == "policy.reload"
                    && r["policy"]["label"]
                        .as_str()
                        .is_some_and(|l| l.starts_with("v1@"))
            })
            .count();
        (n >= 1).then_some(())
    });
    assert!(applied.is_some());
    assert!(error_of(&mut c, "INSERT INTO t VALUES (2)").is_some());
}

#[test]
fn observe_mode_lets_through_and_audits_the_denial() {
    let db = Cluster::start();
    let policy = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../policies/examples/observe.yaml"
    );
    let gw = Gateway::start(&db, &["--policy", policy]);
    let mut c = RawConn::connect(gw.port, "agent");
    assert_eq!(error_of(&mut c, "CREATE TABLE observed (a int)"), None);
    let recs = gw.wait_audit(1, |r| r["statement"]["kinds"][0] == "ddl");
    assert_eq!(recs[0]["decision"]["action"], "deny");
    assert_eq!(recs[0]["decision"]["mode"], "observe");
    assert_eq!(recs[0]["decision"]["rule"], "no-ddl");
    assert_eq!(recs[0]["outcome"]["status"], "ok");
    assert_eq!(db.psql_super("SELECT count(*) FROM observed").trim(), "0");
}

#[test]
fn policy_check_lists_every_problem_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.yaml");
    std::fs::write(
        &file,
        "rules:\n  - name: a\n    action: allow\n    kinds: [selekt]\n  - name: b\n    action: deny\n    identities: [ghost]\n    functions: [x]\n",
    )
    .unwrap();
    let out = Command::new(agentgate_tests::gateway::binary())
        .args(["policy", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broken.yaml:2:") && err.contains("selekt"),
        "{err}"
    );
    assert!(
        err.contains("broken.yaml:5:") && err.contains("ghost"),
        "{err}"
    );
    let good = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/default.yaml");
    let out = Command::new(agentgate_tests::gateway::binary())
        .args(["policy", "check", good])
        .output()
        .unwrap();
    agentgate_tests::assert_success(&out);
    // A gateway refuses to start on a broken policy.
    let out = Command::new(agentgate_tests::gateway::binary())
        .args([
            "run",
            "--upstream",
            "127.0.0.1:1",
            "--upstream-user",
            "x",
            "--policy",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("selekt"));
}

#[test]
fn identities_come_from_verified_credentials_not_the_startup_user() {
    let db = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("s");
    std::fs::write(&secret, "s3cret").unwrap();
    let policy = dir.path().join("p.yaml");
    std::fs::write(
        &policy,
        "identities:\n  - {name: ops, match: {agent: ops}}\n  - {name: claims-ops, match: {startup_user: ops}}\nrules:\n  - {name: base, action: allow, kinds: [select]}\n  - {name: fns, action: allow, functions: ['*']}\n  - {name: ops-ddl, identities: [ops], action: allow, kinds: [ddl]}\n  - {name: objs, action: allow, objects: ['*']}\n",
    )
    .unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(
        &config,
        format!(
            "client_auth: password\nagents:\n  - {{name: ops, password_file: {}}}\n  - {{name: other, password_file: {}}}\n",
            secret.display(),
            secret.display()
        ),
    )
    .unwrap();
    let gw = Gateway::start(
        &db,
        &[
            "--config",
            &config.display().to_string(),
            "--policy",
            &policy.display().to_string(),
        ],
    );
    let run = |user: &str| {
        Command::new("psql")
            .args(["-X", "-d"])
            .arg(format!(
                "host=127.0.0.1 port={} user={user} dbname=postgres password=s3cret",
                gw.port
            ))
            .args(["-c", &format!("CREATE TABLE by_{user} (a int)")])
            .output()
            .unwrap()
    };
    assert!(run("ops").status.success());
    let other = run("other");
    assert!(!other.status.success());
    assert!(String::from_utf8_lossy(&other.stderr).contains("agentgate:"));
}

#[test]
fn pinned_settings_cannot_be_changed_at_startup_or_later() {
    let db = Cluster::start();
    let gw = Gateway::start(&db, &[]);
    let out = Command::new("psql")
        .args(["-X", "-d", &gw.dsn("agent"), "-c", "SELECT 1"])
        .env("PGOPTIONS", "-c standard_conforming_strings=off")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("builtin.pinned-setting"), "{err}");
    let mut c = RawConn::connect(gw.port, "agent");
    let (code, msg) = error_of(&mut c, "SET standard_conforming_strings = off").unwrap();
    assert_eq!(code, "42501");
    assert!(msg.contains("builtin.pinned-setting"));
    let (_, msg) = error_of(
        &mut c,
        "SELECT set_config('client_encoding', 'LATIN1', false)",
    )
    .unwrap();
    assert!(msg.contains("builtin.pinned-setting"));
}
