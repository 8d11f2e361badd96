//! pgbench through the gateway in all three protocol modes: no failed
//! transaction, and exactly one audit record per statement the database ran.

use std::process::Command;

use agentgate_tests::cluster::{Options, GW_USER, PG_BIN, SUPERUSER};
use agentgate_tests::{Cluster, Gateway};

/// Statements the server ran for the gateway's role, from its own log
/// (`log_statement = all` logs each simple statement and each Execute).
fn statements_executed_by_gateway(db: &Cluster) -> u64 {
    let log = std::fs::read_to_string(db.dir.path().join("server.log")).unwrap();
    let simple = format!("[{GW_USER}] LOG:  statement: ");
    let execute = format!("[{GW_USER}] LOG:  execute ");
    log.lines()
        .filter(|l| l.starts_with(&simple) || l.starts_with(&execute))
        .count() as u64
}

#[test]
fn pgbench_all_modes_zero_failures_and_one_record_per_statement() {
    let db = Cluster::start_with(Options {
        extra_conf: vec![
            "log_statement = 'all'".into(),
            "log_line_prefix = '[%u] '".into(),
        ],
        ..Default::default()
    });
    let init = Command::new(format!("{PG_BIN}/pgbench"))
        .args(["-i", "-q", "-s", "1", "-h"])
        .arg(db.dir.path())
        .args(["-p", &db.port.to_string(), "-U", SUPERUSER, "postgres"])
        .output()
        .unwrap();
    agentgate_tests::assert_success(&init);
    let gw = Gateway::start(&db, &[]);

    for (mode, script) in [
        ("simple", "tpcb-like"),
        ("extended", "tpcb-like"),
        ("prepared", "tpcb-like"),
        ("prepared", "select-only"),
    ] {
        let executed_before = statements_executed_by_gateway(&db);
        let before = gw
            .audit()
            .iter()
            .filter(|r| r["event"] == "statement")
            .count();
        let out = Command::new(format!("{PG_BIN}/pgbench"))
            .args([
                "-n", "-c", "8", "-j", "2", "-t", "50", "-M", mode, "-b", script,
            ])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &gw.port.to_string(),
                "-U",
                "agent_bench",
                "postgres",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "pgbench -M {mode}: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("number of failed transactions: 0 (0.000%)"),
            "{text}"
        );
        assert!(
            text.contains("number of transactions actually processed: 400/400"),
            "{text}"
        );
        let executed = statements_executed_by_gateway(&db) - executed_before;
        let per_tx = if script == "select-only" { 1 } else { 7 };
        assert!(
            executed >= 400 * per_tx,
            "{mode}: only {executed} statements ran"
        );
        let records = gw.wait_audit(before + executed as usize, |r| r["event"] == "statement");
        let new: Vec<_> = records[before..].to_vec();
        assert_eq!(
            new.len() as u64,
            executed,
            "-M {mode} {script}: audit records vs statements executed"
        );
        assert!(new.iter().all(|r| r["outcome"]["status"] == "ok"));
        // pgbench's random ids never reach the audit text: once the `$n`
        // placeholders are gone, no digit is left.
        let on_pgbench_tables = |r: &&serde_json::Value| {
            r["statement"]["protocol"] == "simple"
                && r["statement"]["objects"][0]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("public.pgbench_"))
        };
        let checked = new.iter().filter(on_pgbench_tables).count();
        if mode == "simple" {
            assert!(
                checked >= 400,
                "only {checked} simple statements on pgbench tables"
            );
        }
        for r in new.iter().filter(on_pgbench_tables) {
            let text = r["statement"]["text"].as_str().unwrap_or_default();
            assert!(
                !without_placeholders(text).contains(|c: char| c.is_ascii_digit()),
                "{text}"
            );
        }
    }
}

fn without_placeholders(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' {
            while chars.peek().is_some_and(|d| d.is_ascii_digit()) {
                chars.next();
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Each thread of `pid` with its scheduling policy (`/proc/PID/task/*/stat`
/// field 41: 0 SCHED_OTHER, 3 SCHED_BATCH, 5 SCHED_IDLE).
fn thread_policies(pid: u32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let stat = std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap();
        // The name sits in parentheses and may hold spaces; count after it.
        let (head, rest) = stat.rsplit_once(')').unwrap();
        let name = head.split_once('(').unwrap().1.to_owned();
        let policy = rest.split_whitespace().nth(38).unwrap().parse().unwrap();
        out.push((name, policy));
    }
    out
}

/// Sessions through `gw` (the upstream SCRAM login runs on a blocking-pool
/// thread, so that pool has started), then the policy of every thread.
fn policies_after_sessions(gw: &Gateway) -> Vec<(String, u32)> {
    for _ in 0..2 {
        let out = Command::new("psql")
            .args([
                "-X",
                "-A",
                "-t",
                "-d",
                &gw.dsn("agent_sched"),
                "-c",
                "select 1",
            ])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1", "{out:?}");
    }
    let threads = thread_policies(gw.pid());
    assert!(
        threads.iter().any(|(n, _)| n == "audit-writer") && threads.len() >= 3,
        "{threads:?}"
    );
    threads
}

#[test]
fn the_gateways_threads_run_under_sched_batch_unless_told_otherwise() {
    let db = Cluster::start();

    let gw = Gateway::start(&db, &[]);
    let threads = policies_after_sessions(&gw);
    assert!(threads.iter().all(|(_, p)| *p == 3), "{threads:?}");
    assert!(gw.stderr().contains("threads run under SCHED_BATCH"));

    let gw = Gateway::start(&db, &["--sched-policy", "inherit"]);
    let threads = policies_after_sessions(&gw);
    assert!(threads.iter().all(|(_, p)| *p == 0), "{threads:?}");

    // A policy an operator chose (here SCHED_IDLE by chrt) is kept.
    let gw = Gateway::start_under(&["chrt", "--idle", "0"], &db, &[]);
    let threads = policies_after_sessions(&gw);
    assert!(threads.iter().all(|(_, p)| *p == 5), "{threads:?}");
    assert!(gw.stderr().contains("SCHED_IDLE"), "{}", gw.stderr());
}
