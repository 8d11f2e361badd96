//! Masking through a real driver (tokio-postgres: binary results, one
//! prepared statement executed many times without a new Describe), each
//! masking function and its type-correctness, and the catalog following a
//! schema change.

use agentgate_tests::cluster::GW_USER;
use agentgate_tests::{Cluster, Gateway};

mod common;
use common::connect;

const POLICY: &str = r#"
policy: masking-test
identities:
  - name: agent
    match: {}
rules:
  - name: everything
    identities: [agent]
    action: allow
    kinds: ["*"]
  - name: all-objects
    identities: [agent]
    action: allow
    objects: ["*"]
  - name: all-functions
    identities: [agent]
    action: allow
    functions: ["*"]
masking:
  - name: email-format
    columns: [public.customers.email]
    function: format
  - name: card-partial
    columns: [customers.card]
    function: partial
    keep: 4
  - name: ssn-null
    column_names: ["ssn"]
    function: "null"
  - name: phone-hash
    columns: [public.customers.phone, public.accounts.owner_id]
    function: hash
    secret_file: hmac.key
  - name: balance-redact
    columns: [public.accounts.balance]
    function: redact
  - name: tier-not-computed
    columns: [public.customers.tier]
    computed: deny
    controls: [AC-3]
"#;

fn setup() -> (Cluster, Gateway, tempfile::TempDir) {
    let db = Cluster::start();
    db.load_sample();
    db.psql_as(
        GW_USER,
        "CREATE TABLE accounts (id int PRIMARY KEY, owner_id int, balance bigint, label text);
         INSERT INTO accounts VALUES (1, 7, 1000, 'a'), (2, 7, 2000, 'b'), (3, 8, 3000, 'c');",
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), POLICY).unwrap();
    std::fs::write(
        dir.path().join("hmac.key"),
        "a test key of more than 16 bytes\n",
    )
    .unwrap();
    let policy = dir.path().join("policy.yaml");
    let gw = Gateway::start(&db, &["--policy", policy.to_str().unwrap()]);
    (db, gw, dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn each_function_keeps_the_type_and_prepared_statements_stay_masked() {
    let (_db, gw, _dir) = setup();
    let c = connect(&gw.dsn("agent")).await;

    // One statement, prepared once (Describe of the statement only), then
    // executed many times in binary.
    let stmt = c
        .prepare("SELECT id, name, email, card, ssn, phone FROM customers WHERE id = $1")
        .await
        .unwrap();
    let mut phones = Vec::new();
    for id in 1..=4i32 {
        let row = c.query_one(&stmt, &[&id]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), id);
        let email: &str = row.get(2);
        assert!(
            email.ends_with("@example.invalid") && email.starts_with('x'),
            "{email}"
        );
        let card: &str = row.get(3);
        assert!(card.starts_with("****") && card.len() >= 15, "{card}");
        assert!(row.get::<_, Option<&str>>(4).is_none(), "ssn masks to NULL");
        let phone: String = row.get(5);
        assert!(
            phone.starts_with("hmac:") && !phone.contains("555"),
            "{phone}"
        );
        phones.push(phone);
    }
    phones.sort();
    phones.dedup();
    assert_eq!(phones.len(), 4, "different inputs hash apart");
    let names: Vec<String> = c
        .query("SELECT name FROM customers ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names[0], "Ada Lovelace", "unprotected columns are intact");

    // Integers stay integers: redact gives 0, hash a stable integer, so
    // equal owners stay joinable.
    let rows = c
        .query(
            "SELECT id, owner_id, balance, label FROM accounts ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let owners: Vec<i32> = rows.iter().map(|r| r.get(1)).collect();
    assert_eq!(owners[0], owners[1]);
    assert_ne!(owners[0], owners[2]);
    assert!(!owners.contains(&7) && !owners.contains(&8));
    assert!(rows.iter().all(|r| r.get::<_, i64>(2) == 0));
    assert_eq!(rows[2].get::<_, &str>(3), "c");

    // Simple protocol (text) agrees with binary on the hashed integer.
    let text = c
        .simple_query("SELECT owner_id FROM accounts WHERE id = 1")
        .await
        .unwrap();
    let v = text.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(v, Some(owners[0].to_string()));

    // A computed value a protected column flows into is masked whole; one
    // that does not is left alone.
    let row = c
        .query_one(
            "SELECT upper(email), length(name), count(*) OVER () FROM customers WHERE id = 1",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "xxxxx@example.invalid");
    assert_eq!(row.get::<_, i32>(1), 12);
    assert_eq!(row.get::<_, i64>(2), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_catalog_follows_schema_changes() {
    let (db, gw, _dir) = setup();
    let c = connect(&gw.dsn("agent")).await;
    let before = c
        .query_one("SELECT label FROM accounts WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(before.get::<_, &str>(0), "a");
    // Renamed around the gateway: after the rename, the protected column
    // is `balance` no more, and the policy names the new one nowhere;
    // `label` takes the name `balance` and must now be masked.
    db.psql_as(
        GW_USER,
        "ALTER TABLE accounts RENAME COLUMN balance TO old_balance;
         ALTER TABLE accounts RENAME COLUMN label TO balance;",
    );
    // Through the gateway, a DDL statement invalidates the cache at once.
    c.batch_execute("CREATE TABLE touch (x int)").await.unwrap();
    let row = c
        .query_one(
            "SELECT balance, old_balance FROM accounts WHERE id = 1",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "[masked]");
    assert_eq!(row.get::<_, i64>(1), 1000);
}

#[tokio::test(flavor = "multi_thread")]
async fn computed_deny_refuses_before_the_statement_runs() {
    let (_db, gw, _dir) = setup();
    let c = connect(&gw.dsn("agent")).await;
    // A plain read is masked, not refused.
    let row = c
        .query_one("SELECT tier FROM customers WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "[masked]");
    for sql in [
        "SELECT upper(tier) FROM customers",
        "WITH x AS (SELECT lower(tier) AS t FROM customers) SELECT t FROM x",
        "SELECT name || tier FROM customers UNION SELECT 'x'",
    ] {
        let err = c.query(sql, &[]).await.unwrap_err();
        let db = err.as_db_error().unwrap_or_else(|| panic!("{sql}: {err}"));
        assert_eq!(db.code().code(), "42501", "{sql}");
        assert!(
            db.message().contains("tier-not-computed"),
            "{sql}: {}",
            db.message()
        );
    }
    // Computed values of other columns are fine, and the session goes on.
    let row = c
        .query_one("SELECT upper(name) FROM customers WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "ADA LOVELACE");
    let denied = gw.wait_audit(3, |r| r["decision"]["rule"] == "tier-not-computed");
    assert!(denied
        .iter()
        .all(|r| r["decision"]["controls"][0] == "AC-3"));
}

/// A client that never describes anything (Parse, Bind, Execute, Sync):
/// the gateway asks for the row shape itself, masks the rows, and the
/// client sees exactly the messages it asked for.
#[test]
fn execute_without_any_describe_is_masked_and_unchanged_in_shape() {
    use agentgate_tests::raw::{self, RawConn};
    let (_db, gw, _dir) = setup();
    let mut c = RawConn::connect(gw.port, "agent");
    for round in 0..3 {
        let mut m = Vec::new();
        if round == 0 {
            m.extend(raw::parse(
                "s",
                "SELECT id, email, upper(card) FROM customers ORDER BY id",
            ));
        }
        for format in [None, Some(1)] {
            m.extend(raw::bind_with_results("", "s", &[], format));
            m.extend(raw::execute("", 0));
        }
        m.extend(raw::sync());
        c.send(&m);
        let msgs = c.until_ready();
        let tags: Vec<u8> = msgs.iter().map(|(t, _)| *t).collect();
        assert!(!tags.contains(&b'T') && !tags.contains(&b'n'), "{tags:?}");
        assert!(!tags.contains(&b'E'), "{msgs:?}");
        let rows: Vec<&Vec<u8>> = msgs
            .iter()
            .filter(|(t, _)| *t == b'D')
            .map(|(_, b)| b)
            .collect();
        assert_eq!(rows.len(), 8);
        let all: Vec<u8> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        let text = String::from_utf8_lossy(&all);
        assert!(
            !text.contains("example.org") && !text.contains("4111"),
            "{text}"
        );
        assert!(text.contains("@example.invalid"), "{text}");
    }
}

/// The masking catalog of `db`'s `postgres` database, as the gateway keeps it.
fn catalog_of(db: &Cluster) -> std::sync::Arc<agentgate::mask::catalog::Catalog> {
    use agentgate::mask::catalog::Catalogs;
    use agentgate::session::UpstreamSettings;
    Catalogs::new(UpstreamSettings {
        addr: Some(db.addr()),
        user: GW_USER.into(),
        password: Some(agentgate_tests::cluster::GW_PASSWORD.into()),
        tls: None,
        connect_timeout: std::time::Duration::from_secs(10),
        salted: Default::default(),
    })
    .get(&db.addr(), "postgres")
}

fn rel(name: &str) -> agentgate::sql::lineage::RelName {
    agentgate::sql::lineage::RelName {
        schema: None,
        name: name.into(),
    }
}

/// Many sessions needing the same relations at once (every client of a
/// restarted agent, or all of them after the cache ages out) cost the
/// database one catalog query, not one each.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_sessions_share_one_catalog_lookup() {
    let db = Cluster::start();
    db.load_sample();
    let catalog = catalog_of(&db);
    let sessions = (0..32).map(|_| {
        let catalog = std::sync::Arc::clone(&catalog);
        tokio::spawn(async move { catalog.ensure(&[], &[&rel("customers")]).await })
    });
    for s in sessions.collect::<Vec<_>>() {
        s.await.unwrap().unwrap();
    }
    assert!(!catalog.read().named(&rel("customers")).is_empty());
    assert_eq!(catalog.lookups(), 1);
}

/// A lookup abandoned half-way (its session ended while the database was
/// still answering) does not leave its answer on the catalog connection for
/// the next lookup to take as its own.
#[test]
fn an_abandoned_catalog_lookup_does_not_answer_the_next() {
    use std::time::Duration;

    let db = Cluster::start();
    db.load_sample();
    db.psql_super("CREATE VIEW held AS SELECT id FROM customers");
    let catalog = catalog_of(&db);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    std::thread::scope(|scope| {
        // Another transaction holds the view: the lookup waits in
        // pg_get_viewdef until it commits.
        let holder = scope.spawn(|| {
            db.psql_super(
                "BEGIN; LOCK TABLE held IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(3); COMMIT",
            )
        });
        let locked = agentgate_tests::wait_for(Duration::from_secs(10), || {
            db.psql_super(
                "SELECT count(*) FROM pg_locks WHERE relation = 'held'::regclass AND mode = 'AccessExclusiveLock' AND granted",
            )
            .trim()
            .eq("1")
            .then_some(())
        });
        assert!(locked.is_some(), "the view was never locked");
        let abandoned = rt.block_on(async {
            tokio::time::timeout(
                Duration::from_millis(500),
                catalog.ensure(&[], &[&rel("held")]),
            )
            .await
        });
        assert!(abandoned.is_err(), "the lookup did not wait for the lock");
        holder.join().unwrap();
    });
    rt.block_on(catalog.ensure(&[], &[&rel("customers")]))
        .unwrap();
    assert!(
        !catalog.read().named(&rel("customers")).is_empty(),
        "the lookup of customers was answered with another lookup's rows"
    );
}
