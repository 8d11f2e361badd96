//! The audit trail: schema of every line, gap-free sequence, no client
//! literal in statement text, and fail-closed when it cannot be written.

use std::process::Command;

use agentgate_tests::cluster::{GW_PASSWORD, GW_USER};
use agentgate_tests::{Cluster, Gateway};

#[test]
fn every_line_has_the_schema_fields_and_no_client_literal() {
    let db = Cluster::start();
    db.load_sample();
    let gw = Gateway::start(&db, &[]);
    let secrets = [
        "needle-7731",
        "4111111111111111",
        "ada.l@example.org",
        "900-12-3456",
    ];
    let sql = format!(
        "SELECT name FROM customers WHERE email = '{}' OR card = '{}' OR ssn = E'{}'; \
         SELECT $${}$$ AS dollar, 987654321 AS n",
        secrets[2], secrets[1], secrets[3], secrets[0]
    );
    let out = Command::new("psql")
        .args(["-X", "-d", &gw.dsn("agent_audit"), "-c", &sql])
        .output()
        .unwrap();
    agentgate_tests::assert_success(&out);
    gw.wait_audit(1, |r| r["event"] == "session.end");

    let lines = gw.audit();
    let raw = std::fs::read_to_string(gw.dir.path().join("audit.jsonl")).unwrap();
    for s in secrets.iter().chain(&["987654321"]) {
        assert!(!raw.contains(s), "literal {s} leaked into the audit");
    }
    let mut last_seq = 0;
    for r in &lines {
        assert_eq!(r["v"], 1);
        let ts = r["ts"].as_str().unwrap();
        assert_eq!(ts.len(), "2026-11-27T08:00:00.000000Z".len(), "{ts}");
        assert!(ts.ends_with('Z'));
        let seq = r["seq"].as_u64().unwrap();
        assert_eq!(seq, last_seq + 1, "seq must be gap-free");
        last_seq = seq;
        for field in ["event", "session", "actor", "source", "target"] {
            assert!(!r[field].is_null(), "{field} missing in {r}");
        }
        assert_eq!(r["target"]["user"], GW_USER);
        assert_eq!(r["actor"]["user"], "agent_audit");
    }
    let statements: Vec<_> = lines.iter().filter(|r| r["event"] == "statement").collect();
    assert_eq!(statements.len(), 2);
    for s in &statements {
        for field in ["text", "fingerprint", "kinds", "objects"] {
            assert!(
                !s["statement"][field].is_null(),
                "statement.{field} missing"
            );
        }
        for field in ["action", "rule"] {
            assert!(!s["decision"][field].is_null(), "decision.{field} missing");
        }
        for field in ["status", "rows", "duration_us"] {
            assert!(!s["outcome"][field].is_null(), "outcome.{field} missing");
        }
        assert!(s["outcome"].get("sqlstate").is_some());
    }
    assert_eq!(
        statements[0]["statement"]["objects"][0]["name"],
        "public.customers"
    );
    assert_eq!(statements[0]["outcome"]["rows"], 1);
    assert_eq!(
        lines
            .iter()
            .map(|r| r["event"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["session.start", "statement", "statement", "session.end"]
    );
}

/// A gateway with its own `--audit` flags and stdout, for the tests that
/// need what `Gateway` fixes (an audit file): its process, port, and the
/// path of its stderr log (in `dir`).
fn gateway_with_audit(
    db: &Cluster,
    dir: &std::path::Path,
    audit: &[&str],
    stdout: std::process::Stdio,
) -> (agentgate_tests::KillOnDrop, u16, std::path::PathBuf) {
    let pw = dir.join("pw");
    std::fs::write(&pw, GW_PASSWORD).unwrap();
    let port = agentgate_tests::free_port();
    let stderr = dir.join("stderr.log");
    let child = Command::new(agentgate_tests::gateway::binary())
        .args(["run", "--listen", &format!("127.0.0.1:{port}")])
        .args(audit)
        .args(["--upstream", &db.addr(), "--upstream-user", GW_USER])
        .arg("--upstream-password-file")
        .arg(&pw)
        .env("AGENTGATE_LOG", "debug")
        .stdout(stdout)
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    (agentgate_tests::KillOnDrop(child), port, stderr)
}

#[test]
fn an_unwritable_audit_trail_stops_statements() {
    let db = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    // /dev/full fails every write with ENOSPC: a full disk.
    let (mut child, port, stderr) = gateway_with_audit(
        &db,
        dir.path(),
        &["--audit", "/dev/full"],
        std::process::Stdio::null(),
    );
    assert!(agentgate_tests::cluster::wait_port(port));
    let dsn = format!("host=127.0.0.1 port={port} user=a dbname=postgres");
    let denied = agentgate_tests::wait_for(std::time::Duration::from_secs(10), || {
        let out = Command::new("psql")
            .args(["-X", "-d", &dsn, "-c", "SELECT 1"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        err.contains("builtin.audit-unavailable").then_some(err)
    });
    let _ = child.0.kill();
    let _ = child.0.wait();
    assert!(denied.is_some(), "statements still ran with no audit trail");
    let log = std::fs::read_to_string(&stderr).unwrap();
    assert!(log.contains("audit write failed"), "{log}");
}

/// A sink that stops reading (a stalled log shipper at the other end of
/// stdout) holds statements back once the buffer is full; when it reads
/// again every record comes out in order, none lost, the last ones at
/// shutdown.
#[test]
fn a_stalled_audit_pipe_holds_statements_back_and_loses_none() {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    const STATEMENTS: u64 = 3000;
    let db = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let (mut child, stdout, port, stderr) = stalled_pipe_gateway(&db, dir.path());
    let (done, client) = shipper(port, Some(STATEMENTS));

    // Nobody reads: progress must stop, and stay stopped (a merely slow
    // machine would still creep forward).
    let last = wait_stalled(&done, Duration::from_secs(3));
    assert!(
        last > 0 && last < STATEMENTS,
        "{last} of {STATEMENTS} statements ran with the audit pipe unread"
    );
    assert!(child.0.try_wait().unwrap().is_none(), "the gateway exited");
    // The operator is told why.
    let log = std::fs::read_to_string(&stderr).unwrap();
    assert!(log.contains("audit sink is not keeping up"), "{log}");

    // The shipper reads again: everything flows.
    let reader = read_gap_free(stdout);
    let err = client.join().expect("client thread");
    assert!(err.is_none(), "{err:?}");
    assert_eq!(done.load(Ordering::Relaxed), STATEMENTS);
    agentgate_tests::wait_for(Duration::from_secs(10), || {
        std::fs::read_to_string(&stderr)
            .unwrap()
            .contains("session ended")
            .then_some(())
    });
    Command::new("kill")
        .arg(child.0.id().to_string())
        .status()
        .unwrap();
    assert!(child.0.wait().unwrap().success());
    let records = reader.join().expect("reader thread");
    assert_eq!(ok_statements(&records), STATEMENTS);
    assert_eq!(
        records.last().map(|r| r["event"].clone()),
        Some("session.end".into())
    );
}

/// SIGTERM while a session waits for room in a stalled audit pipe: once the
/// pipe is read again, every statement the client saw complete is in the
/// trail, in order, the session ends for the shutdown, and the gateway
/// exits cleanly.
#[test]
fn shutdown_while_statements_wait_for_the_audit_pipe_loses_none() {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    let db = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let (mut child, stdout, port, stderr) = stalled_pipe_gateway(&db, dir.path());
    // Until the shutdown ends the session.
    let (done, client) = shipper(port, None);

    let last = wait_stalled(&done, Duration::from_secs(2));
    assert!(last > 0, "no statement ran");
    Command::new("kill")
        .arg(child.0.id().to_string())
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let reader = read_gap_free(stdout);
    let err = client
        .join()
        .expect("client thread")
        .expect("the session ends with an error");
    assert_eq!(
        sqlstate(Some(&err)).as_deref(),
        Some("57P01"),
        "the client is told the gateway shuts down: {err:?}"
    );
    let status = child.0.wait().unwrap();
    assert!(
        status.success(),
        "{status:?}: {}",
        std::fs::read_to_string(&stderr).unwrap()
    );
    let records = reader.join().expect("reader thread");
    let ok = ok_statements(&records);
    // The client counts a statement once its reply is read; the trail has
    // each of those (and at most the one whose reply was on its way).
    let seen = done.load(Ordering::Relaxed);
    assert!(
        ok == seen || ok == seen + 1,
        "{ok} audited, {seen} completed"
    );
    assert_ended_by_shutdown(&records, &["shipper"]);
    // Its end comes after all of its statements.
    assert_eq!(
        records
            .iter()
            .rev()
            .find(|r| r["actor"]["user"] == "shipper")
            .map(|r| r["event"].clone()),
        Some("session.end".into())
    );
}

/// A gateway auditing to a pipe nobody reads yet, with a small buffer: the
/// pipe (64 KiB), the writer's batch in hand and this fill up within a few
/// hundred statements.
fn stalled_pipe_gateway(
    db: &Cluster,
    dir: &std::path::Path,
) -> (
    agentgate_tests::KillOnDrop,
    std::process::ChildStdout,
    u16,
    std::path::PathBuf,
) {
    let (mut child, port, stderr) = gateway_with_audit(
        db,
        dir,
        &["--audit", "-", "--audit-buffer-bytes", "65536"],
        std::process::Stdio::piped(),
    );
    let stdout = child.0.stdout.take().unwrap();
    assert!(agentgate_tests::cluster::wait_port(port));
    (child, stdout, port, stderr)
}

/// A client sending `SELECT 1` as user shipper, `limit` times or until an
/// error, counting the replies it has read; its thread gives the error.
fn shipper(
    port: u16,
    limit: Option<u64>,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicU64>,
    std::thread::JoinHandle<Option<tokio_postgres::Error>>,
) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    let done = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&done);
    let client = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let dsn = format!("host=127.0.0.1 port={port} user=shipper dbname=postgres");
            let (client, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
                .await
                .unwrap();
            let conn = tokio::spawn(conn);
            let mut err = None;
            while limit.is_none_or(|n| counter.load(Ordering::Relaxed) < n) {
                if let Err(e) = client.simple_query("SELECT 1").await {
                    err = Some(e);
                    break;
                }
                counter.fetch_add(1, Ordering::Relaxed);
            }
            drop(client);
            let _ = conn.await;
            err
        })
    });
    (done, client)
}

