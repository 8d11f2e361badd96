//! psycopg 3 (Python) through the gateway, by its own pytest file.

use std::process::Command;

use agentgate_tests::{Cluster, Gateway};

#[test]
fn psycopg_suite_passes_through_the_gateway() {
    let db = Cluster::start();
    db.load_sample();
    let gw = Gateway::start(&db, &[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/test_psycopg.py");
    let out = Command::new("python3")
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", script])
        .env("AGENTGATE_DSN", gw.dsn("agent_py"))
        .output()
        .expect("run python3 -m pytest (cargo xtask setup installs psycopg and pytest)");
    assert!(
        out.status.success(),
        "psycopg suite failed:\n{}\n{}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        gw.stderr()
    );
}
