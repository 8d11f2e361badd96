//! `cargo xtask bench`: what agentgate costs, beside a direct connection and
//! pgbouncer, measured side by side in one run.
//!
//! Configurations are interleaved (A B C D A B C D ...) within each workload
//! so that drift on a noisy machine hits all alike, and each run starts
//! after the page cache's dirty data is written out, so that no run pays for
//! an earlier one's audit trail. For each run: TPS (or
//! rows/s), mean and p99 latency, the ratio to direct in the same round, and
//! the CPU seconds the proxy itself used per 1000 transactions (from
//! /proc/PID/stat), which is the figure that travels to other machines.
//!
//! Run as root, the gateways that pgbench measures are deployed as a
//! sidecar is: each runs in a cgroup of its own with its probes attached,
//! and pgbench runs in that cgroup as another uid, connecting to the
//! database's own address, so the probes bring it to the gateway (with the
//! fast path between them). Without root they listen for pgbench directly.
//! The bulk SELECT and COPY and the idle connections reach each gateway's
//! listener directly either way.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use agentgate_tests::cluster::{wait_port, Options, GW_PASSWORD, GW_USER, PG_BIN, SUPERUSER};
use agentgate_tests::intercept::TestCgroup;
use agentgate_tests::Cluster;

use crate::{cargo, exec, root};

mod audit_trail;
mod interrupt;
mod targets;

use audit_trail::{Appended, Trail};

// Configuration and workload names: the tables, the JSON and the targets
// all match on them.
const DIRECT: &str = "direct";
const PGBOUNCER: &str = "pgbouncer";
const AGENTGATE: &str = "agentgate";
const AGENTGATE_DEFAULT: &str = "agentgate+default";
const AGENTGATE_MASKED: &str = "agentgate+2 masked";
/// Select-only with 8 clients, by protocol mode.
const SELECT_8: [(&str, &str); 3] = [
    ("simple", "select-only simple, 8 clients"),
    ("extended", "select-only extended, 8 clients"),
    ("prepared", "select-only prepared, 8 clients"),
];
const TPCB: &str = "tpcb-like, 8 clients";
const ONE_CLIENT: &str = "select-only prepared, 1 client";
const BULK_SELECT: &str = "1M-row SELECT";
const BULK_COPY: &str = "1M-row COPY TO STDOUT";

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Seconds per pgbench run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Rounds of every configuration (interleaved).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Rows of the bulk SELECT / COPY table.
    #[arg(long, default_value_t = 1_000_000)]
    bulk_rows: u64,
    /// pgbench scale.
    #[arg(long, default_value_t = 10)]
    scale: u32,
    /// Idle client connections for the memory figure.
    #[arg(long, default_value_t = 1000)]
    idle: usize,
    /// Run only the workloads whose name contains this text (for profiling).
    #[arg(long)]
    only: Option<String>,
}

/// One proxy (or none) between pgbench and the database.
struct Config<'a> {
    name: &'static str,
    /// Where clients connect to reach it directly.
    port: u16,
    /// The process whose CPU and memory are measured.
    pid: Option<u32>,
    /// For a gateway deployed as a sidecar: the agent's cgroup, where
    /// pgbench runs and connects to the database's own port.
    agent: Option<&'a TestCgroup>,
}

/// The uid pgbench runs as inside an agent's cgroup: not the gateway's, so
/// the probes redirect it.
const AGENT_UID: u32 = 65534;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes out the dirty pages earlier runs left (a gateway writes ~40 MB of
/// audit a second under load) before the next run starts. Left to the
/// kernel's flusher, that write-back lands on whichever run comes 5-30 s
/// later: measured, the fourth configuration of a round lost ~10% TPS
/// whichever gateway it was, and the loss went away with this. Also where
/// an interrupted bench stops, between runs.
fn settle() -> Result<()> {
    interrupt::check()?;
    let status = Command::new("sync").status().context("run sync")?;
    if !status.success() {
        bail!("sync failed with {status}");
    }
    Ok(())
}

/// Clock ticks of user + system CPU a process has used: in all, and in its
/// audit threads (the gateway's writer and its page-cache advice; none in
/// other processes). The split shows what writing the audit trail costs
/// beside relaying.
#[derive(Debug, Clone, Copy)]
struct CpuTicks {
    total: u64,
    audit: Option<u64>,
}

/// How the gateway names the threads that write the audit trail.
const AUDIT_THREADS: &str = "audit-";

fn cpu_ticks(pid: u32) -> CpuTicks {
    let total = stat_ticks(&format!("/proc/{pid}/stat"));
    let audit: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|t| t.path())
        .filter(|t| {
            std::fs::read_to_string(t.join("comm")).is_ok_and(|c| c.starts_with(AUDIT_THREADS))
        })
        .map(|t| stat_ticks(&t.join("stat").to_string_lossy()))
        .collect();
    CpuTicks {
        total,
        audit: (!audit.is_empty()).then(|| audit.iter().sum()),
    }
}

/// utime + stime from a process's or a thread's `stat` file (0 when gone).
fn stat_ticks(path: &str) -> u64 {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0;
    };
    // Fields after the command name (which may hold spaces) in parentheses.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after ')'.
    n(11) + n(12)
}

