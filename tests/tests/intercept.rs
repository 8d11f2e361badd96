//! Interception by the real probes in a real cgroup (privileged: run as
//! root; in CI they always run). Clients run as uid 65534 inside the cgroup
//! and connect to the database's own address; the gateway runs in the same
//! cgroup, as a sidecar runs in its pod, excluded by its own uid.

use std::process::Command;

use agentgate_tests::cluster::{GW_PASSWORD, GW_USER, PG_BIN};
use agentgate_tests::intercept::{privileged, TestCgroup};
use agentgate_tests::{Cluster, Gateway};

const AGENT_UID: u32 = 65534;

/// An intercepting gateway run through `wrapper` (into the cgroup, and
/// maybe a network namespace), capturing `port`.
fn start_sidecar(cg: &TestCgroup, wrapper: &[String], port: u16) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, GW_PASSWORD).unwrap();
    Gateway::start_wrapped(
        dir,
        wrapper,
        &[
            "--intercept".into(),
            "ebpf".into(),
            "--cgroup".into(),
            cg.path.display().to_string(),
            "--capture-port".into(),
            port.to_string(),
            "--upstream-user".into(),
            GW_USER.into(),
            "--upstream-password-file".into(),
            pw.display().to_string(),
        ],
    )
}

/// A cluster, a cgroup and an intercepting gateway inside it.
fn setup(name: &str) -> (Cluster, TestCgroup, Gateway) {
    let db = Cluster::start();
    let cg = TestCgroup::new(name);
    let gw = start_sidecar(&cg, &cg.wrapper(None), db.port);
    (db, cg, gw)
}

fn psql_in(cg: &TestCgroup, host: &str, port: u16, sql: &str) -> std::process::Output {
    cg.command(Some(AGENT_UID), "psql")
        .args(["-X", "-A", "-t", "-d"])
        .arg(format!(
            "host={host} port={port} user=agent dbname=postgres connect_timeout=5"
        ))
        .args(["-c", sql])
        .output()
        .unwrap()
}

fn counters() -> serde_json::Value {
    let out = Command::new(agentgate_tests::gateway::binary())
        .args(["probes", "status"])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// `probes status` of the scope whose pin directory names `name`.
fn scope_status(name: &str) -> serde_json::Value {
    counters()
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|s| s["pin_dir"].as_str().is_some_and(|p| p.contains(name)))
        })
        .cloned()
        .expect("the test cgroup's scope in probes status")
}

/// The kernel's TCP memory, in bytes (/proc/net/sockstat counts pages).
fn tcp_memory() -> u64 {
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap();
    let pages: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "mem").nth(1))
        .and_then(|n| n.parse().ok())
        .expect("TCP mem in /proc/net/sockstat");
    let page = Command::new("getconf").arg("PAGESIZE").output().unwrap();
    let page: u64 = String::from_utf8_lossy(&page.stdout)
        .trim()
        .parse()
        .unwrap();
    pages * page
}

/// Creates pgbench's tables directly, as their owner (not through the gateway).
fn pgbench_init(db: &Cluster) {
    let init = Command::new(format!("{PG_BIN}/pgbench"))
        .args(["-i", "-q", "-s", "1", "-h"])
        .arg(db.dir.path())
        .args(["-p", &db.port.to_string(), "-U", "postgres", "postgres"])
        .output()
        .unwrap();
    agentgate_tests::assert_success(&init);
}

/// Runs pgbench through `prefix` (into the cgroup, as the agent) and
/// checks it completed with no failed transaction.
fn pgbench_as_agent(prefix: &[String], host: &str, port: u16, args: &[&str]) {
    let bench = Command::new(&prefix[0])
        .args(&prefix[1..])
        .arg(format!("{PG_BIN}/pgbench"))
        .args([
            "-n",
            "-c",
            "2",
            "-h",
            host,
            "-p",
            &port.to_string(),
            "-U",
            "agent",
        ])
        .args(args)
        .arg("postgres")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&bench.stdout);
    assert!(
        bench.status.success(),
        "{}\n{text}",
        String::from_utf8_lossy(&bench.stderr)
    );
    assert!(text.contains("number of failed transactions: 0"), "{text}");
}

