//! The same conversation directly and through the gateway must produce the
//! same bytes: every row, error, notice and COPY message.

use agentgate_tests::cluster::SUPERUSER;
use agentgate_tests::raw::{self, RawConn};
use agentgate_tests::{Cluster, Gateway};

/// Queries over types of every kind, NULLs, large rows, errors, notices,
/// COPY, several statements per message and the empty query.
const SIMPLE: &[&str] = &[
    "SELECT 1::int2, 2::int4, 3::int8, 1.5::numeric(10,3), 2.25::float4, 1e300::float8, 'NaN'::float8",
    "SELECT true, false, NULL::bool, 'héllo wörld ✓'::text, ''::text, NULL::text, 'x'::char(3), 'abc'::varchar(10)",
    "SELECT '\\xdeadbeef'::bytea, decode(repeat('ff', 100), 'hex')",
    "SELECT '2026-11-27'::date, '2026-11-27 08:00:00.123456'::timestamp, '2026-11-27 08:00:00+02'::timestamptz, '1 year 2 days 03:04:05'::interval, '12:34'::time",
    "SELECT 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, '{\"a\": [1, 2, null]}'::json, '{\"b\": {\"c\": true}}'::jsonb, '192.168.0.1/24'::inet, '08:00:2b:01:02:03'::macaddr",
    "SELECT ARRAY[1, NULL, 3], ARRAY[['a','b'],['c','d']], ROW(1, 'x', NULL), int4range(1, 10), '(1,2)'::point",
    "SELECT g, md5(g::text), CASE WHEN g % 3 = 0 THEN NULL ELSE g END FROM generate_series(1, 2000) g",
    "SELECT repeat('x', 1000000) AS big, repeat('y', 70000)",
    "SELECT 1 / 0",
    "SELECT * FROM no_such_table",
    "SELECT 1; SELECT 2; SELECT 'three'",
    "SELECT 1; SELECT 1 / 0; SELECT 3",
    "",
    ";",
    "DO $$ BEGIN RAISE NOTICE 'notice with %', 'detail'; RAISE WARNING 'a warning'; END $$",
    "CREATE TEMP TABLE d (id int PRIMARY KEY, body text, amount numeric)",
    "INSERT INTO d SELECT g, 'row ' || g, g * 1.5 FROM generate_series(1, 500) g",
    "INSERT INTO d VALUES (1, 'dup', 0)",
    "COPY d TO STDOUT",
    "COPY d TO STDOUT (FORMAT csv, HEADER true)",
    "COPY d TO STDOUT (FORMAT binary)",
    "COPY (SELECT * FROM d WHERE id < 10) TO STDOUT",
    "BEGIN; UPDATE d SET body = 'changed' WHERE id < 5; SELECT count(*) FROM d WHERE body = 'changed'; ROLLBACK",
    "SHOW server_version_num",
];

fn simple_conversation(port: u16) -> Vec<raw::Msg> {
    let mut c = RawConn::connect(port, SUPERUSER);
    let mut all = Vec::new();
    for q in SIMPLE {
        all.extend(c.simple(q));
    }
    // Extended protocol: text and binary results, a NULL parameter, a
    // row-limited Execute (PortalSuspended), an error inside a pipeline.
    let mut batch = raw::parse(
        "s1",
        "SELECT $1::int + g, $2::text FROM generate_series(1, 5) g",
    );
    batch.extend(raw::bind("", "s1", &[Some("10"), None]));
    batch.extend(raw::describe_portal(""));
    batch.extend(raw::execute("", 2));
    batch.extend(raw::execute("", 0));
    batch.extend(raw::bind_with_results(
        "p2",
        "s1",
        &[Some("1"), Some("x")],
        Some(1),
    ));
    batch.extend(raw::execute("p2", 0));
    batch.extend(raw::sync());
    batch.extend(raw::parse("", "SELECT 1 / $1::int"));
    batch.extend(raw::bind("", "", &[Some("0")]));
    batch.extend(raw::execute("", 0));
    batch.extend(raw::bind("", "s1", &[Some("1"), Some("y")]));
    batch.extend(raw::execute("", 0));
    batch.extend(raw::sync());
    c.send(&batch);
    all.extend(c.until_ready());
    all.extend(c.until_ready());
    all
}

#[test]
fn direct_and_through_the_gateway_are_byte_identical() {
    let db = Cluster::start();
    // The superuser logs in by trust on 127.0.0.1, so both legs run as the
    // same role and nothing in the results may differ.
    let gw = Gateway::start_raw(
        tempfile::tempdir().unwrap(),
        &[
            "--upstream".into(),
            db.addr(),
            "--upstream-user".into(),
            SUPERUSER.into(),
        ],
    );
    let direct = simple_conversation(db.port);
    let through = simple_conversation(gw.port);
    assert!(
        direct.len() > 2000,
        "conversation too short: {}",
        direct.len()
    );
    for (i, (d, g)) in direct.iter().zip(&through).enumerate() {
        assert!(
            d == g,
            "message {i} differs:\n direct: {} {:?}\n gateway: {} {:?}",
            d.0 as char,
            String::from_utf8_lossy(&d.1[..d.1.len().min(200)]),
            g.0 as char,
            String::from_utf8_lossy(&g.1[..g.1.len().min(200)])
        );
    }
    assert_eq!(direct.len(), through.len());
}
