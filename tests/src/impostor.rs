//! Database impostors: servers that speak just enough of PostgreSQL's login
//! to check what the gateway gives away to, or accepts from, a server it
//! must not trust.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

/// One impostor, serving a single connection on 127.0.0.1.
pub struct Impostor {
    pub port: u16,
    handle: JoinHandle<Vec<u8>>,
}

impl Impostor {
    /// Everything the gateway sent after its startup packet, until it hung
    /// up (or 10 s passed).
    pub fn received(self) -> Vec<u8> {
        self.handle.join().expect("impostor thread")
    }
}

fn serve(script: impl FnOnce(&mut TcpStream, &mut Vec<u8>) + Send + 'static) -> Impostor {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind impostor");
    let port = listener.local_addr().expect("impostor address").port();
    let handle = std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return Vec::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let mut log = Vec::new();
        // The startup packet: a length, then the rest.
        read_message(&mut s, None, &mut log);
        log.clear();
        script(&mut s, &mut log);
        let mut rest = [0u8; 4096];
        while let Ok(n) = s.read(&mut rest) {
            if n == 0 {
                break;
            }
            log.extend_from_slice(&rest[..n]);
        }
        log
    });
    Impostor { port, handle }
}

/// Reads one message (`tag` then length, or length alone for the startup
/// packet), appending its body to `log`; returns the body.
fn read_message(s: &mut TcpStream, tag: Option<u8>, log: &mut Vec<u8>) -> Vec<u8> {
    if tag.is_some() {
        let mut t = [0u8; 1];
        let _ = s.read_exact(&mut t);
    }
    let mut len = [0u8; 4];
    if s.read_exact(&mut len).is_err() {
        return Vec::new();
    }
    let mut body = vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
    let _ = s.read_exact(&mut body);
    log.extend_from_slice(&body);
    body
}

/// An Authentication message with `code` and `data`.
fn auth(code: u32, data: &[u8]) -> Vec<u8> {
    let mut m = vec![b'R'];
    m.extend_from_slice(&(8 + data.len() as u32).to_be_bytes());
    m.extend_from_slice(&code.to_be_bytes());
    m.extend_from_slice(data);
    m
}

/// AuthenticationOk then ReadyForQuery: a client that believed it is in.
fn welcome() -> Vec<u8> {
    let mut m = auth(0, b"");
    m.extend_from_slice(b"Z\0\0\0\x05I");
    m
}

/// Asks for the password in cleartext, records the answer, and hangs up.
pub fn cleartext() -> Impostor {
    asks(auth(3, b""))
}

/// Asks for an MD5 password hash (salt `salt`), records the answer, and
/// hangs up.
pub fn md5() -> Impostor {
    asks(auth(5, b"salt"))
}

fn asks(request: Vec<u8>) -> Impostor {
    serve(move |s, log| {
        let _ = s.write_all(&request);
        read_message(s, Some(b'p'), log);
        let _ = s.shutdown(std::net::Shutdown::Write);
    })
}

/// Runs SCRAM with `iterations`, records the client's proof message (if
/// one comes), and hangs up.
pub fn scram_with(iterations: u32) -> Impostor {
    serve(move |s, log| {
        scram_round(s, iterations, log);
        let _ = s.shutdown(std::net::Shutdown::Write);
    })
}

/// Runs SCRAM's first round, then accepts the login without the final
/// message that would prove it knows the password.
pub fn scram_without_proof() -> Impostor {
    serve(|s, log| {
        if scram_round(s, 4096, log) {
            let _ = s.write_all(&welcome());
        }
    })
}

/// Asks for SCRAM, answers the client's first message with a challenge of
/// `iterations`, and records the client's proof message in `log`; false
/// if the client's first message carried no nonce.
fn scram_round(s: &mut TcpStream, iterations: u32, log: &mut Vec<u8>) -> bool {
    let _ = s.write_all(&auth(10, b"SCRAM-SHA-256\0\0"));
    let first = read_message(s, Some(b'p'), &mut Vec::new());
    let text = String::from_utf8_lossy(&first).into_owned();
    let Some(nonce) = text.split("r=").nth(1) else {
        return false;
    };
    let challenge = format!("r={nonce}impostor,s=c2FsdA==,i={iterations}");
    let _ = s.write_all(&auth(11, challenge.as_bytes()));
    read_message(s, Some(b'p'), log);
    true
}