#[test]
fn psql_and_pgbench_reach_the_database_only_through_the_gateway() {
    if !privileged() {
        return;
    }
    let (db, cg, gw) = setup("through");
    let out = psql_in(&cg, "127.0.0.1", db.port, "SELECT current_user");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.stderr()
    );
    // The database saw the gateway's role: the agent never held credentials.
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), GW_USER);

    let recs = gw.wait_audit(1, |r| r["event"] == "statement");
    let r = &recs[0];
    assert_eq!(r["actor"]["kernel"]["uid"], AGENT_UID);
    assert_eq!(r["actor"]["kernel"]["comm"], "psql");
    assert!(r["actor"]["kernel"]["pid"].as_u64().is_some_and(|p| p > 1));
    assert!(r["actor"]["kernel"]["cgroup"]
        .as_str()
        .is_some_and(|c| c.contains("agentgate-test-through")));
    assert_eq!(
        r["target"]["original_dst"],
        format!("127.0.0.1:{}", db.port)
    );
    assert_eq!(r["target"]["addr"], format!("127.0.0.1:{}", db.port));

    // pgbench's tables are made directly by the owner; the benchmark runs
    // as the agent, through the gateway.
    pgbench_init(&db);
    pgbench_as_agent(
        &cg.wrapper(Some(AGENT_UID)),
        "127.0.0.1",
        db.port,
        &["-S", "-t", "20"],
    );
    let pgb = gw.wait_audit(40, |r| {
        r["event"] == "statement" && r["actor"]["kernel"]["comm"] == "pgbench"
    });
    assert!(pgb.iter().all(|r| r["actor"]["kernel"]["uid"] == AGENT_UID));

    // The sidecar answered getsockopt(SO_ORIGINAL_DST) from the probes, and
    // its own upstream connections were let through, not redirected.
    let scope = scope_status("agentgate-test-through");
    assert!(
        scope["counters"]["redirected"].as_u64().unwrap() >= 3,
        "{scope}"
    );
    assert!(
        scope["counters"]["lookup_hit"].as_u64().unwrap() >= 1,
        "{scope}"
    );
    assert!(
        scope["counters"]["skipped"].as_u64().unwrap() >= 1,
        "{scope}"
    );
}

#[test]
fn clients_outside_the_cgroup_go_direct_and_ipv4_mapped_ipv6_is_intercepted() {
    if !privileged() {
        return;
    }
    let (db, cg, gw) = setup("scope");
    // Outside the cgroup: direct, not audited.
    let out = Command::new("setpriv")
        .args([
            format!("--reuid={AGENT_UID}"),
            format!("--regid={AGENT_UID}"),
            "--clear-groups".into(),
        ])
        .args(["psql", "-X", "-A", "-t", "-d"])
        .arg(format!(
            "host=127.0.0.1 port={} user={GW_USER} password={GW_PASSWORD} dbname=postgres",
            db.port
        ))
        .args(["-c", "SELECT 'outside'"])
        .output()
        .unwrap();
    agentgate_tests::assert_success(&out);
    // Inside, over an AF_INET6 socket to a v4-mapped address.
    let out = psql_in(&cg, "::ffff:127.0.0.1", db.port, "SELECT 'mapped'");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.stderr()
    );
    let recs = gw.wait_audit(1, |r| r["event"] == "statement");
    assert_eq!(
        recs.len(),
        1,
        "only the client inside the cgroup is intercepted: {recs:#?}"
    );
    assert_eq!(recs[0]["actor"]["kernel"]["uid"], AGENT_UID);
}