/// CPU seconds per 1000 units (transactions or rows) since `before`: the
/// process's, and its audit threads'.
fn cpu_per_1000(pid: u32, before: CpuTicks, units: u64) -> (f64, Option<f64>) {
    let after = cpu_ticks(pid);
    let per = |ticks: u64| ticks as f64 / TICKS_PER_SECOND / (units as f64 / 1000.0);
    let audit = after
        .audit
        .zip(before.audit)
        .map(|(a, b)| per(a.saturating_sub(b)));
    (per(after.total.saturating_sub(before.total)), audit)
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug, Clone, serde::Serialize)]
struct Run {
    workload: String,
    config: String,
    round: usize,
    /// Transactions (or rows) per second.
    rate: f64,
    mean_latency_ms: Option<f64>,
    p99_latency_ms: Option<f64>,
    /// CPU seconds of the proxy per 1000 transactions (or 1000 rows).
    proxy_cpu_per_1000: Option<f64>,
    /// The part of it the gateway's audit threads used.
    audit_cpu_per_1000: Option<f64>,
    ratio_to_direct: Option<f64>,
    failed: u64,
    /// Statements in the transactions pgbench completed.
    statements_completed: Option<u64>,
    /// What a gateway's audit trail shows for the run.
    audit: Option<Appended>,
}

struct Pgbench<'a> {
    name: &'static str,
    args: &'a [&'a str],
    clients: u32,
    /// Statements per transaction: what the audit trail should show for each.
    statements: u64,
    /// Share of transactions pgbench logs for the p99. Writing a line for
    /// each of 40-80k transactions a second costs pgbench CPU on the cores
    /// the proxies are measured on (measured, select-only simple: with
    /// every transaction logged the gateway's TPS relative to pgbouncer's
    /// was 1.03-1.08 against 1.11-1.21 without); a tenth still leaves
    /// thousands of samples a run.
    log_sample: f64,
}