/// Returns the count once it has not moved for `quiet`.
fn wait_stalled(done: &std::sync::atomic::AtomicU64, quiet: std::time::Duration) -> u64 {
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut last, mut since) = (u64::MAX, Instant::now());
    while since.elapsed() < quiet {
        assert!(Instant::now() < deadline, "the client never stalled");
        let now = done.load(std::sync::atomic::Ordering::Relaxed);
        if now != last {
            (last, since) = (now, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    last
}

/// Reads the audit pipe to its end; the records, checked gap-free.
fn read_gap_free(
    stdout: std::process::ChildStdout,
) -> std::thread::JoinHandle<Vec<serde_json::Value>> {
    use std::io::BufRead;
    std::thread::spawn(move || {
        let records: Vec<serde_json::Value> = std::io::BufReader::new(stdout)
            .lines()
            .map(|l| {
                let l = l.unwrap();
                serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}"))
            })
            .collect();
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r["seq"], i as u64 + 1, "seq must be gap-free: {r}");
        }
        records
    })
}

fn ok_statements(records: &[serde_json::Value]) -> u64 {
    records
        .iter()
        .filter(|r| r["event"] == "statement" && r["outcome"]["status"] == "ok")
        .count() as u64
}

/// SIGTERM does not abort an agent's work: a statement running and a
/// transaction still open finish within the grace (the COMMIT sent after the
/// signal commits), and only then are their sessions ended and audited.
#[test]
fn shutdown_lets_running_statements_and_open_transactions_finish() {
    use std::time::Duration;

    let db = Cluster::start();
    db.psql_super("CREATE TABLE drained (x int)");
    let mut gw = Gateway::start(&db, &["--shutdown-grace", "20"]);
    let rt = runtime();
    let (commit, sleep, ends) = rt.block_on(async {
        let (writer, writer_conn) = connect(&gw, "agent_writer").await;
        writer
            .batch_execute("BEGIN; INSERT INTO drained VALUES (1)")
            .await
            .unwrap();
        let (sleeper, sleeper_conn) = connect(&gw, "agent_sleeping").await;
        let sleeping = start_sleep(&db, sleeper, 3);
        sigterm(&gw);
        // Sent after the signal: the open transaction still gets to commit.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let commit = writer.batch_execute("COMMIT").await;
        // The client stays open until its session's end is seen: dropped,
        // it would close the connection itself, racing the gateway's FATAL.
        let (sleep, _sleeper) = within_20s(sleeping, "the running statement never returned").await;
        let mut ends = Vec::new();
        for conn in [writer_conn, sleeper_conn] {
            let end = within_20s(conn, "the session was not ended after its work was done").await;
            ends.push(sqlstate(end.err().as_ref()));
        }
        (commit, sleep, ends)
    });
    assert!(commit.is_ok(), "COMMIT after SIGTERM: {commit:?}");
    assert!(sleep.is_ok(), "the running statement was cut: {sleep:?}");
    assert_eq!(
        ends,
        [Some("57P01".to_owned()), Some("57P01".to_owned())],
        "once done, each session is told the gateway shuts down"
    );
    assert_eq!(db.psql_super("SELECT count(*) FROM drained").trim(), "1");
    let status = gw.wait();
    assert!(status.success(), "{status:?}");

    let lines = gw.audit();
    assert_ended_by_shutdown(&lines, &["agent_writer", "agent_sleeping"]);
    let statuses = |user: &str| -> Vec<String> {
        lines
            .iter()
            .filter(|r| r["event"] == "statement" && r["actor"]["user"] == user)
            .map(|r| r["outcome"]["status"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    assert_eq!(statuses("agent_writer"), ["ok", "ok", "ok"], "{lines:#?}");
    assert_eq!(statuses("agent_sleeping"), ["ok"], "{lines:#?}");
}

/// SIGTERM (every pod rollout) ends the open sessions through the gateway:
/// each client is told why, a statement still running when the grace runs
/// out is audited with an unknown outcome, and every session's end is in the
/// trail before exit.
#[test]
fn shutdown_audits_the_end_of_every_open_session() {
    let db = Cluster::start();
    let mut gw = Gateway::start(&db, &["--shutdown-grace", "1"]);
    let rt = runtime();
    let (idle_err, sleeping_err) = rt.block_on(async {
        let (idle, idle_conn) = connect(&gw, "agent_idle").await;
        idle.simple_query("SELECT 1").await.unwrap();
        let (sleeper, sleeper_conn) = connect(&gw, "agent_sleeping").await;
        let sleeping = start_sleep(&db, sleeper, 60);
        sigterm(&gw);
        let (sleeping, _sleeper) =
            within_20s(sleeping, "the running statement was not ended").await;
        let sleeping_err = sleeping.expect_err("pg_sleep cannot finish");
        let idle_err = within_20s(idle_conn, "the idle session was not ended")
            .await
            .expect_err("the idle session ends with an error");
        let _ = sleeper_conn.await;
        (idle_err, sleeping_err)
    });
    for e in [&idle_err, &sleeping_err] {
        assert_eq!(
            sqlstate(Some(e)).as_deref(),
            Some("57P01"),
            "clients are told the gateway shuts down: {e:?}"
        );
    }
    let status = gw.wait();
    assert!(status.success(), "{status:?}");

    let lines = gw.audit();
    assert_ended_by_shutdown(&lines, &["agent_idle", "agent_sleeping"]);
    let sleep = lines
        .iter()
        .find(|r| r["event"] == "statement" && r["actor"]["user"] == "agent_sleeping")
        .expect("the running statement is audited");
    assert_eq!(sleep["outcome"]["status"], "unknown");
}

// Worker threads drive the connections while the test thread blocks on psql.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

type Connection = tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>;

async fn connect(gw: &Gateway, user: &str) -> (tokio_postgres::Client, Connection) {
    let (client, conn) = tokio_postgres::connect(&gw.dsn(user), tokio_postgres::NoTls)
        .await
        .unwrap();
    (client, tokio::spawn(conn))
}

type Sleeping = tokio::task::JoinHandle<(
    Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error>,
    tokio_postgres::Client,
)>;

/// Runs `SELECT pg_sleep(secs)` and returns once the server is running it;
/// the task gives back the result and the client.
fn start_sleep(db: &Cluster, client: tokio_postgres::Client, secs: u32) -> Sleeping {
    let sql = format!("SELECT pg_sleep({secs})");
    let running = format!("SELECT count(*) FROM pg_stat_activity WHERE query = '{sql}'");
    let sleeping = tokio::spawn(async move { (client.simple_query(&sql).await, client) });
    let started = agentgate_tests::wait_for(std::time::Duration::from_secs(20), || {
        db.psql_super(&running).trim().eq("1").then_some(())
    });
    assert!(started.is_some(), "pg_sleep never started");
    sleeping
}

fn sigterm(gw: &Gateway) {
    Command::new("kill")
        .arg(gw.pid().to_string())
        .status()
        .unwrap();
}

async fn within_20s<T>(task: tokio::task::JoinHandle<T>, what: &str) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(20), task)
        .await
        .expect(what)
        .unwrap()
}

fn sqlstate(e: Option<&tokio_postgres::Error>) -> Option<String> {
    e.and_then(|e| e.as_db_error().map(|d| d.code().code().to_owned()))
}

/// Each user's session ended once, for the shutdown.
fn assert_ended_by_shutdown(lines: &[serde_json::Value], users: &[&str]) {
    for user in users {
        let ends: Vec<_> = lines
            .iter()
            .filter(|r| r["event"] == "session.end" && r["actor"]["user"] == *user)
            .collect();
        assert_eq!(ends.len(), 1, "{user}: {lines:#?}");
        assert_eq!(ends[0]["reason"], "gateway shutting down");
    }
}