#[test]
fn with_the_sidecar_stopped_connections_fail_and_nobody_else_binds_its_port() {
    if !privileged() {
        return;
    }
    let (db, cg, gw) = setup("closed");
    let listen = gw.port;
    let pins = cg.pin_dir();
    gw.stop();
    assert!(pins.exists(), "interception must outlive the sidecar");
    let out = psql_in(&cg, "127.0.0.1", db.port, "SELECT 1");
    assert!(
        !out.status.success(),
        "a connection got through with the sidecar down"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused"), "{err}");
    // Another process in the cgroup cannot take the sidecar's port.
    let bind = cg
        .command(Some(AGENT_UID), "/usr/bin/python3")
        .args([
            "-c",
            &format!("import socket; s = socket.socket(); s.bind(('127.0.0.1', {listen}))"),
        ])
        .output()
        .unwrap();
    assert!(!bind.status.success());
    assert!(
        String::from_utf8_lossy(&bind.stderr).contains("PermissionError"),
        "{}",
        String::from_utf8_lossy(&bind.stderr)
    );
}

#[test]
fn attach_is_idempotent_and_detach_leaves_nothing() {
    if !privileged() {
        return;
    }
    let db = Cluster::start();
    let cg = TestCgroup::new("pins");
    let port = db.port.to_string();
    let first = cg.attach(&["--capture-port", &port]);
    agentgate_tests::assert_success(&first);
    let second = cg.attach(&["--capture-port", &port]);
    agentgate_tests::assert_success(&second);
    assert!(String::from_utf8_lossy(&second.stdout).contains("already attached"));
    let pins = cg.pin_dir();
    assert!(pins.join("link_connect4").exists());
    // Attached and no sidecar: refused.
    assert!(!psql_in(&cg, "127.0.0.1", db.port, "SELECT 1")
        .status
        .success());
    let out = cg.detach();
    agentgate_tests::assert_success(&out);
    assert!(!pins.exists(), "pins left behind");
    if let Ok(out) = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&cg.path)
        .output()
    {
        assert!(
            String::from_utf8_lossy(&out.stdout).trim().is_empty()
                || !String::from_utf8_lossy(&out.stdout).contains("connect"),
            "programs still attached: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // Detached: the client reaches the database directly again.
    let out = cg
        .command(Some(AGENT_UID), "psql")
        .args(["-X", "-A", "-t", "-d"])
        .arg(format!(
            "host=127.0.0.1 port={} user={GW_USER} password={GW_PASSWORD} dbname=postgres",
            db.port
        ))
        .args(["-c", "SELECT 1"])
        .output()
        .unwrap();
    agentgate_tests::assert_success(&out);
}

/// The database lives "elsewhere" (192.0.2.10:5432 in its own network
/// namespace, shared with the pod); the agent connects to it by that
/// address, and the audit says so.
#[test]
fn a_database_elsewhere_is_reached_through_the_gateway() {
    use agentgate_tests::cluster::Options;
    use agentgate_tests::intercept::{TestNetns, ELSEWHERE};
    if !privileged() {
        return;
    }
    let ns = TestNetns::new("elsewhere");
    let db = Cluster::start_with(Options {
        netns: Some(ns.name.clone()),
        listen: Some((ELSEWHERE.into(), 5432)),
        ..Default::default()
    });
    let cg = TestCgroup::new("elsewhere");
    let gw = start_sidecar(&cg, &ns.wrap(cg.wrapper(None)), 5432);
    let client = ns.wrap(cg.wrapper(Some(AGENT_UID)));
    let out = Command::new(&client[0])
        .args(&client[1..])
        .args(["psql", "-X", "-A", "-t", "-d"])
        .arg(format!(
            "host={ELSEWHERE} port=5432 user=agent dbname=postgres connect_timeout=5"
        ))
        .args(["-c", "SELECT inet_server_addr()"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.stderr()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), ELSEWHERE);
    let recs = gw.wait_audit(1, |r| r["event"] == "statement");
    assert_eq!(
        recs[0]["target"]["original_dst"],
        format!("{ELSEWHERE}:5432")
    );
    assert_eq!(recs[0]["target"]["addr"], format!("{ELSEWHERE}:5432"));
    assert_eq!(recs[0]["actor"]["kernel"]["comm"], "psql");

    // pgbench too, every statement through the gateway to 192.0.2.10:5432.
    pgbench_init(&db);
    pgbench_as_agent(&client, ELSEWHERE, 5432, &["-t", "10"]);
    let pgb = gw.wait_audit(140, |r| {
        r["event"] == "statement" && r["actor"]["kernel"]["comm"] == "pgbench"
    });
    assert!(pgb
        .iter()
        .all(|r| r["target"]["addr"] == format!("{ELSEWHERE}:5432")
            && r["actor"]["kernel"]["uid"] == AGENT_UID
            && r["actor"]["kernel"]["pid"].as_u64().is_some()));
    drop(gw);
    drop(db);
}

#[test]
fn a_server_the_agent_chose_gets_nothing_to_guess_the_password_from() {
    // An agent connects to a server of its own: intercepted, the gateway
    // logs in there with the database's credentials. A server that asks
    // for the password in cleartext, an MD5 hash, or SCRAM with a cheap
    // iteration count is refused and learns nothing; SCRAM with
    // PostgreSQL's own count goes ahead. (drivers.rs checks that the
    // configured upstream may still ask for any of them.)
    use agentgate_tests::impostor;
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("impostor");
    for (name, server, refused_for, leaks) in [
        (
            "cleartext",
            impostor::cleartext(),
            Some("the password in cleartext"),
            GW_PASSWORD,
        ),
        ("md5", impostor::md5(), Some("an MD5 password hash"), "md5"),
        (
            "scram i=1",
            impostor::scram_with(1),
            Some("SCRAM with 1 iterations"),
            "p=",
        ),
        ("scram i=4096", impostor::scram_with(4096), None, "p="),
    ] {
        let gw = start_sidecar(&cg, &cg.wrapper(None), server.port);
        let out = psql_in(&cg, "127.0.0.1", server.port, "SELECT 1");
        assert!(!out.status.success(), "{name}: the agent got in");
        let got = String::from_utf8_lossy(&server.received()).into_owned();
        match refused_for {
            Some(what) => {
                assert!(
                    !got.contains(leaks),
                    "{name}: the agent's server got {got:?}"
                );
                assert!(
                    gw.stderr().contains(&format!("asks for {what}")),
                    "{name}: {}",
                    gw.stderr()
                );
                assert!(
                    String::from_utf8_lossy(&out.stderr)
                        .contains("refused the gateway's credentials"),
                    "{name}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            // The control: the same exchange with a sound count does send
            // a proof, so the refusals above are the gateway's choice.
            None => assert!(got.contains(leaks), "{name}: got {got:?}"),
        }
    }
}

#[test]
fn the_fast_path_holds_a_client_that_stops_reading_to_a_tcp_buffer_and_keeps_its_rows_in_order() {
    if !privileged() {
        return;
    }
    let (db, cg, gw) = setup("fastpath");
    // 300 000 rows of about 1 KB. psql writes COPY data to its stdout as it
    // arrives; the pipe's reader sleeps first, so psql soon stops reading
    // its socket while the gateway still has most of the result to send.
    let rows = 300_000;
    let script = format!(
        "psql -X -q -d 'host=127.0.0.1 port={port} user=agent dbname=postgres connect_timeout=5' \
         -c \"COPY (SELECT i, repeat('x', 1000) FROM generate_series(1, {rows}) i) TO STDOUT\" \
         | (sleep 6; awk -F '\\t' '$1 != NR {{ bad++ }} END {{ print NR, bad + 0 }}')",
        port = db.port
    );
    let before = tcp_memory();
    let client = cg
        .command(Some(AGENT_UID), "sh")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut peak = before;
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        peak = peak.max(tcp_memory());
    }
    let out = client.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.stderr()
    );
    // Every row arrived, numbered 1, 2, 3...: bytes that went back to TCP
    // were read after the ones the fast path had queued, never before.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{rows} 0")
    );
    // Unbounded, the kernel would have taken the whole 300 MB result off
    // the gateway into the stalled client's socket.
    let grew = peak.saturating_sub(before);
    assert!(
        grew < 64 << 20,
        "TCP memory grew by {} MiB while the client did not read",
        grew >> 20
    );
    let scope = scope_status("agentgate-test-fastpath");
    assert!(
        scope["counters"]["accelerated"].as_u64().unwrap() >= 2,
        "both ends of the connection took the fast path: {scope}\n{}",
        gw.stderr()
    );
    assert!(
        scope["counters"]["accel_to_tcp"].as_u64().unwrap() >= 1,
        "the stalled direction went back to TCP: {scope}"
    );
}