/// Runs one pgbench workload against `port`, inside `agent`'s cgroup as
/// the agent uid when given.
fn pgbench(
    port: u16,
    agent: Option<&TestCgroup>,
    w: &Pgbench<'_>,
    seconds: u64,
    logdir: &Path,
) -> Result<(f64, f64, f64, u64, u64)> {
    for e in std::fs::read_dir(logdir)? {
        let _ = std::fs::remove_file(e?.path());
    }
    let prefix = logdir.join("tx");
    let program = format!("{PG_BIN}/pgbench");
    let mut command = match agent {
        Some(cg) => cg.command(Some(AGENT_UID), &program),
        None => Command::new(&program),
    };
    let out = command
        .args([
            "-n",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            SUPERUSER,
        ])
        .args([
            "-c",
            &w.clients.to_string(),
            "-j",
            &w.clients.min(2).to_string(),
        ])
        .args(["-T", &seconds.to_string(), "-l", "--log-prefix"])
        .arg(&prefix)
        .arg(format!("--sampling-rate={}", w.log_sample))
        .args(w.args)
        .arg("postgres")
        .env("PGPASSWORD", GW_PASSWORD)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run pgbench")?;
    let out = {
        let _stoppable = interrupt::running(out.id());
        out.wait_with_output().context("run pgbench")?
    };
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // Stopped by a signal to the bench: say that, not how pgbench died.
        interrupt::check()?;
        bail!(
            "pgbench {}: {}\n{text}",
            w.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let grab = |key: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split('=').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let tps = grab("tps");
    let mean = grab("latency average");
    let failed = text
        .lines()
        .find(|l| l.starts_with("number of failed transactions"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let processed = text
        .lines()
        .find(|l| l.starts_with("number of transactions actually processed"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().split('/').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    // Per-transaction logs: the third column is the latency in microseconds.
    let mut lat: Vec<u64> = Vec::new();
    for e in std::fs::read_dir(logdir)? {
        let t = std::fs::read_to_string(e?.path()).unwrap_or_default();
        lat.extend(
            t.lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok()),
        );
    }
    lat.sort_unstable();
    let p99 = lat
        .get((lat.len() as f64 * 0.99) as usize)
        .map(|v| *v as f64 / 1000.0)
        .unwrap_or(0.0);
    Ok((tps, mean, p99, failed, processed))
}

/// Streams a million-row result through a client and counts rows per second.
fn bulk(port: u16, query: &str, copy: bool) -> Result<(f64, u64)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let dsn = format!(
            "host=127.0.0.1 port={port} user={SUPERUSER} dbname=postgres password={GW_PASSWORD}"
        );
        let (client, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        use futures_util::{pin_mut, TryStreamExt};
        let start = Instant::now();
        let mut rows = 0u64;
        if copy {
            let s = client.copy_out(query).await?;
            pin_mut!(s);
            while let Some(chunk) = s.try_next().await? {
                rows += chunk.iter().filter(|b| **b == b'\n').count() as u64;
            }
        } else {
            let s = client.query_raw(query, std::iter::empty::<i32>()).await?;
            pin_mut!(s);
            while s.try_next().await?.is_some() {
                rows += 1;
            }
        }
        Ok::<_, anyhow::Error>((rows as f64 / start.elapsed().as_secs_f64(), rows))
    })
}

/// The proxy's command, run on its own or under callgrind writing its
/// instruction counts to `callgrind`.
fn proxy_command(program: &Path, callgrind: Option<&Path>) -> Command {
    match callgrind {
        None => Command::new(program),
        Some(out) => {
            let mut c = Command::new("valgrind");
            c.args(["--tool=callgrind", "--quiet"])
                .arg(format!("--callgrind-out-file={}", out.display()))
                .arg(program);
            c
        }
    }
}

/// Starts a gateway; with `agent`, inside that cgroup intercepting its
/// connections to the database's port, as a sidecar in the agent's pod.
fn start_gateway(
    db: &Cluster,
    dir: &Path,
    name: &str,
    policy: &Path,
    callgrind: Option<&Path>,
    agent: Option<&TestCgroup>,
) -> Result<(Proc, u16)> {
    let port = agentgate_tests::free_port();
    let pw = dir.join("pw");
    std::fs::write(&pw, GW_PASSWORD)?;
    let program = root().join("target/release/agentgate");
    let mut command = match agent {
        Some(cg) => {
            let mut c = cg.command(None, &program.display().to_string());
            c.args(["run", "--intercept", "ebpf", "--cgroup"])
                .arg(&cg.path)
                .args(["--capture-port", &db.port.to_string()]);
            c
        }
        None => {
            let mut c = proxy_command(&program, callgrind);
            c.arg("run");
            c
        }
    };
    let child = command
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--upstream", &db.addr(), "--upstream-user", GW_USER])
        .arg("--upstream-password-file")
        .arg(&pw)
        .arg("--policy")
        .arg(policy)
        .arg("--audit")
        .arg(audit_path(dir, name))
        .env("AGENTGATE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log_path(dir, name))?)
        .spawn()?;
    if !wait_port(port) {
        bail!("agentgate ({name}) did not start");
    }
    Ok((Proc(child), port))
}

fn audit_path(dir: &Path, gateway: &str) -> PathBuf {
    dir.join(format!("{gateway}-audit.jsonl"))
}

fn log_path(dir: &Path, gateway: &str) -> PathBuf {
    dir.join(format!("{gateway}.log"))
}

/// A policy directory: `base` plus one masking rule on `columns`.
fn policy_with_mask(
    dir: &Path,
    base: &Path,
    rule: &str,
    columns: &str,
) -> Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    let name = base.file_name().context("policy file name")?;
    std::fs::copy(base, dir.join(name))?;
    std::fs::write(
        dir.join("mask.yaml"),
        format!("masking:\n  - name: {rule}\n    columns: [{columns}]\n"),
    )?;
    Ok(dir.to_path_buf())
}

fn start_pgbouncer(db: &Cluster, dir: &Path, callgrind: Option<&Path>) -> Result<(Proc, u16)> {
    let port = agentgate_tests::free_port();
    let d = dir.join(format!("pgbouncer-{port}"));
    std::fs::create_dir_all(&d)?;
    // pgbouncer appends; a port used again must not count an earlier run's logins.
    match std::fs::remove_file(d.join("pgbouncer.log")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    std::fs::write(
        d.join("pgbouncer.ini"),
        format!(
            "[databases]\npostgres = host=127.0.0.1 port={} user={GW_USER}\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = trust\n\
             auth_file = {users}\npool_mode = session\nmax_client_conn = 2000\n\
             default_pool_size = 200\nunix_socket_dir =\nlogfile = {log}\n",
            db.port,
            users = d.join("users.txt").display(),
            log = d.join("pgbouncer.log").display(),
        ),
    )?;
    std::fs::write(
        d.join("users.txt"),
        format!("\"{SUPERUSER}\" \"\"\n\"{GW_USER}\" \"{GW_PASSWORD}\"\n"),
    )?;
    let mut cmd = proxy_command(Path::new("/usr/sbin/pgbouncer"), callgrind);
    cmd.arg(d.join("pgbouncer.ini"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if agentgate_tests::is_root() {
        // pgbouncer refuses to run as root.
        for p in [&d, &d.join("pgbouncer.ini"), &d.join("users.txt")] {
            std::os::unix::fs::chown(p, Some(65534), Some(65534))?;
        }
        cmd.uid(65534).gid(65534);
    }
    let child = cmd
        .spawn()
        .context("start pgbouncer (cargo xtask setup installs it)")?;
    if !wait_port(port) {
        bail!(
            "pgbouncer did not start; see {}",
            d.join("pgbouncer.log").display()
        );
    }
    Ok((Proc(child), port))
}

pub fn run(args: BenchArgs) -> Result<()> {
    interrupt::install()?;
    exec(cargo().args(["build", "--release", "-p", "gateway-user"]))?;
    let sidecar = agentgate_tests::is_root();
    if sidecar {
        crate::build_ebpf()?;
    } else {
        eprintln!(
            "bench: not root, so pgbench reaches the gateways directly, without interception"
        );
    }
    let db = Cluster::start_with(Options {
        extra_conf: vec![
            format!("max_connections = {}", args.idle + 300),
            "shared_buffers = '256MB'".into(),
        ],
        ..Default::default()
    });
    let work = tempfile::tempdir()?;
    let w = work.path();
    eprintln!(
        "bench: pgbench -i -s {} and a {}-row bulk table",
        args.scale, args.bulk_rows
    );
    exec(
        Command::new(format!("{PG_BIN}/pgbench"))
            .args(["-i", "-q", "-s", &args.scale.to_string(), "-h"])
            .arg(db.dir.path())
            .args(["-p", &db.port.to_string(), "-U", SUPERUSER, "postgres"]),
    )?;
    db.psql_super(&format!(
        "CREATE TABLE bulk AS SELECT md5(g::text) AS a, md5((g * 7)::text) AS b, \
         'row ' || g AS c, repeat('x', 20) AS d FROM generate_series(1, {}) g",
        args.bulk_rows
    ));
    db.psql_super("VACUUM ANALYZE bulk");

    let (bouncer, bouncer_port) = start_pgbouncer(&db, w, None)?;
    let allow_all = root().join("policies/examples/allow-all.yaml");
    // The default policy plus a masking rule on one column of
    // pgbench_accounts (one the select-only statement does not read, so
    // the figure shows what masking costs where it does not apply).
    let default = policy_with_mask(
        &w.join("policy-default"),
        &root().join("policies/default.yaml"),
        "bench-filler",
        "public.pgbench_accounts.filler",
    )?;
    // Allow-all plus two masked columns of the bulk table.
    let masked = policy_with_mask(
        &w.join("policy-masked"),
        &allow_all,
        "bench-bulk",
        "public.bulk.a, public.bulk.b",
    )?;
    let (all, def) = ("agentgate-allow-all", "agentgate-default");
    let agent_all = sidecar.then(|| TestCgroup::new("bench-allow-all"));
    let agent_def = sidecar.then(|| TestCgroup::new("bench-default"));
    let (gw_all, gw_all_port) = start_gateway(&db, w, all, &allow_all, None, agent_all.as_ref())?;
    let (gw_def, gw_def_port) = start_gateway(&db, w, def, &default, None, agent_def.as_ref())?;
    let (gw_mask, gw_mask_port) = start_gateway(&db, w, "agentgate-masked", &masked, None, None)?;
    // How pgbench reaches the gateways, for the table's reader: the
    // gateway warns when the kernel does not allow the fast path.
    let deployment = if !sidecar {
        "direct to the gateways' listeners"
    } else if [all, def]
        .iter()
        .any(|g| std::fs::read_to_string(log_path(w, g)).is_ok_and(|l| l.contains("no fast path")))
    {
        "intercepted by the probes, over loopback TCP (the kernel refused the fast path)"
    } else {
        "intercepted by the probes, with the fast path"
    };
    eprintln!("bench: pgbench reaches the gateways {deployment}");
    // The pgbench gateways' audit trails and logs, checked after each run
    // (the masked one's bulk runs are one statement each).
    let mut trails = BTreeMap::from([
        (AGENTGATE, Trail::new(audit_path(w, all), log_path(w, all))),
        (
            AGENTGATE_DEFAULT,
            Trail::new(audit_path(w, def), log_path(w, def)),
        ),
    ]);
    let configs = [
        Config {
            name: DIRECT,
            port: db.port,
            pid: None,
            agent: None,
        },
        Config {
            name: PGBOUNCER,
            port: bouncer_port,
            pid: Some(bouncer.0.id()),
            agent: None,
        },
        Config {
            name: AGENTGATE,
            port: gw_all_port,
            pid: Some(gw_all.0.id()),
            agent: agent_all.as_ref(),
        },
        Config {
            name: AGENTGATE_DEFAULT,
            port: gw_def_port,
            pid: Some(gw_def.0.id()),
            agent: agent_def.as_ref(),
        },
        Config {
            name: AGENTGATE_MASKED,
            port: gw_mask_port,
            pid: Some(gw_mask.0.id()),
            agent: None,
        },
    ];

    let workloads = [
        Pgbench {
            name: SELECT_8[0].1,
            args: &["-S", "-M", "simple"],
            clients: 8,
            statements: 1,
            log_sample: 0.1,
        },
        Pgbench {
            name: SELECT_8[1].1,
            args: &["-S", "-M", "extended"],
            clients: 8,
            statements: 1,
            log_sample: 0.1,
        },
        Pgbench {
            name: SELECT_8[2].1,
            args: &["-S", "-M", "prepared"],
            clients: 8,
            statements: 1,
            log_sample: 0.1,
        },
        Pgbench {
            name: TPCB,
            args: &["-b", "tpcb-like"],
            clients: 8,
            // BEGIN, three UPDATEs, a SELECT, an INSERT, END.
            statements: 7,
            log_sample: 1.0,
        },
        Pgbench {
            name: ONE_CLIENT,
            args: &["-S", "-M", "prepared"],
            clients: 1,
            statements: 1,
            log_sample: 0.1,
        },
        // Agents that connect per task: every transaction logs in anew
        // (pgbouncer answers from its pool; the gateway opens a server
        // connection for each, as a direct client does).
        Pgbench {
            name: "select-only, new connection per transaction, 8 clients",
            args: &["-S", "-M", "simple", "-C"],
            clients: 8,
            statements: 1,
            log_sample: 1.0,
        },
        Pgbench {
            name: "select-only prepared, 64 clients",
            args: &["-S", "-M", "prepared"],
            clients: 64,
            statements: 1,
            log_sample: 0.1,
        },
    ];
    let logdir = w.join("pgbench-logs");
    std::fs::create_dir_all(&logdir)?;
    if sidecar {
        // pgbench writes its transaction log here as the agent uid too.
        std::os::unix::fs::chown(w, Some(AGENT_UID), Some(AGENT_UID))?;
        std::os::unix::fs::chown(&logdir, Some(AGENT_UID), Some(AGENT_UID))?;
    }
    let mut runs: Vec<Run> = Vec::new();
    let selected = |name: &str| args.only.as_deref().is_none_or(|o| name.contains(o));
    for wl in workloads.iter().filter(|w| selected(w.name)) {
        for round in 0..args.rounds {
            let mut direct_rate = None;
            for c in configs.iter().filter(|c| c.name != AGENTGATE_MASKED) {
                // The default policy refuses writes: TPC-B is not its workload.
                if c.name == AGENTGATE_DEFAULT && wl.name == TPCB {
                    continue;
                }
                settle()?;
                let before = c.pid.map(cpu_ticks);
                // Intercepted, the agent connects to the database's own
                // address and the probes bring it to the gateway.
                let port = if c.agent.is_some() { db.port } else { c.port };
                let (tps, mean, p99, failed, processed) =
                    pgbench(port, c.agent, wl, args.seconds, &logdir)?;
                let (cpu, audit_cpu) = match (c.pid, before) {
                    (Some(pid), Some(b)) if processed > 0 => {
                        let (cpu, audit) = cpu_per_1000(pid, b, processed);
                        (Some(cpu), audit)
                    }
                    _ => (None, None),
                };
                // After the CPU reading: the check runs while the gateway idles.
                let audit = trails.get_mut(c.name).map(Trail::take).transpose()?;
                if c.name == DIRECT {
                    direct_rate = Some(tps);
                }
                let statements = processed * wl.statements;
                eprintln!(
                    "bench: {} / {} / round {}: {tps:.0} tps{}",
                    wl.name,
                    c.name,
                    round + 1,
                    audit.map_or(String::new(), |a| format!(
                        ", {} statements, {} audited, {} sequence gaps, {} held-back warnings",
                        statements, a.statement_lines, a.seq_gaps, a.held_back_warnings
                    ))
                );
                runs.push(Run {
                    workload: wl.name.into(),
                    config: c.name.into(),
                    round,
                    rate: tps,
                    mean_latency_ms: Some(mean),
                    p99_latency_ms: Some(p99),
                    proxy_cpu_per_1000: cpu,
                    audit_cpu_per_1000: audit_cpu,
                    ratio_to_direct: direct_rate.map(|d| tps / d),
                    failed,
                    statements_completed: Some(statements),
                    audit,
                });
            }
        }
    }
    // Bulk results: rows per second through a real client.
    for (name, query, copy) in [
        (BULK_SELECT, "SELECT a, b, c, d FROM bulk", false),
        (BULK_COPY, "COPY bulk TO STDOUT", true),
    ] {
        if !selected(name) {
            continue;
        }
        for round in 0..args.rounds {
            let mut direct_rate = None;
            for c in configs.iter().filter(|c| c.name != AGENTGATE_DEFAULT) {
                settle()?;
                let before = c.pid.map(cpu_ticks);
                let (rate, rows) = bulk(c.port, query, copy)?;
                let (cpu, audit_cpu) = match (c.pid, before) {
                    (Some(pid), Some(b)) if rows > 0 => {
                        let (cpu, audit) = cpu_per_1000(pid, b, rows);
                        (Some(cpu), audit)
                    }
                    _ => (None, None),
                };
                if c.name == DIRECT {
                    direct_rate = Some(rate);
                }
                eprintln!(
                    "bench: {name} / {} / round {}: {rate:.0} rows/s",
                    c.name,
                    round + 1
                );
                runs.push(Run {
                    workload: name.into(),
                    config: c.name.into(),
                    round,
                    rate,
                    mean_latency_ms: None,
                    p99_latency_ms: None,
                    proxy_cpu_per_1000: cpu,
                    audit_cpu_per_1000: audit_cpu,
                    ratio_to_direct: direct_rate.map(|d| rate / d),
                    failed: 0,
                    statements_completed: None,
                    audit: None,
                });
            }
        }
    }

    // Instructions per transaction under callgrind, beside pgbouncer's.
    let mut instructions = Vec::new();
    if selected(INSTRUCTIONS) {
        let cg = w.join("callgrind");
        std::fs::create_dir_all(&cg)?;
        if agentgate_tests::is_root() {
            // pgbouncer runs as nobody and writes its counts here too.
            std::os::unix::fs::chown(&cg, Some(65534), Some(65534))?;
        }
        // pgbouncer's server logins are counted in its log; the gateway
        // opens one upstream connection per client by design.
        let (db, cg) = (&db, &cg);
        let pgbouncer = |out: &Path| {
            let (proc, port) = start_pgbouncer(db, cg, Some(out))?;
            let log = cg.join(format!("pgbouncer-{port}/pgbouncer.log"));
            Ok((proc, port, Some(log)))
        };
        let gateway = |name: &'static str, policy: PathBuf| {
            move |out: &Path| -> Result<Started> {
                let (proc, port) = start_gateway(db, cg, name, &policy, Some(out), None)?;
                Ok((proc, port, None))
            }
        };
        type Start<'a> = Box<dyn Fn(&Path) -> Result<Started> + 'a>;
        let proxies: [(&str, Start); 3] = [
            (PGBOUNCER, Box::new(pgbouncer)),
            (
                AGENTGATE,
                Box::new(gateway("cg-allow-all", allow_all.clone())),
            ),
            (
                AGENTGATE_DEFAULT,
                Box::new(gateway("cg-default", default.clone())),
            ),
        ];
        for mode in ["simple", "extended", "prepared"] {
            for (name, start) in &proxies {
                let n = instructions_per_tx(start, mode, &cg.join(format!("{name}-{mode}")))?;
                eprintln!("bench: {INSTRUCTIONS} / select-only {mode} / {name}: {n:.0}");
                instructions.push(Instructions {
                    mode,
                    config: name,
                    per_transaction: n,
                });
            }
        }
    }

    // Memory: peak RSS so far, then RSS with idle clients open.
    let peak_kib = status_kib(gw_all.0.id(), "VmHWM:");
    let before_kib = status_kib(gw_all.0.id(), "VmRSS:");
    let mut idle = Vec::with_capacity(args.idle);
    for _ in 0..args.idle {
        idle.push(agentgate_tests::raw::RawConn::connect(gw_all_port, "idle"));
    }
    std::thread::sleep(Duration::from_millis(500));
    let with_idle_kib = status_kib(gw_all.0.id(), "VmRSS:");
    drop(idle);
    let per_idle_kib = with_idle_kib.saturating_sub(before_kib) as f64 / args.idle.max(1) as f64;

    let summary = summarise(&runs);
    println!("pgbench reached the gateways {deployment}.\n");
    print_table(&summary, peak_kib, with_idle_kib, per_idle_kib, args.idle);
    print_instructions(&instructions);
    let verdicts = targets::judge(&runs, (args.idle > 0).then_some(per_idle_kib));
    targets::print(&verdicts);
    let out = root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    drop((bouncer, gw_all, gw_def, gw_mask));
    // The gateways first, then their cgroups (which detach the probes).
    drop((agent_all, agent_def));
    // The hot parts on their own (criterion), once the proxies are gone:
    // frame splitting, analysis, the policy decision, masking a DataRow.
    let micro = if args.only.is_none() {
        let started = std::time::SystemTime::now();
        // Criterion's own report goes to stderr with the progress lines;
        // stdout keeps the tables.
        exec(
            cargo()
                .args(["bench", "-p", "gateway-user", "--bench", "hot_paths"])
                .stdout(std::io::stderr()),
        )?;
        micro_benchmarks(started)?
    } else {
        Vec::new()
    };
    print_micro(&micro);
    let json = serde_json::json!({
        "machine": machine(),
        "pgbench_to_gateways": deployment,
        "unix_time": stamp,
        "seconds_per_run": args.seconds,
        "rounds": args.rounds,
        "runs": runs,
        "summary": summary,
        "instructions_per_transaction": instructions,
        "targets": verdicts,
        "micro_benchmarks": micro,
        "memory": {
            "peak_rss_kib": peak_kib,
            "rss_with_idle_kib": with_idle_kib,
            "idle_connections": args.idle,
            "kib_per_idle_connection": per_idle_kib,
        },
    });
    let json_path = out.join(format!("bench-{stamp}.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)?)?;
    let svg_path = out.join("ratios.svg");
    std::fs::write(&svg_path, svg(&summary))?;
    eprintln!(
        "bench: raw figures in {}, chart in {}",
        json_path.display(),
        svg_path.display()
    );
    Ok(())
}

#[derive(Debug, serde::Serialize)]
struct Micro {
    name: String,
    median_ns: f64,
}

/// The medians criterion wrote for the benchmarks it ran since `started`.
fn micro_benchmarks(started: std::time::SystemTime) -> Result<Vec<Micro>> {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
        .join("criterion");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
        let new = entry?.path().join("new");
        let estimates = new.join("estimates.json");
        let Ok(meta) = std::fs::metadata(&estimates) else {
            continue;
        };
        if meta.modified()? < started {
            continue; // a benchmark of an earlier run, no longer defined
        }
        let read = |f: &Path| -> Result<serde_json::Value> {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))?;
            Ok(serde_json::from_str(&text)?)
        };
        let title = read(&new.join("benchmark.json"))?["title"]
            .as_str()
            .context("criterion benchmark without a title")?
            .to_owned();
        let median_ns = read(&estimates)?["median"]["point_estimate"]
            .as_f64()
            .context("criterion estimate without a median")?;
        found.push(Micro {
            name: title,
            median_ns,
        });
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

fn print_micro(rows: &[Micro]) {
    use std::io::Write;
    if rows.is_empty() {
        return;
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "\n| micro-benchmark (criterion) | median |");
    let _ = writeln!(out, "|---|---:|");
    for r in rows {
        let t = r.median_ns;
        let shown = if t >= 1_000_000.0 {
            format!("{:.2} ms", t / 1_000_000.0)
        } else if t >= 1_000.0 {
            format!("{:.2} µs", t / 1_000.0)
        } else {
            format!("{t:.0} ns")
        };
        let _ = writeln!(out, "| {} | {shown} |", r.name);
    }
}

#[derive(Debug, Clone, serde::Serialize)]
struct Summary {
    workload: String,
    config: String,
    median_rate: f64,
    median_ratio: Option<f64>,
    mean_latency_ms: Option<f64>,
    p99_latency_ms: Option<f64>,
    cpu_per_1000: Option<f64>,
    audit_cpu_per_1000: Option<f64>,
    failed: u64,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

fn summarise(runs: &[Run]) -> Vec<Summary> {
    let mut groups: BTreeMap<(usize, usize), Vec<&Run>> = BTreeMap::new();
    let mut order_w: Vec<&str> = Vec::new();
    let mut order_c: Vec<&str> = Vec::new();
    for r in runs {
        if !order_w.contains(&r.workload.as_str()) {
            order_w.push(&r.workload);
        }
        if !order_c.contains(&r.config.as_str()) {
            order_c.push(&r.config);
        }
        let key = (
            order_w.iter().position(|w| *w == r.workload).unwrap_or(0),
            order_c.iter().position(|c| *c == r.config).unwrap_or(0),
        );
        groups.entry(key).or_default().push(r);
    }
    groups
        .into_values()
        .map(|g| Summary {
            workload: g[0].workload.clone(),
            config: g[0].config.clone(),
            median_rate: median(g.iter().map(|r| r.rate).collect()).unwrap_or(0.0),
            median_ratio: median(g.iter().filter_map(|r| r.ratio_to_direct).collect()),
            mean_latency_ms: median(g.iter().filter_map(|r| r.mean_latency_ms).collect()),
            p99_latency_ms: median(g.iter().filter_map(|r| r.p99_latency_ms).collect()),
            cpu_per_1000: median(g.iter().filter_map(|r| r.proxy_cpu_per_1000).collect()),
            audit_cpu_per_1000: median(g.iter().filter_map(|r| r.audit_cpu_per_1000).collect()),
            failed: g.iter().map(|r| r.failed).sum(),
        })
        .collect()
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

const INSTRUCTIONS: &str = "instructions per transaction";

/// A proxy started for counting: the process, its port, and for a pooler
/// the log that records its server logins.
type Started = (Proc, u16, Option<PathBuf>);

#[derive(Debug, serde::Serialize)]
struct Instructions {
    mode: &'static str,
    config: &'static str,
    per_transaction: f64,
}

/// The instructions a proxy runs per select-only transaction (8 clients),
/// counted by callgrind. Unlike time, the count does not move with what
/// else the machine is doing, so it compares the proxies' own work exactly.
/// Two runs, `SHORT` and `LONG` transactions per client, each with its own
/// start-up and eight logins: their difference is the transactions alone.
/// A pooler may serve two short-lived clients with one server login (about
/// 60M instructions under callgrind, several thousand a transaction in the
/// difference), so a run whose proxy logged a different number of server
/// logins than clients is run again.
fn instructions_per_tx(
    start: &dyn Fn(&Path) -> Result<Started>,
    mode: &str,
    prefix: &Path,
) -> Result<f64> {
    const CLIENTS: u64 = 8;
    const SHORT: u64 = 100;
    const LONG: u64 = 1100;
    const ATTEMPTS: usize = 5;
    let mut totals = [0u64; 2];
    for (i, per_client) in [SHORT, LONG].into_iter().enumerate() {
        let mut attempt = 0;
        totals[i] = loop {
            attempt += 1;
            interrupt::check()?;
            let out = prefix.with_extension(format!("{i}.out"));
            let (proxy, port, log) = start(&out)?;
            let run = Command::new(format!("{PG_BIN}/pgbench"))
                .args(["-n", "-h", "127.0.0.1", "-p", &port.to_string()])
                .args(["-U", SUPERUSER, "-c", &CLIENTS.to_string(), "-j", "2"])
                .args(["-t", &per_client.to_string(), "-S", "-M", mode, "postgres"])
                .env("PGPASSWORD", GW_PASSWORD)
                .output()
                .context("run pgbench")?;
            if !run.status.success() {
                bail!(
                    "pgbench under callgrind ({mode}): {}",
                    String::from_utf8_lossy(&run.stderr)
                );
            }
            stop(proxy)?;
            if let Some(log) = log {
                let logins = server_logins(&log)?;
                if logins != CLIENTS {
                    if attempt < ATTEMPTS {
                        eprintln!(
                            "bench: {} made {logins} server logins for {CLIENTS} clients; running it again",
                            out.display()
                        );
                        continue;
                    }
                    bail!(
                        "{}: {logins} server logins for {CLIENTS} clients in {ATTEMPTS} attempts; \
                         the instruction count would include a login's cost",
                        out.display()
                    );
                }
            }
            let text = std::fs::read_to_string(&out)
                .with_context(|| format!("read callgrind output {}", out.display()))?;
            break text
                .lines()
                .find_map(|l| {
                    l.strip_prefix("summary:")
                        .or_else(|| l.strip_prefix("totals:"))
                })
                .and_then(|v| v.trim().parse().ok())
                .with_context(|| format!("no instruction total in {}", out.display()))?;
        };
    }
    Ok(totals[1].saturating_sub(totals[0]) as f64 / (CLIENTS * (LONG - SHORT)) as f64)
}

/// How many server connections pgbouncer's log says it opened.
fn server_logins(log: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(log)
        .with_context(|| format!("read pgbouncer log {}", log.display()))?;
    Ok(text
        .lines()
        .filter(|l| l.contains("new connection to server"))
        .count() as u64)
}

/// Stops a proxy with SIGTERM and waits, so callgrind writes its counts.
fn stop(mut proxy: Proc) -> Result<()> {
    exec(Command::new("kill").args(["-TERM", &proxy.0.id().to_string()]))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.0.try_wait()?.is_none() {
        if Instant::now() > deadline {
            bail!("proxy {} did not stop within 60 s", proxy.0.id());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn print_instructions(rows: &[Instructions]) {
    use std::io::Write;
    if rows.is_empty() {
        return;
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "\n| {INSTRUCTIONS} (callgrind), select-only, 8 clients | config | instructions | ratio to pgbouncer |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|");
    for r in rows {
        let base = rows
            .iter()
            .find(|b| b.mode == r.mode && b.config == PGBOUNCER)
            .map(|b| b.per_transaction)
            .filter(|b| *b > 0.0);
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} |",
            r.mode,
            r.config,
            r.per_transaction,
            opt(base.map(|b| r.per_transaction / b), 2)
        );
    }
}

fn print_table(s: &[Summary], peak: u64, idle_rss: u64, per_idle: f64, idle: usize) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "| workload | config | median rate | ratio to direct | mean ms | p99 ms | proxy CPU s / 1000 | of which audit | failed |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in s {
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} |",
            r.workload,
            r.config,
            r.median_rate,
            opt(r.median_ratio, 3),
            opt(r.mean_latency_ms, 3),
            opt(r.p99_latency_ms, 3),
            opt(r.cpu_per_1000, 4),
            opt(r.audit_cpu_per_1000, 4),
            r.failed
        );
    }
    let _ = writeln!(
        out,
        "\nagentgate peak RSS {peak} KiB; with {idle} idle clients {idle_rss} KiB ({per_idle:.1} KiB per connection)"
    );
}

fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
    });
    serde_json::json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    })
}

