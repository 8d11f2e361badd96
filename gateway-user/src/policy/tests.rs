use std::path::PathBuf;

use super::*;
use crate::sql::analyze;

const POLICY: &str = r#"
policy: test
identities:
  - name: reporter
    match: {agent: reporter}
  - name: local
    match: {client_addr: 127.0.0.0/8}
rules:
  - name: reads
    action: allow
    kinds: [select, explain]
  - name: public-tables
    action: allow
    objects: ["public.*", "pg_catalog.*"]
    access: [read]
  - name: functions
    action: allow
    functions: ["*"]
  - name: no-file-access
    action: deny
    controls: [AC-3, CM-7]
    reason: server file access is not allowed
    functions: [pg_read_file, "dblink*"]
  - name: reporter-reads-secret
    identities: [reporter]
    action: allow
    objects: ["secret.*"]
    access: [read]
  - name: writes
    action: allow
    kinds: [update, delete]
  - name: write-public
    action: allow
    objects: ["public.*"]
    access: [update, delete]
  - name: unfiltered
    action: approve
    features: [dml_without_where]
  - name: watch-orders
    action: deny
    mode: observe
    objects: [public.orders]
    access: [delete]
"#;

fn policy() -> Policy {
    compile(&[(PathBuf::from("t.yaml"), POLICY.to_owned())]).unwrap()
}

fn judge(sql: &str, who: &Who) -> Decision {
    let p = policy();
    let ids = p.identities_of(who);
    decide(Some(&p), &ids, &analyze(sql))
}

fn anyone() -> Who {
    Who {
        startup_user: "app".into(),
        database: "db".into(),
        ..Who::default()
    }
}

#[test]
fn allowed_reads_and_default_deny() {
    assert_eq!(
        judge("SELECT * FROM customers", &anyone()).action,
        Action::Allow
    );
    let d = judge("DROP TABLE customers", &anyone());
    assert_eq!(d.action, Action::Deny);
    assert_eq!(&*d.rule, RULE_DEFAULT_DENY);
    assert!(d.reason.contains("ddl"), "{}", d.reason);
    assert_eq!(
        judge("SELECT * FROM secret.keys", &anyone()).action,
        Action::Deny
    );
}

#[test]
fn the_most_specific_rule_wins_and_deny_beats_allow() {
    let d = judge("SELECT pg_catalog.pg_read_file('/etc/passwd')", &anyone());
    assert_eq!(d.action, Action::Deny);
    assert_eq!(&*d.rule, "no-file-access");
    assert_eq!(&*d.controls, ["AC-3".to_string(), "CM-7".to_string()]);
    assert_eq!(d.reason, "server file access is not allowed");
    assert_eq!(
        judge("SELECT dblink_exec('x')", &anyone()).action,
        Action::Deny
    );
    assert_eq!(judge("SELECT lower('X')", &anyone()).action, Action::Allow);
    // A schema-qualified function of another schema is not the built-in.
    assert_eq!(
        judge("SELECT myschema.pg_read_file('x')", &anyone()).action,
        Action::Allow
    );
}

#[test]
fn identities_scope_rules() {
    let reporter = Who {
        agent: Some("reporter".into()),
        ..anyone()
    };
    assert_eq!(
        judge("SELECT * FROM secret.keys", &reporter).action,
        Action::Allow
    );
    assert_eq!(
        judge("SELECT * FROM secret.keys", &anyone()).action,
        Action::Deny
    );
    let p = policy();
    let local = Who {
        client_addr: Some("127.0.0.1".parse().unwrap()),
        ..anyone()
    };
    assert_eq!(p.identities_of(&local), vec![1]);
}

