//! Protocol edge cases at the byte level: denial in both protocols, the
//! FunctionCall message, malformed and oversized frames, cancel keys,
//! replication, and a client vanishing mid-result.

use agentgate_tests::raw::{self, RawConn};
use agentgate_tests::{Cluster, Gateway};

fn codes(msgs: &[raw::Msg]) -> Vec<String> {
    msgs.iter()
        .filter(|(t, _)| *t == b'E')
        .map(|(_, b)| raw::error_code(b))
        .collect()
}

fn tags(msgs: &[raw::Msg]) -> String {
    msgs.iter().map(|(t, _)| *t as char).collect()
}

#[test]
fn denial_in_the_extended_protocol_discards_until_sync_and_recovers() {
    let db = Cluster::start();
    let gw = Gateway::start(&db, &[]);
    let mut c = RawConn::connect(gw.port, "agent");

    // A pipeline: a good statement, a denied one, then messages the server
    // must discard, then Sync.
    let mut batch = raw::parse("ok", "SELECT 1");
    batch.extend(raw::bind("", "ok", &[]));
    batch.extend(raw::execute("", 0));
    batch.extend(raw::parse("bad", "SELEC nonsense"));
    batch.extend(raw::bind("", "bad", &[]));
    batch.extend(raw::execute("", 0));
    batch.extend(raw::sync());
    c.send(&batch);
    let msgs = c.until_ready();
    assert_eq!(tags(&msgs), "12DCEZ", "{msgs:?}");
    assert_eq!(codes(&msgs), ["42501"]);
    let (_, err) = &msgs[4];
    assert!(raw::error_message(err).starts_with("agentgate:"));

    // Same connection, next Sync: works.
    let mut again = raw::bind("", "ok", &[]);
    again.extend(raw::execute("", 0));
    again.extend(raw::sync());
    c.send(&again);
    assert_eq!(tags(&c.until_ready()), "2DCZ");

    // A Bind of a statement the gateway never saw prepared is denied.
    let mut unknown = raw::bind("", "never_prepared", &[]);
    unknown.extend(raw::execute("", 0));
    unknown.extend(raw::sync());
    c.send(&unknown);
    let msgs = c.until_ready();
    assert_eq!(codes(&msgs), ["42501"], "{msgs:?}");

    let after = c.simple("SELECT 1");
    assert_eq!(tags(&after), "TDCZ");
}

#[test]
fn denial_inside_a_transaction_aborts_it_like_any_error() {
    let db = Cluster::start();
    let gw = Gateway::start(&db, &[]);
    let mut c = RawConn::connect(gw.port, "agent");
    c.simple("BEGIN");
    let denied = c.simple("SELEC 1");
    assert_eq!(codes(&denied), ["42501"]);
    // ReadyForQuery reports the failed transaction, exactly as PostgreSQL would.
    assert_eq!(denied.last().map(|(_, b)| b[0]), Some(b'E'));
    let rollback = c.simple("ROLLBACK");
    assert_eq!(rollback.last().map(|(_, b)| b[0]), Some(b'I'));
}

#[test]
fn function_call_message_is_refused_and_the_session_goes_on() {
    let db = Cluster::start();
    let gw = Gateway::start(&db, &[]);
    let mut c = RawConn::connect(gw.port, "agent");
    // FunctionCall of pg_backend_pid (oid 2026) with no arguments.
    let mut body = 2026i32.to_be_bytes().to_vec();
    body.extend_from_slice(&0i16.to_be_bytes()); // argument formats
    body.extend_from_slice(&0i16.to_be_bytes()); // arguments
    body.extend_from_slice(&0i16.to_be_bytes()); // result format
    c.send(&raw::msg(b'F', &body));
    let msgs = c.until_ready();
    assert_eq!(codes(&msgs), ["42501"], "{msgs:?}");
    assert!(raw::error_message(&msgs[0].1).contains("builtin.function-call"));
    assert_eq!(tags(&c.simple("SELECT 1")), "TDCZ");
    let denied = gw.wait_audit(1, |r| r["statement"]["protocol"] == "function_call");
    assert_eq!(denied[0]["decision"]["action"], "deny");
}

