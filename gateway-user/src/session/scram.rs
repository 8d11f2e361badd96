//! SCRAM-SHA-256 (RFC 5802/7677): the HMAC and constant-time check both of
//! the gateway's sides use, and the client it logs in to the database with.
//!
//! The client is ours rather than `postgres_protocol`'s because that one
//! salts the password on every login (PBKDF2, 4096 HMAC rounds by default,
//! about a millisecond of CPU) and offers no way to reuse the result. The
//! salted password depends only on the password, the salt and the
//! iteration count, and the server keeps the salt until the password is
//! changed, so [`SaltedPasswords`] keeps it: every login after the first
//! costs a few hashes, which matters to agents that open a connection per
//! task.

use std::sync::Mutex;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

pub(super) fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so new_from_slice cannot fail.
    let mut mac = HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

pub(super) fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Hi() of RFC 5802: PBKDF2-HMAC-SHA-256 of the password, SASLprep'd as
/// PostgreSQL does (a password SASLprep rejects is used as it is).
pub(super) fn salted_password(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
    let prepared = stringprep::saslprep(password);
    let bytes = match &prepared {
        Ok(p) => p.as_bytes(),
        Err(_) => password.as_bytes(),
    };
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(bytes, salt, iterations, &mut out);
    out
}

/// ClientKey and ServerKey, from which StoredKey and the signatures follow.
struct Keys {
    client: [u8; 32],
    server: [u8; 32],
}

impl Keys {
    fn from_salted(salted: &[u8; 32]) -> Self {
        Self {
            client: hmac(salted, b"Client Key"),
            server: hmac(salted, b"Server Key"),
        }
    }