#[test]
fn approval_and_observe_mode() {
    let d = judge("DELETE FROM public.notes", &anyone());
    assert_eq!(d.action, Action::NeedsApproval);
    assert!(!d.lets_through());
    assert!(d.client_message().contains("approval required"));
    let d = judge("DELETE FROM orders WHERE id = 1", &anyone());
    assert_eq!((d.action, d.mode), (Action::Deny, Mode::Observe));
    assert!(d.lets_through());
    // An enforced verdict outranks an observed one.
    let d = judge("DELETE FROM orders", &anyone());
    assert_eq!((d.action, d.mode), (Action::NeedsApproval, Mode::Enforce));
}

#[test]
fn one_denied_statement_denies_the_query_and_the_floor_holds() {
    assert_eq!(
        judge("SELECT 1; DROP TABLE t", &anyone()).action,
        Action::Deny
    );
    let d = judge("SET client_encoding = 'LATIN1'", &anyone());
    assert_eq!(&*d.rule, RULE_PINNED_SETTING);
    assert_eq!(&*judge("SELEC 1", &anyone()).rule, RULE_UNPARSEABLE);
    // No policy: the floor only.
    assert_eq!(
        decide(None, &[], &analyze("DROP TABLE t")).action,
        Action::Allow
    );
}

/// Cases of the corpus's kinds beyond the published sample, judged by the
/// shipped corpus policy.
#[test]
fn corpus_policy_generalises() {
    let text = include_str!("../../../policies/corpus.yaml");
    let p = compile(&[(PathBuf::from("corpus.yaml"), text.to_owned())]).unwrap();
    let ids = p.identities_of(&anyone());
    let allow = [
        "SELECT * FROM customers WHERE id = 1 FOR UPDATE",
        "TABLE customers",
        "VALUES (1), (2)",
        "select * from CUSTOMERS",
        "SELECT * FROM information_schema.tables",
        "SELECT c.relname FROM pg_class c",
        "INSERT INTO notes(body) VALUES ('x') ON CONFLICT DO NOTHING",
        "INSERT INTO notes(body) SELECT name FROM customers",
        "MERGE INTO orders o USING customers c ON o.customer_id = c.id WHEN MATCHED THEN UPDATE SET note = 'm'",
        "UPDATE orders SET note = 'x' WHERE id IN (SELECT id FROM orders WHERE amount > 1)",
        "WITH d AS (DELETE FROM notes WHERE id = 1 RETURNING id) SELECT * FROM d",
        "COPY notes(body) FROM STDIN",
        "COPY customers TO STDOUT",
        "COPY (SELECT id FROM orders) TO STDOUT WITH (FORMAT csv)",
        "SAVEPOINT a",
        "ROLLBACK TO SAVEPOINT a",
        "RELEASE a",
        "START TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "DECLARE c CURSOR WITH HOLD FOR SELECT * FROM orders",
        "FETCH NEXT FROM c",
        "MOVE 1 IN c",
        "CLOSE ALL",
        "PREPARE q AS SELECT * FROM orders WHERE id = $1",
        "EXECUTE q(1)",
        "DEALLOCATE ALL",
        "SET search_path = public",
        "SET LOCAL statement_timeout = 1000",
        "RESET statement_timeout",
        "RESET ALL",
        "SHOW ALL",
        "EXPLAIN (FORMAT JSON) SELECT * FROM orders",
        "EXPLAIN DELETE FROM orders",
        "EXPLAIN ANALYZE SELECT * FROM orders",
        "LISTEN jobs",
        "UNLISTEN *",
        "NOTIFY jobs, 'x'",
        "SELECT pg_notify('jobs', 'x')",
        "SELECT set_config('application_name', 'agent', false)",
        "SELECT now(), pg_sleep(0), current_user, lower(name) FROM customers",
        "SELECT 'DROP TABLE x; SELECT pg_read_file(''/etc/passwd'')'",
        "DISCARD ALL",
    ];
    let deny = [
        "CREATE TABLE x (a int)",
        "CREATE TEMP TABLE x (a int)",
        "CREATE INDEX ON customers (name)",
        "CREATE VIEW v AS SELECT * FROM customers",
        "CREATE MATERIALIZED VIEW v AS SELECT 1",
        "CREATE SCHEMA s",
        "CREATE EXTENSION dblink",
        "CREATE RULE r AS ON INSERT TO notes DO INSTEAD NOTHING",
        "CREATE TRIGGER t BEFORE INSERT ON notes FOR EACH ROW EXECUTE FUNCTION f()",
        "CREATE PROCEDURE p() LANGUAGE sql AS $$ SELECT 1 $$",
        "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "ALTER TABLE orders RENAME TO o",
        "DROP VIEW IF EXISTS v",
        "DROP FUNCTION f",
        "TRUNCATE TABLE customers, orders",
        "COMMENT ON TABLE customers IS 'x'",
        "REVOKE ALL ON customers FROM PUBLIC",
        "GRANT SELECT ON orders TO PUBLIC",
        "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO PUBLIC",
        "CREATE ROLE evil SUPERUSER",
        "ALTER ROLE postgres PASSWORD 'x'",
        "SELECT * INTO stash FROM customers",
        "CREATE TABLE stash AS SELECT * FROM customers",
        "CALL p()",
        "DO LANGUAGE plpgsql $$ BEGIN PERFORM 1; END $$",
        "SET SESSION ROLE postgres",
        "SET role TO 'postgres'",
        "RESET ROLE",
        "SET SESSION AUTHORIZATION DEFAULT",
        "SELECT set_config('role', 'postgres', false)",
        "SELECT pg_catalog.set_config('session_authorization', 'postgres', true)",
        "SELECT set_config(name, 'x', false) FROM (SELECT 'role' AS name) s",
        "SELECT pg_read_binary_file('/etc/passwd')",
        "SELECT * FROM pg_ls_dir('/')",
        "SELECT pg_stat_file('/etc/passwd')",
        "SELECT pg_catalog.pg_ls_waldir()",
        "SELECT lo_export(1, '/tmp/x')",
        "SELECT * FROM dblink('host=x', 'SELECT 1') AS t(a int)",
        "SELECT dblink_connect('x')",
        "SELECT length(pg_read_file('/etc/passwd')) FROM customers",
        "COPY customers FROM '/tmp/x'",
        "COPY (SELECT * FROM customers) TO '/tmp/x'",
        "COPY customers TO PROGRAM 'cat > /tmp/x'",
        "LOAD 'plpgsql'",
        "ALTER SYSTEM RESET ALL",
        "SELECT pg_cancel_backend(1)",
        "SELECT pg_reload_conf()",
        "SELECT pg_catalog.pg_terminate_backend(1)",
        "LOCK TABLE customers IN ACCESS EXCLUSIVE MODE",
        "VACUUM",
        "VACUUM FULL customers",
        "CLUSTER customers USING customers_pkey",
        "REINDEX TABLE customers",
        "CHECKPOINT",
        "SELECT * FROM secret.keys",
        "SELECT 1; CREATE TABLE x (a int)",
        "UPDATE orders SET note = 'x'",
        "DELETE FROM notes",
        "EXPLAIN ANALYZE DELETE FROM orders",
        "EXPLAIN (ANALYZE true) UPDATE orders SET note = NULL",
        "PREPARE p AS DELETE FROM orders",
        "WITH u AS (UPDATE customers SET tier = 'x' RETURNING 1) SELECT * FROM u",
        "SET standard_conforming_strings = off",
        "SET client_encoding TO 'SQL_ASCII'",
    ];
    let mut wrong = Vec::new();
    for sql in allow {
        let d = decide(Some(&p), &ids, &analyze(sql));
        if d.action != Action::Allow {
            wrong.push(format!("should allow {sql:?}: {} ({})", d.rule, d.reason));
        }
    }
    for sql in deny {
        let d = decide(Some(&p), &ids, &analyze(sql));
        if d.action == Action::Allow {
            wrong.push(format!("should refuse {sql:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
