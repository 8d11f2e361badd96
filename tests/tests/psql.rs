//! psql through the gateway: queries, meta-commands, \copy, denial and
//! recovery, and the audit trail it leaves.

use std::process::Command;

use agentgate_tests::{Cluster, Gateway};

fn psql(gw: &Gateway, args: &[&str]) -> std::process::Output {
    Command::new("psql")
        .args(["-X", "-A", "-t", "-d", &gw.dsn("agent_psql")])
        .args(args)
        .output()
        .expect("run psql")
}

fn stdout(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn psql_queries_meta_commands_and_copy() {
    let db = Cluster::start();
    db.load_sample();
    let gw = Gateway::start(&db, &[]);

    let out = stdout(&psql(
        &gw,
        &["-c", "SELECT name FROM customers WHERE id = 3"],
    ));
    assert_eq!(out.trim(), "Grace Hopper");

    // Several statements in one Query message.
    let out = stdout(&psql(&gw, &["-c", "SELECT 1; SELECT 'two'; SELECT 3"]));
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["1", "two", "3"]
    );

    // \d runs psql's catalog queries.
    let out = stdout(&psql(&gw, &["-c", "\\d customers"]));
    assert!(out.contains("email"), "{out}");

    // \copy out and back in.
    let file = gw.dir.path().join("orders.csv");
    let f = file.display().to_string();
    stdout(&psql(&gw, &["-c", &format!("\\copy orders TO '{f}' CSV")]));
    let csv = std::fs::read_to_string(&file).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    stdout(&psql(
        &gw,
        &["-c", "CREATE TABLE orders_copy (LIKE orders)"],
    ));
    stdout(&psql(
        &gw,
        &["-c", &format!("\\copy orders_copy FROM '{f}' CSV")],
    ));
    let n = db.psql_super("SELECT count(*) FROM orders_copy");
    assert_eq!(n.trim(), "4");

    // The session that ran the copy left statement records with outcomes.
    let copies = gw.wait_audit(2, |r| {
        r["event"] == "statement"
            && r["statement"]["kinds"][0]
                .as_str()
                .is_some_and(|k| k.starts_with("copy"))
    });
    assert!(copies.iter().all(|r| r["outcome"]["status"] == "ok"));
    assert!(copies.iter().any(|r| r["outcome"]["rows"] == 4));
}

#[test]
fn unparseable_statement_is_denied_and_the_session_goes_on() {
    let db = Cluster::start();
    let gw = Gateway::start(&db, &[]);
    let out = psql(
        &gw,
        &[
            "-v",
            "ON_ERROR_STOP=0",
            "-c",
            "SELEC 'secret-literal'",
            "-c",
            "SELECT 41 + 1",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("agentgate:"), "{err}");
    assert!(err.contains("builtin.unparseable"), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    let denied = gw.wait_audit(1, |r| r["decision"]["action"] == "deny");
    assert_eq!(denied[0]["outcome"]["sqlstate"], "42501");
    assert!(denied[0]["statement"]["text"].is_null());
    // The database never saw the client's text.
    let log = std::fs::read_to_string(db.dir.path().join("server.log")).unwrap_or_default();
    assert!(!log.contains("secret-literal"), "{log}");
}
