//! tokio-postgres through the gateway: types, binary results, prepared
//! statements, COPY, notifications, notices, cancel, upstream auth methods,
//! client SCRAM, and a database that goes away and comes back.

use agentgate_tests::cluster::{GW_MD5_PASSWORD, GW_MD5_USER, GW_PASSWORD, GW_USER, SUPERUSER};
use agentgate_tests::{Cluster, Gateway};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use tokio_postgres::{AsyncMessage, NoTls};

mod common;
use common::connect;

#[tokio::test(flavor = "multi_thread")]
async fn typed_queries_prepared_statements_and_transactions() {
    let db = Cluster::start();
    db.load_sample();
    let gw = Gateway::start(&db, &[]);
    let mut c = connect(&gw.dsn("agent_tp")).await;

    // Binary results of several types, parameters, NULLs.
    let row = c
        .query_one(
            "SELECT $1::int4 + 1, $2::text, $3::float8 * 2, NULL::int8, now() IS NOT NULL, '{1,2}'::int[]",
            &[&41i32, &"héllo", &1.25f64],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, &str>(1), "héllo");
    assert_eq!(row.get::<_, f64>(2), 2.5);
    assert_eq!(row.get::<_, Option<i64>>(3), None);
    assert!(row.get::<_, bool>(4));
    assert_eq!(row.get::<_, Vec<i32>>(5), vec![1, 2]);

    // One prepared statement executed many times without a new Parse.
    let stmt = c
        .prepare("SELECT name FROM customers WHERE id = $1")
        .await
        .unwrap();
    for (id, name) in [(1, "Ada Lovelace"), (2, "Alan Turing"), (3, "Grace Hopper")] {
        let row = c.query_one(&stmt, &[&id]).await.unwrap();
        assert_eq!(row.get::<_, &str>(0), name);
    }

    // A transaction with a rollback.
    let tx = c.transaction().await.unwrap();
    tx.execute(
        "UPDATE orders SET note = 'changed' WHERE id = $1",
        &[&10i32],
    )
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    let note: Option<String> = c
        .query_one("SELECT note FROM orders WHERE id = 10", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(note.as_deref(), Some("first"));

    // A server error, then the connection goes on.
    let err = c.query_one("SELECT 1 / 0", &[]).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22012"));
    assert_eq!(
        c.query_one("SELECT 7", &[]).await.unwrap().get::<_, i32>(0),
        7
    );

    // A statement that does not parse is denied at Parse, and the
    // connection goes on.
    let err = c.prepare("SELEC 1").await.unwrap_err();
    let db_err = err.as_db_error().expect("a server error");
    assert_eq!(db_err.code().code(), "42501");
    assert!(db_err.message().starts_with("agentgate:"));
    assert_eq!(
        c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );

    // Three executions of the prepared statement were audited as such.
    let recs = gw.wait_audit(3, |r| {
        r["event"] == "statement"
            && r["statement"]["protocol"] == "extended"
            && r["statement"]["objects"][0]["name"] == "public.customers"
    });
    assert!(recs.iter().all(|r| r["outcome"]["rows"] == 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_in_and_out_text_and_binary() {
    let db = Cluster::start();
    db.load_sample();
    let gw = Gateway::start(&db, &[]);
    let c = connect(&gw.dsn("agent_copy")).await;
    c.batch_execute("CREATE TABLE t (id int, body text)")
        .await
        .unwrap();

    let sink = c.copy_in("COPY t FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    for i in 0..1000 {
        sink.feed(Bytes::from(format!("{i}\trow {i}\n")))
            .await
            .unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), 1000);

    for format in ["text", "csv", "binary"] {
        let out: Vec<Bytes> = c
            .copy_out(&format!("COPY t TO STDOUT (FORMAT {format})"))
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let total: usize = out.iter().map(|b| b.len()).sum();
        assert!(total > 8000, "{format}: {total} bytes");
    }
    // A COPY that fails mid-way (bad data) leaves the session usable.
    let sink = c.copy_in("COPY t FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.feed(Bytes::from_static(b"not-a-number\tx\n"))
        .await
        .unwrap();
    assert!(sink.finish().await.is_err());
    let n: i64 = c
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1000);
}

#[tokio::test(flavor = "multi_thread")]
async fn notifications_and_notices_carry_the_real_backend_pid() {
    let db = Cluster::start();
    let gw = Gateway::start(&db, &[]);
    let (listener, mut conn) = tokio_postgres::connect(&gw.dsn("agent_listen"), NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    tokio::spawn(async move {
        while let Some(Ok(m)) = stream.next().await {
            let _ = tx.send(m);
        }
    });
    listener.batch_execute("LISTEN jobs").await.unwrap();
    listener
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$")
        .await
        .unwrap();

    let notifier = connect(&gw.dsn("agent_notify")).await;
    let pid: i32 = notifier
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    notifier
        .batch_execute("NOTIFY jobs, 'payload-1'")
        .await
        .unwrap();

    let mut got_notice = false;
    let mut got_notification = None;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while got_notification.is_none() {
        let m = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("notification in time")
            .expect("connection open");
        match m {
            AsyncMessage::Notice(n) => got_notice |= n.message() == "hello from plpgsql",
            AsyncMessage::Notification(n) => got_notification = Some(n),
            _ => {}
        }
    }
    assert!(got_notice);
    let n = got_notification.unwrap();
    assert_eq!(n.channel(), "jobs");
    assert_eq!(n.payload(), "payload-1");
    assert_eq!(
        n.process_id(),
        pid,
        "the pid must be the one the notifier sees"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_reaches_the_right_backend() {
    let db = Cluster::start();
    let gw = Gateway::start(&db, &[]);
    let c = connect(&gw.dsn("agent_cancel")).await;
    let token = c.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        token.cancel_query(NoTls).await.unwrap();
    });
    let started = std::time::Instant::now();
    let err = c.batch_execute("SELECT pg_sleep(30)").await.unwrap_err();
    canceller.await.unwrap();
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    assert_eq!(
        c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_md5_and_trust_logins() {
    let db = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("md5pw");
    std::fs::write(&pw, GW_MD5_PASSWORD).unwrap();
    // A gateway logging in as the MD5 role with whatever the file holds.
    let md5_gateway = || {
        Gateway::start_raw(
            tempfile::tempdir().unwrap(),
            &[
                "--upstream".into(),
                db.addr(),
                "--upstream-user".into(),
                GW_MD5_USER.into(),
                "--upstream-password-file".into(),
                pw.display().to_string(),
            ],
        )
    };
    let md5 = md5_gateway();
    let c = connect(&md5.dsn("agent_md5")).await;
    let who: String = c
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, GW_MD5_USER, "the gateway logs in as itself");

    let trust = Gateway::start_raw(
        tempfile::tempdir().unwrap(),
        &[
            "--upstream".into(),
            db.addr(),
            "--upstream-user".into(),
            SUPERUSER.into(),
        ],
    );
    let c = connect(&trust.dsn("agent_trust")).await;
    assert_eq!(
        c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );

    // Wrong gateway credentials: the client learns only that the gateway
    // was refused, never the database's own words about the gateway's role.
    std::fs::write(&pw, "wrong").unwrap();
    let bad = md5_gateway();
    let msg = refused_login(&bad).await;
    assert!(msg.contains("refused the gateway's credentials"), "{msg}");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_scram_logins_follow_a_password_reset() {
    // The gateway keeps its salted password per server salt; a reset gives
    // the role a new salt, and logins must follow it.
    let db = Cluster::start();
    let gw = Gateway::start(&db, &[]);
    let salt = || {
        db.psql_super(&format!(
            "SELECT split_part(rolpassword, '$', 2) FROM pg_authid WHERE rolname = '{GW_USER}'"
        ))
    };
    let who = || async {
        let c = connect(&gw.dsn("agent_reset")).await;
        c.query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get::<_, String>(0)
    };
    // The first login salts, the second reuses it.
    assert_eq!(who().await, GW_USER);
    assert_eq!(who().await, GW_USER);

    let before = salt();
    db.psql_super(&format!(
        "SET password_encryption = 'scram-sha-256'; ALTER ROLE {GW_USER} PASSWORD '{GW_PASSWORD}'"
    ));
    assert_ne!(salt(), before, "a reset draws a new salt");
    assert_eq!(who().await, GW_USER, "same password, new salt");

    db.psql_super(&format!("ALTER ROLE {GW_USER} PASSWORD 'rotated-away'"));
    let msg = refused_login(&gw).await;
    assert!(msg.contains("refused the gateway's credentials"), "{msg}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_skips_scrams_proof_is_refused() {
    let impostor = agentgate_tests::impostor::scram_without_proof();
    let gw = gateway_to(impostor.port);
    let msg = refused_login(&gw).await;
    assert!(msg.contains("refused the gateway's credentials"), "{msg}");
    impostor.received();
    assert!(
        gw.stderr().contains("skipped its signature"),
        "{}",
        gw.stderr()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_configured_upstream_may_ask_for_the_password_in_cleartext() {
    // The other half is in intercept.rs: a destination the agent chose
    // never gets it.
    let impostor = agentgate_tests::impostor::cleartext();
    let gw = gateway_to(impostor.port);
    refused_login(&gw).await;
    let got = impostor.received();
    let password = format!("{GW_PASSWORD}\0");
    assert!(
        got.windows(password.len())
            .any(|w| w == password.as_bytes()),
        "the configured server got {got:?}"
    );
}

/// A gateway pinned to a server on `port`, logging in as the SCRAM role.
fn gateway_to(port: u16) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, GW_PASSWORD).unwrap();
    Gateway::start_raw(
        dir,
        &[
            "--upstream".into(),
            format!("127.0.0.1:{port}"),
            "--upstream-user".into(),
            GW_USER.into(),
            "--upstream-password-file".into(),
            pw.display().to_string(),
        ],
    )
}

/// Connects through `gw` (as agent_x), expecting a refusal within 20 s;
/// the message the client was given.
async fn refused_login(gw: &Gateway) -> String {
    let dsn = gw.dsn("agent_x");
    let login = tokio_postgres::connect(&dsn, NoTls);
    let err = tokio::time::timeout(std::time::Duration::from_secs(20), login)
        .await
        .expect("an answer within 20 s")
        .err()
        .expect("refused");
    err.as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_else(|| err.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn client_scram_authentication() {
    let db = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("agent-secret");
    std::fs::write(&secret, "agent-secret-1\n").unwrap();
    let config = dir.path().join("agentgate.yaml");
    std::fs::write(
        &config,
        format!(
            "client_auth: password\nagents:\n  - name: reporter\n    password_file: {}\n",
            secret.display()
        ),
    )
    .unwrap();
    let gw = Gateway::start(&db, &["--config", &config.display().to_string()]);
    let ok = connect(&format!("{} password=agent-secret-1", gw.dsn("reporter"))).await;
    assert_eq!(
        ok.query_one("SELECT 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );

    for (user, password) in [("reporter", "wrong"), ("nobody_known", "agent-secret-1")] {
        let err = tokio_postgres::connect(&format!("{} password={password}", gw.dsn(user)), NoTls)
            .await
            .err()
            .expect("refused");
        assert_eq!(err.code().map(|c| c.code()), Some("28P01"), "{err}");
    }
    let started = gw.wait_audit(1, |r| r["event"] == "session.start");
    assert_eq!(started[0]["actor"]["auth"], "scram-sha-256");
    assert_eq!(started[0]["actor"]["user"], "reporter");
    gw.wait_audit(2, |r| r["event"] == "session.refused");
}

#[tokio::test(flavor = "multi_thread")]
async fn database_down_gives_a_clear_error_and_the_gateway_recovers() {
    let db = Cluster::start();
    let gw = Gateway::start(&db, &[]);
    db.pg_ctl("stop");
    let err = tokio_postgres::connect(&gw.dsn("agent_down"), NoTls)
        .await
        .err()
        .expect("refused while the database is down");
    let db_err = err
        .as_db_error()
        .expect("an ErrorResponse from the gateway");
    assert!(
        db_err.message().contains("cannot reach the database"),
        "{err}"
    );
    db.pg_ctl("start");
    let c = connect(&gw.dsn("agent_down")).await;
    assert_eq!(
        c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
}