/// A bar chart of the median ratios to direct, one group per workload.
fn svg(s: &[Summary]) -> String {
    let bars: Vec<&Summary> = s.iter().filter(|r| r.config != DIRECT).collect();
    let h = 24.0;
    let height = bars.len() as f64 * h + 60.0;
    let mut out = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='900' height='{height}' font-family='sans-serif' font-size='12'>\n\
         <text x='10' y='20' font-size='14'>Throughput as a fraction of a direct connection (median of rounds)</text>\n"
    );
    let x0 = 420.0;
    let scale = 400.0;
    out.push_str(&format!(
        "<line x1='{}' y1='30' x2='{}' y2='{}' stroke='#999'/>\n",
        x0 + scale,
        x0 + scale,
        height - 20.0
    ));
    for (i, r) in bars.iter().enumerate() {
        let y = 40.0 + i as f64 * h;
        let ratio = r.median_ratio.unwrap_or(0.0);
        let color = match r.config.as_str() {
            PGBOUNCER => "#8888cc",
            AGENTGATE => "#cc6633",
            _ => "#dd9955",
        };
        out.push_str(&format!(
            "<text x='10' y='{:.0}'>{} — {}</text><rect x='{x0}' y='{:.0}' width='{:.1}' height='{:.0}' fill='{color}'/><text x='{:.0}' y='{:.0}'>{ratio:.2}</text>\n",
            y + 14.0,
            xml(&r.workload),
            xml(&r.config),
            y + 2.0,
            (ratio.min(1.5) * scale).max(1.0),
            h - 6.0,
            x0 + ratio.min(1.5) * scale + 6.0,
            y + 14.0
        ));
    }
    out.push_str("</svg>\n");
    out
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// A thread of that name that keeps a CPU busy until `ticks` of it
    /// show, then waits (still alive, still listed) until `stop`.
    fn busy_thread(name: &str, ticks: u64, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while stat_ticks("/proc/thread-self/stat") < ticks {
                    std::hint::black_box((0..10_000u64).sum::<u64>());
                }
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            })
            .expect("thread starts")
    }

    #[test]
    fn the_audit_share_counts_the_audit_threads_only() {
        let me = std::process::id();
        let stop = Arc::new(AtomicBool::new(false));
        let before = cpu_ticks(me);
        let other = busy_thread("other", 5, Arc::clone(&stop));
        while stat_ticks(&format!("/proc/{me}/stat")) < before.total + 3 {
            std::thread::yield_now();
        }
        assert_eq!(cpu_ticks(me).audit, None, "no audit thread yet");
        let audit = busy_thread("audit-test", 5, Arc::clone(&stop));
        let share = loop {
            if let Some(a) = cpu_ticks(me).audit.filter(|a| *a >= 5) {
                break a;
            }
            std::thread::yield_now();
        };
        let now = cpu_ticks(me);
        assert!(now.total >= share, "{now:?}");
        stop.store(true, Ordering::Relaxed);
        other.join().expect("ran");
        audit.join().expect("ran");
        // Gone from /proc/PID/task once ended.
        assert_eq!(cpu_ticks(me).audit, None);
    }
}
