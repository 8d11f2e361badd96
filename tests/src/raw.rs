//! A raw PostgreSQL protocol client, for tests that must see or send exact
//! bytes: malformed frames, FunctionCall, byte-for-byte comparisons.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub struct RawConn {
    pub stream: TcpStream,
}

/// One backend message: tag and body.
pub type Msg = (u8, Vec<u8>);

pub fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196608i32.to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// A tagged frontend message.
pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

pub fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

pub fn query(sql: &str) -> Vec<u8> {
    msg(b'Q', &cstr(sql))
}

pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut b = cstr(name);
    b.extend(cstr(sql));
    b.extend_from_slice(&0i16.to_be_bytes());
    msg(b'P', &b)
}

/// Bind with text parameters and text results.
pub fn bind(portal: &str, statement: &str, params: &[Option<&str>]) -> Vec<u8> {
    bind_with_results(portal, statement, params, None)
}

/// Bind with text parameters; `result_format` 1 asks for binary results.
pub fn bind_with_results(
    portal: &str,
    statement: &str,
    params: &[Option<&str>],
    result_format: Option<i16>,
) -> Vec<u8> {
    let mut b = cstr(portal);
    b.extend(cstr(statement));
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        match p {
            Some(v) => {
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(v.as_bytes());
            }
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    match result_format {
        Some(f) => {
            b.extend_from_slice(&1i16.to_be_bytes());
            b.extend_from_slice(&f.to_be_bytes());
        }
        None => b.extend_from_slice(&0i16.to_be_bytes()),
    }
    msg(b'B', &b)
}

pub fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
    let mut b = cstr(portal);
    b.extend_from_slice(&max_rows.to_be_bytes());
    msg(b'E', &b)
}

pub fn describe_portal(portal: &str) -> Vec<u8> {
    let mut b = vec![b'P'];
    b.extend(cstr(portal));
    msg(b'D', &b)
}

pub fn sync() -> Vec<u8> {
    msg(b'S', &[])
}

/// The fields of an ErrorResponse body.
pub fn error_fields(body: &[u8]) -> Vec<(u8, String)> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        out.push((kind, String::from_utf8_lossy(&tail[..end]).into_owned()));
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    out
}

pub fn error_code(body: &[u8]) -> String {
    error_fields(body)
        .into_iter()
        .find(|(k, _)| *k == b'C')
        .map(|(_, v)| v)
        .unwrap_or_default()
}

pub fn error_message(body: &[u8]) -> String {
    error_fields(body)
        .into_iter()
        .find(|(k, _)| *k == b'M')
        .map(|(_, v)| v)
        .unwrap_or_default()
}

impl RawConn {
    /// Connects and logs in with trust (no password exchange), returning
    /// once the server is ready for a query.
    pub fn connect(port: u16, user: &str) -> RawConn {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut c = RawConn { stream };
        c.send(&startup_packet(&[
            ("user", user),
            ("database", "postgres"),
            ("client_encoding", "UTF8"),
        ]));
        let greeting = c.until_ready();
        assert!(
            greeting.iter().all(|(t, _)| *t != b'E'),
            "login failed: {:?}",
            greeting
                .iter()
                .filter(|(t, _)| *t == b'E')
                .map(|(_, b)| error_message(b))
                .collect::<Vec<_>>()
        );
        c
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// The next message, or `None` at end of stream.
    pub fn read(&mut self) -> Option<Msg> {
        let mut head = [0u8; 5];
        self.stream.read_exact(&mut head).ok()?;
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        self.stream.read_exact(&mut body).ok()?;
        Some((head[0], body))
    }

    /// Messages up to and including the next ReadyForQuery.
    pub fn until_ready(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        while let Some(m) = self.read() {
            let done = m.0 == b'Z';
            out.push(m);
            if done {
                break;
            }
        }
        out
    }

    /// Runs one simple query and returns all messages through ReadyForQuery.
    pub fn simple(&mut self, sql: &str) -> Vec<Msg> {
        self.send(&query(sql));
        self.until_ready()
    }
}