    fn stored(&self) -> [u8; 32] {
        Sha256::digest(self.client).into()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramClientError {
    #[error("malformed server message: {0}")]
    Malformed(&'static str),
    #[error("the server's nonce does not extend ours")]
    Nonce,
    #[error("the server reported: {0}")]
    Server(String),
    #[error("the server's signature does not match: it does not know the password")]
    ServerSignature,
}

/// Salted passwords already computed, by salt and iteration count. A login
/// as the same role finds its entry; a changed password on the server comes
/// with a new salt, so a stale entry is never used, only left to age out.
#[derive(Default)]
pub struct SaltedPasswords {
    entries: Mutex<Vec<Salted>>,
}

struct Salted {
    salt: Vec<u8>,
    iterations: u32,
    salted: [u8; 32],
}

/// Enough for every role and database the gateway logs in to; the oldest
/// goes first.
const SALTED_ENTRIES: usize = 16;

impl SaltedPasswords {
    pub fn get(&self, salt: &[u8], iterations: u32) -> Option<[u8; 32]> {
        self.lock()
            .iter()
            .find(|e| e.iterations == iterations && e.salt == salt)
            .map(|e| e.salted)
    }

    pub fn put(&self, salt: &[u8], iterations: u32, salted: [u8; 32]) {
        let mut entries = self.lock();
        if entries
            .iter()
            .any(|e| e.iterations == iterations && e.salt == salt)
        {
            return;
        }
        if entries.len() >= SALTED_ENTRIES {
            entries.remove(0);
        }
        entries.push(Salted {
            salt: salt.to_vec(),
            iterations,
            salted,
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Salted>> {
        // Entries are pushed and removed whole: a poisoned lock still holds
        // a consistent list.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the server's first message asks the client to salt with.
#[derive(Debug)]
pub struct Challenge {
    /// The server-first message, part of what the proof signs.
    server_first: String,
    nonce: String,
    pub salt: Vec<u8>,
    pub iterations: u32,
}

/// The client side of one exchange, without channel binding (`n,,`, as
/// `postgres_protocol` sent it).
pub struct ScramClient {
    nonce: String,
    client_first_bare: String,
    /// Set by `respond`: what the server's final message must carry.
    expected_server_signature: Option<[u8; 32]>,
    /// The server's final message carried it.
    verified: bool,
}

/// The GS2 header for "no channel binding", and its base64 (`c=`).
const GS2_HEADER: &str = "n,,";
const GS2_HEADER_B64: &str = "biws";

impl ScramClient {
    pub fn new() -> Self {
        let mut raw = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut raw);
        let nonce = B64.encode(raw);
        Self {
            // The user name is left empty: PostgreSQL takes the startup
            // packet's.
            client_first_bare: format!("n=,r={nonce}"),
            nonce,
            expected_server_signature: None,
            verified: false,
        }
    }

    /// The client-first message.
    pub fn first_message(&self) -> String {
        format!("{GS2_HEADER}{}", self.client_first_bare)
    }

    /// Reads the server-first message: `r=<nonce>,s=<salt>,i=<iterations>`.
    pub fn challenge(&self, server_first: &[u8]) -> Result<Challenge, ScramClientError> {
        if self.expected_server_signature.is_some() {
            return Err(ScramClientError::Malformed("a second server-first message"));
        }
        let msg = std::str::from_utf8(server_first)
            .map_err(|_| ScramClientError::Malformed("not UTF-8"))?;
        if msg.starts_with("m=") {
            return Err(ScramClientError::Malformed("mandatory extension"));
        }
        let (mut nonce, mut salt, mut iterations) = (None, None, None);
        for attr in msg.split(',') {
            if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v);
            } else if let Some(v) = attr.strip_prefix("s=") {
                salt = Some(v);
            } else if let Some(v) = attr.strip_prefix("i=") {
                iterations = Some(v);
            }
        }
        let nonce = nonce.ok_or(ScramClientError::Malformed("no nonce"))?;
        if nonce.len() <= self.nonce.len() || !nonce.starts_with(&self.nonce) {
            return Err(ScramClientError::Nonce);
        }
        if !nonce
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Err(ScramClientError::Malformed("invalid nonce"));
        }
        let salt = B64
            .decode(salt.ok_or(ScramClientError::Malformed("no salt"))?)
            .map_err(|_| ScramClientError::Malformed("salt is not base64"))?;
        let iterations = iterations
            .ok_or(ScramClientError::Malformed("no iteration count"))?
            .parse::<u32>()
            .ok()
            .filter(|i| *i > 0)
            .ok_or(ScramClientError::Malformed("bad iteration count"))?;
        Ok(Challenge {
            server_first: msg.to_owned(),
            nonce: nonce.to_owned(),
            salt,
            iterations,
        })
    }

    /// The client-final message for the challenge, proving knowledge of the
    /// password through its salted form.
    pub fn respond(&mut self, challenge: &Challenge, salted: &[u8; 32]) -> String {
        let without_proof = format!("c={GS2_HEADER_B64},r={}", challenge.nonce);
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, challenge.server_first
        );
        let keys = Keys::from_salted(salted);
        let signature = hmac(&keys.stored(), auth_message.as_bytes());
        let mut proof = keys.client;
        for (p, s) in proof.iter_mut().zip(signature) {
            *p ^= s;
        }
        self.expected_server_signature = Some(hmac(&keys.server, auth_message.as_bytes()));
        format!("{without_proof},p={}", B64.encode(proof))
    }

    /// The server has proved it holds the password's keys; until then a
    /// login must not be taken as done.
    pub fn verified(&self) -> bool {
        self.verified
    }

    /// Checks the server-final message: the server proves it holds the
    /// password's keys too, so a server that merely accepts any proof is
    /// caught.
    pub fn verify(&mut self, server_final: &[u8]) -> Result<(), ScramClientError> {
        let msg = std::str::from_utf8(server_final)
            .map_err(|_| ScramClientError::Malformed("not UTF-8"))?;
        if let Some(e) = msg.strip_prefix("e=") {
            return Err(ScramClientError::Server(e.to_owned()));
        }
        let v = msg
            .split(',')
            .find_map(|a| a.strip_prefix("v="))
            .ok_or(ScramClientError::Malformed("no server signature"))?;
        let got: [u8; 32] = B64
            .decode(v)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or(ScramClientError::Malformed("bad server signature encoding"))?;
        match &self.expected_server_signature {
            Some(want) if constant_time_eq(want, &got) => {
                self.verified = true;
                Ok(())
            }
            Some(_) => Err(ScramClientError::ServerSignature),
            None => Err(ScramClientError::Malformed(
                "final message before the challenge",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::client_auth::{ScramServer, Verifier};
    use super::*;

    /// Runs our client against `server`, salting with `password`.
    fn login(verifier: Verifier, password: &str) -> Result<(), String> {
        let mut client = ScramClient::new();
        let (server, first) = ScramServer::start(verifier, client.first_message().as_bytes())
            .map_err(|e| e.to_string())?;
        let challenge = client
            .challenge(first.as_bytes())
            .map_err(|e| e.to_string())?;
        let salted = salted_password(password, &challenge.salt, challenge.iterations);
        let last = client.respond(&challenge, &salted);
        // One challenge per exchange.
        assert_eq!(
            client.challenge(first.as_bytes()).unwrap_err(),
            ScramClientError::Malformed("a second server-first message")
        );
        let fin = server.finish(last.as_bytes()).map_err(|e| e.to_string())?;
        assert!(!client.verified());
        client.verify(fin.as_bytes()).map_err(|e| e.to_string())?;
        assert!(client.verified());
        Ok(())
    }

    #[test]
    fn logs_in_to_a_scram_server_with_the_right_password_only() {
        // The verifier comes from postgres_protocol, as PostgreSQL stores it.
        assert_eq!(login(Verifier::from_secret("s3cret ä"), "s3cret ä"), Ok(()));
        assert_eq!(
            login(Verifier::from_secret("s3cret"), "s3cret!"),
            Err("proof does not match".into())
        );
    }

    #[test]
    fn the_server_must_prove_it_knows_the_password() {
        let mut client = ScramClient::new();
        let first = format!("r={}xyz,s={},i=4096", client.nonce, B64.encode(b"salt"));
        let challenge = client.challenge(first.as_bytes()).unwrap();
        let salted = salted_password("pw", &challenge.salt, challenge.iterations);
        client.respond(&challenge, &salted);
        let forged = format!("v={}", B64.encode([7u8; 32]));
        assert_eq!(
            client.verify(forged.as_bytes()),
            Err(ScramClientError::ServerSignature)
        );
        assert_eq!(
            client.verify(b"e=invalid-proof"),
            Err(ScramClientError::Server("invalid-proof".into()))
        );
        assert!(!client.verified());
    }

    #[test]
    fn rejects_a_server_first_message_it_cannot_trust() {
        let client = ScramClient::new();
        let salt = B64.encode(b"salt");
        let n = &client.nonce;
        for (msg, want) in [
            (format!("r=other,s={salt},i=4096"), ScramClientError::Nonce),
            (format!("r={n},s={salt},i=4096"), ScramClientError::Nonce),
            (
                format!("r={n}x,s=!!,i=4096"),
                ScramClientError::Malformed("salt is not base64"),
            ),
            (
                format!("r={n}x,s={salt},i=0"),
                ScramClientError::Malformed("bad iteration count"),
            ),
            (
                format!("r={n}x,s={salt}"),
                ScramClientError::Malformed("no iteration count"),
            ),
            (
                format!("m=ext,r={n}x,s={salt},i=1"),
                ScramClientError::Malformed("mandatory extension"),
            ),
        ] {
            assert_eq!(client.challenge(msg.as_bytes()).unwrap_err(), want, "{msg}");
        }
    }

    #[test]
    fn salted_passwords_are_kept_by_salt_and_iterations() {
        let cache = SaltedPasswords::default();
        cache.put(b"a", 4096, [1; 32]);
        assert_eq!(cache.get(b"a", 4096), Some([1; 32]));
        assert_eq!(cache.get(b"a", 4097), None);
        assert_eq!(cache.get(b"b", 4096), None);
        for i in 0..SALTED_ENTRIES as u32 {
            cache.put(b"x", i + 1, [2; 32]);
        }
        // The oldest entry made room.
        assert_eq!(cache.get(b"a", 4096), None);
        assert_eq!(cache.get(b"x", 1), Some([2; 32]));
    }
}