#[test]
fn malformed_and_oversized_frames_close_only_that_connection() {
    let db = Cluster::start();
    let gw = Gateway::start(&db, &["--max-frame-bytes", "1024"]);

    // A Query with bytes after its terminating NUL.
    let mut c = RawConn::connect(gw.port, "agent");
    c.send(&raw::msg(b'Q', b"SELECT 1\0DROP TABLE x\0"));
    let (tag, body) = c.read().expect("an error response");
    assert_eq!(tag, b'E');
    assert_eq!(raw::error_code(&body), "08P01");
    assert!(c.read().is_none(), "connection must close");

    // Invalid UTF-8, in a Query and in a Parse (the Parse after a valid
    // one: texts are looked up in the analysis cache before their check).
    let mut c = RawConn::connect(gw.port, "agent");
    c.send(&raw::msg(b'Q', b"SELECT '\xff'\0"));
    let (tag, body) = c.read().expect("an error response");
    assert_eq!((tag, raw::error_code(&body).as_str()), (b'E', "08P01"));
    assert!(c.read().is_none(), "connection must close");
    let mut c = RawConn::connect(gw.port, "agent");
    c.send(&raw::msg(b'P', b"\0SELECT 'a'\0\0\0"));
    c.send(&raw::msg(b'S', b""));
    assert_eq!(tags(&c.until_ready()), "1Z");
    c.send(&raw::msg(b'P', b"\0SELECT '\xff'\0\0\0"));
    c.send(&raw::msg(b'S', b""));
    let (tag, body) = c.read().expect("an error response");
    assert_eq!((tag, raw::error_code(&body).as_str()), (b'E', "08P01"));
    assert!(c.read().is_none(), "connection must close");

    // Longer than the cap: refused from the header alone.
    let mut c = RawConn::connect(gw.port, "agent");
    let mut big = vec![b'Q'];
    big.extend_from_slice(&(1_000_000i32).to_be_bytes());
    c.send(&big);
    let (tag, body) = c.read().expect("an error response");
    assert_eq!(tag, b'E');
    assert!(
        raw::error_message(&body).contains("limit"),
        "{}",
        raw::error_message(&body)
    );

    // A length below 4.
    let mut c = RawConn::connect(gw.port, "agent");
    c.send(&[b'Q', 0, 0, 0, 2]);
    assert_eq!(c.read().map(|m| m.0), Some(b'E'));

    // Garbage instead of a startup packet.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    std::io::Write::write_all(&mut s, &[0, 0, 0, 8, 1, 2, 3, 4]).unwrap();
    let mut c = RawConn { stream: s };
    assert_eq!(c.read().map(|m| m.0), Some(b'E'));

    // The gateway still serves others.
    let mut ok = RawConn::connect(gw.port, "agent");
    assert_eq!(tags(&ok.simple("SELECT 1")), "TDCZ");
}

#[test]
fn replication_connections_are_refused() {
    let db = Cluster::start();
    let gw = Gateway::start(&db, &[]);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    std::io::Write::write_all(
        &mut s,
        &raw::startup_packet(&[("user", "agent"), ("replication", "database")]),
    )
    .unwrap();
    let mut c = RawConn { stream: s };
    let (tag, body) = c.read().expect("an error");
    assert_eq!(tag, b'E');
    assert_eq!(raw::error_code(&body), "42501");
    assert!(raw::error_message(&body).starts_with("agentgate:"));
}

#[test]
fn backend_key_data_carries_the_real_pid_and_a_minted_key() {
    let db = Cluster::start();
    let gw = Gateway::start(&db, &[]);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    std::io::Write::write_all(
        &mut s,
        &raw::startup_packet(&[("user", "agent"), ("database", "postgres")]),
    )
    .unwrap();
    let mut c = RawConn { stream: s };
    let greeting = c.until_ready();
    let (_, key) = greeting
        .iter()
        .find(|(t, _)| *t == b'K')
        .expect("BackendKeyData");
    let pid = i32::from_be_bytes([key[0], key[1], key[2], key[3]]);
    let rows = c.simple("SELECT pg_backend_pid()");
    let (_, row) = rows.iter().find(|(t, _)| *t == b'D').unwrap();
    let seen: i32 = String::from_utf8_lossy(&row[6..]).parse().unwrap();
    assert_eq!(pid, seen, "the client must see the real backend pid");
}

