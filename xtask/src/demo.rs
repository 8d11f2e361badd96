//! The built-in demo: a throwaway PostgreSQL with sample customers, the
//! gateway in front of it, a scripted agent running a few statements, and
//! the audit records streaming on stdout.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use agentgate_tests::cluster::{wait_port, GW_PASSWORD, GW_USER};
use agentgate_tests::Cluster;

use crate::{cargo, exec};

/// What the scripted agent does, one psql call per step.
const AGENT_SCRIPT: &[(&str, &str)] = &[
    ("read the customer list", "SELECT id, name, tier FROM customers ORDER BY id"),
    (
        "read protected columns (masked by provenance, even through an expression)",
        "SELECT name, email, upper(ssn) AS ssn, card FROM customers ORDER BY id",
    ),
    (
        "join and aggregate",
        "SELECT c.name, sum(o.amount) AS spent FROM customers c JOIN orders o ON o.customer_id = c.id GROUP BY c.name ORDER BY 2 DESC",
    ),
    ("update one order", "UPDATE orders SET note = 'reviewed' WHERE id = 12"),
    ("send something that does not parse (denied)", "SELEC * FROM customers"),
    ("try to read a server file (denied by policy)", "SELECT pg_read_file('/etc/passwd')"),
    ("delete every order (needs approval: denied)", "DELETE FROM orders"),
    ("carry on in a new statement", "SELECT count(*) AS orders FROM orders"),
];

pub fn run() -> Result<()> {
    exec(cargo().args(["build", "-p", "gateway-user"]))?;
    // Interception needs root (eBPF, cgroups); without it the demo still
    // shows the gateway, with the agent pointed at it directly.
    let intercept = agentgate_tests::is_root();
    if intercept {
        crate::build_ebpf()?;
    } else {
        eprintln!(
            "demo: not root, so no eBPF interception: the agent connects to the gateway directly"
        );
    }
    eprintln!("demo: starting a throwaway PostgreSQL 15 with sample customers");
    let db = Cluster::start();
    db.load_sample();
    let cgroup = intercept.then(|| agentgate_tests::intercept::TestCgroup::new("demo"));

    let work = db.dir.path();
    let pw = work.join("gateway-password");
    std::fs::write(&pw, GW_PASSWORD).context("write the gateway's password file")?;
    let port = agentgate_tests::free_port();
    let log = work.join("agentgate.log");
    eprintln!(
        "demo: agentgate listens on 127.0.0.1:{port}, relays to {} as {GW_USER}; diagnostics in {}",
        db.addr(),
        log.display()
    );
    eprintln!("demo: audit records follow on stdout, one JSON object per line\n");
    let policy = crate::root().join("policies/corpus.yaml");
    // The gateway runs inside the agent's cgroup, as a sidecar runs in its
    // pod; its own uid keeps its connections from being redirected.
    let mut gateway = match &cgroup {
        Some(cg) => {
            let mut c = cg.command(
                None,
                &agentgate_tests::gateway::binary().display().to_string(),
            );
            c.args(["run", "--intercept", "ebpf", "--cgroup"])
                .arg(&cg.path)
                .args(["--capture-port", &db.port.to_string()]);
            c
        }
        None => {
            let mut c = Command::new(agentgate_tests::gateway::binary());
            c.args(["run", "--upstream", &db.addr()]);
            c
        }
    };
    let mut gateway = gateway
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--upstream-user",
            GW_USER,
        ])
        .arg("--upstream-password-file")
        .arg(&pw)
        .arg("--policy")
        .arg(&policy)
        .stdout(Stdio::inherit())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("start agentgate")?;
    let ready = agentgate_tests::wait_for(Duration::from_secs(30), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|l| l.contains("accepting PostgreSQL clients"))
    });
    if ready.is_none() || !wait_port(port) {
        let _ = gateway.kill();
        bail!("agentgate did not start; see {}", log.display());
    }

    // The agent knows nothing of the database's credentials. Intercepted,
    // it connects to the database's real address as uid 65534 inside the
    // cgroup, and the probes bring it to the gateway.
    let target_port = if cgroup.is_some() { db.port } else { port };
    let dsn = format!(
        "host=127.0.0.1 port={target_port} user=demo-agent dbname=postgres application_name=demo-agent"
    );
    if let Some(cg) = &cgroup {
        eprintln!(
            "demo: the agent runs as uid 65534 in cgroup {} and connects to the database at {}",
            cg.path.display(),
            db.addr()
        );
    }
    for (what, sql) in AGENT_SCRIPT {
        eprintln!("\nagent> {what}: {sql}");
        let mut psql = match &cgroup {
            Some(cg) => cg.command(Some(65534), "psql"),
            None => Command::new("psql"),
        };
        let out = psql
            .args(["-X", "-d", &dsn, "-c", sql])
            .stdout(Stdio::piped())
            .output()
            .context("run psql")?;
        eprint!("{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        // Let the audit line for this step appear before the next step.
        std::thread::sleep(Duration::from_millis(200));
    }

    // SIGTERM: the gateway flushes the audit trail and exits.
    let _ = Command::new("kill").arg(gateway.id().to_string()).status();
    let status = gateway.wait()?;
    eprintln!("\ndemo: done (agentgate exited with {status}); the cluster is removed");
    Ok(())
}
