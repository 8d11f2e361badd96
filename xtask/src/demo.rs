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
        "join and aggregate",
        "SELECT c.name, sum(o.amount) AS spent FROM customers c JOIN orders o ON o.customer_id = c.id GROUP BY c.name ORDER BY 2 DESC",
    ),
    ("update one order", "UPDATE orders SET note = 'reviewed' WHERE id = 12"),
    ("send something that does not parse (denied)", "SELEC * FROM customers"),
    ("carry on in a new statement", "SELECT count(*) AS orders FROM orders"),
];

pub fn run() -> Result<()> {
    exec(cargo().args(["build", "-p", "gateway-user"]))?;
    eprintln!("demo: starting a throwaway PostgreSQL 15 with sample customers");
    let db = Cluster::start();
    db.load_sample();

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
    let mut gateway = Command::new(agentgate_tests::gateway::binary())
        .args(["run", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--upstream", &db.addr(), "--upstream-user", GW_USER])
        .arg("--upstream-password-file")
        .arg(&pw)
        .stdout(Stdio::inherit())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("start agentgate")?;
    if !wait_port(port) {
        let _ = gateway.kill();
        bail!("agentgate did not start; see {}", log.display());
    }

    // The agent knows nothing of the database's credentials: it connects
    // to the gateway as "demo-agent" with no password.
    let dsn = format!(
        "host=127.0.0.1 port={port} user=demo-agent dbname=postgres application_name=demo-agent"
    );
    for (what, sql) in AGENT_SCRIPT {
        eprintln!("\nagent> {what}: {sql}");
        let out = Command::new("psql")
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