#[test]
fn client_vanishing_mid_result_leaves_the_gateway_serving() {
    let db = Cluster::start();
    let gw = Gateway::start(&db, &[]);
    {
        let mut c = RawConn::connect(gw.port, "agent");
        c.send(&raw::query(
            "SELECT repeat('x', 1000) FROM generate_series(1, 200000)",
        ));
        // Read a little, then vanish.
        c.read();
    }
    let ends = gw.wait_audit(1, |r| r["event"] == "session.end");
    assert!(ends[0]["reason"].as_str().is_some());
    let mut c = RawConn::connect(gw.port, "agent");
    assert_eq!(tags(&c.simple("SELECT 1")), "TDCZ");
    // The abandoned backend goes away.
    let left = agentgate_tests::wait_for(std::time::Duration::from_secs(10), || {
        let n = db
            .psql_super("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT repeat%'");
        (n.trim() == "0").then_some(())
    });
    assert!(
        left.is_some(),
        "the vanished client's query is still running"
    );
}

#[test]
fn a_client_that_stops_reading_holds_back_only_its_own_session() {
    let db = Cluster::start();
    // One relay thread: the stalled session and the other share it.
    let gw = Gateway::start(&db, &["--worker-threads", "1"]);
    let mut slow = RawConn::connect(gw.port, "agent");
    // About 20 MB: far more than the sockets between them can hold.
    slow.send(&raw::query(
        "SELECT repeat('x', 1000) FROM generate_series(1, 20000)",
    ));
    std::thread::sleep(std::time::Duration::from_secs(1));
    let mut other = RawConn::connect(gw.port, "agent");
    for i in 0..50 {
        let reply = other.simple(&format!("SELECT {i}"));
        assert_eq!(tags(&reply), "TDCZ", "query {i} of the other session");
    }
    // Nothing of the stalled result was lost or reordered.
    let result = slow.until_ready();
    let rows = result.iter().filter(|(t, _)| *t == b'D').count();
    assert_eq!(rows, 20_000);
    assert!(result
        .iter()
        .filter(|(t, _)| *t == b'D')
        .all(|(_, b)| b.len() == 2 + 4 + 1000));
    let complete = result
        .iter()
        .find(|(t, _)| *t == b'C')
        .expect("CommandComplete");
    assert_eq!(&complete.1[..], b"SELECT 20000\0");
    assert_eq!(tags(&slow.simple("SELECT 1")), "TDCZ");
}

#[test]
fn sql_prepare_is_bindable_and_deallocate_forgets_it() {
    let db = Cluster::start();
    let gw = Gateway::start(&db, &[]);
    let mut c = RawConn::connect(gw.port, "agent");
    assert_eq!(
        codes(&c.simple("PREPARE q(int) AS SELECT $1 + 1")),
        Vec::<String>::new()
    );
    let mut batch = raw::bind("", "q", &[Some("41")]);
    batch.extend(raw::execute("", 0));
    batch.extend(raw::sync());
    c.send(&batch);
    let msgs = c.until_ready();
    assert_eq!(tags(&msgs), "2DCZ", "{msgs:?}");
    assert_eq!(&msgs[1].1[6..], b"42");
    c.simple("DEALLOCATE q");
    c.send(&batch);
    assert_eq!(codes(&c.until_ready()), ["42501"]);
}

#[test]
fn deallocate_all_forgets_named_statements_but_not_the_unnamed_one() {
    // As in PostgreSQL, whose unnamed statement lives outside the table
    // DEALLOCATE ALL empties. (A simple Query drops the unnamed statement
    // by itself, so the DEALLOCATE ALL comes as a named statement.)
    let db = Cluster::start();
    let gw = Gateway::start(&db, &[]);
    let mut c = RawConn::connect(gw.port, "agent");
    assert!(codes(&c.simple("PREPARE q AS SELECT 8")).is_empty());
    let mut batch = raw::parse("", "SELECT 7");
    batch.extend(raw::parse("d", "DEALLOCATE ALL"));
    batch.extend(raw::sync());
    c.send(&batch);
    assert_eq!(tags(&c.until_ready()), "11Z");

    let mut unnamed = raw::bind("", "", &[]);
    unnamed.extend(raw::execute("", 0));
    unnamed.extend(raw::sync());
    c.send(&unnamed);
    let msgs = c.until_ready();
    assert_eq!(tags(&msgs), "2DCZ", "{msgs:?}");
    assert_eq!(&msgs[1].1[6..], b"7");
}
