//! TLS on both legs: psql verifies the gateway's certificate, the gateway
//! verifies the database's.

use std::process::Command;

use agentgate_tests::cluster::Options;
use agentgate_tests::gateway::make_tls;
use agentgate_tests::{Cluster, Gateway};

#[test]
fn tls_to_the_client_and_verify_full_to_the_database() {
    let db = Cluster::start_with(Options {
        tls: true,
        ..Default::default()
    });
    let db_ca = db.tls.clone().unwrap().ca;
    let certs = tempfile::tempdir().unwrap();
    let gw_tls = make_tls(certs.path(), "gateway");
    let gw = Gateway::start(
        &db,
        &[
            "--tls-cert",
            &gw_tls.cert.display().to_string(),
            "--tls-key",
            &gw_tls.key.display().to_string(),
            "--upstream-tls",
            "verify-full",
            "--upstream-ca",
            &db_ca.display().to_string(),
        ],
    );
    let dsn = format!(
        "host=127.0.0.1 port={} user=agent_tls dbname=postgres sslmode=verify-full sslrootcert={}",
        gw.port,
        gw_tls.ca.display()
    );
    let out = Command::new("psql")
        .args(["-X", "-A", "-t", "-d", &dsn, "-c"])
        .arg("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .output()
        .unwrap();
    agentgate_tests::assert_success(&out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "t",
        "upstream leg must be TLS"
    );
    let start = gw.wait_audit(1, |r| r["event"] == "session.start");
    assert_eq!(start[0]["source"]["tls"], true);

    // A client that refuses anything but TLS to an unknown CA fails.
    let wrong_ca = make_tls(certs.path(), "other");
    let out = Command::new("psql")
        .args(["-X", "-d"])
        .arg(format!(
            "host=127.0.0.1 port={} user=a dbname=postgres sslmode=verify-full sslrootcert={}",
            gw.port,
            wrong_ca.ca.display()
        ))
        .args(["-c", "SELECT 1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn verify_full_refuses_a_database_with_an_unknown_certificate() {
    let db = Cluster::start_with(Options {
        tls: true,
        ..Default::default()
    });
    let certs = tempfile::tempdir().unwrap();
    let unrelated = make_tls(certs.path(), "unrelated");
    let gw = Gateway::start(
        &db,
        &[
            "--upstream-tls",
            "verify-full",
            "--upstream-ca",
            &unrelated.ca.display().to_string(),
        ],
    );
    let out = Command::new("psql")
        .args(["-X", "-d", &gw.dsn("agent"), "-c", "SELECT 1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("agentgate: cannot reach the database"),
        "{err}"
    );
    assert!(err.contains("TLS"), "{err}");
}
