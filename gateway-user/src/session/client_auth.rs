//! Authenticating agents to the gateway by SCRAM-SHA-256 (RFC 5802/7677),
//! the same exchange PostgreSQL runs, so every driver supports it. The
//! agent's secret is the gateway's, never the database's.

use std::collections::HashMap;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::scram::{constant_time_eq, hmac};

use crate::config::{read_secret, AgentEntry, ConfigError};

/// What the gateway stores for one agent: never the secret itself.
#[derive(Clone)]
pub struct Verifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifierError {
    #[error(
        "not a SCRAM-SHA-256 verifier (want SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>)"
    )]
    Format,
}

impl Verifier {
    /// Parses PostgreSQL's stored form.
    pub fn parse(s: &str) -> Result<Self, VerifierError> {
        let rest = s
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(VerifierError::Format)?;
        let (iter_salt, keys) = rest.split_once('$').ok_or(VerifierError::Format)?;
        let (iter, salt) = iter_salt.split_once(':').ok_or(VerifierError::Format)?;
        let (stored, server) = keys.split_once(':').ok_or(VerifierError::Format)?;
        let key = |k: &str| -> Result<[u8; 32], VerifierError> {
            B64.decode(k)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or(VerifierError::Format)
        };
        Ok(Self {
            iterations: iter.parse().map_err(|_| VerifierError::Format)?,
            salt: B64.decode(salt).map_err(|_| VerifierError::Format)?,
            stored_key: key(stored)?,
            server_key: key(server)?,
        })
    }

    /// A verifier for a plaintext secret, with a fresh salt.
    pub fn from_secret(secret: &str) -> Self {
        let stored = postgres_protocol::password::scram_sha_256(secret.as_bytes());
        // The library's own output always parses.
        Self::parse(&stored).unwrap_or_else(|_| Self::impossible())
    }

    /// A verifier no proof can match, used for unknown agents so that the
    /// exchange looks the same whether or not the name exists.
    pub fn impossible() -> Self {
        let mut salt = vec![0u8; 16];
        let mut stored_key = [0u8; 32];
        let mut server_key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut salt);
        rand::thread_rng().fill_bytes(&mut stored_key);
        rand::thread_rng().fill_bytes(&mut server_key);
        Self {
            iterations: 4096,
            salt,
            stored_key,
            server_key,
        }
    }
}

/// The agents allowed to log in, by name.
#[derive(Clone, Default)]
pub struct AgentRegistry {
    agents: HashMap<String, Verifier>,
}

impl AgentRegistry {
    pub fn load(entries: &[AgentEntry]) -> Result<Self, ConfigError> {
        let mut agents = HashMap::new();
        for e in entries {
            let verifier = match (&e.password_file, &e.scram_verifier) {
                (Some(path), None) => {
                    Verifier::from_secret(&read_secret("agent password file", path)?)
                }
                (None, Some(v)) => Verifier::parse(v)
                    .map_err(|err| ConfigError::Conflict(format!("agent {:?}: {err}", e.name)))?,
                _ => {
                    return Err(ConfigError::Conflict(format!(
                        "agent {:?}: give exactly one of password_file and scram_verifier",
                        e.name
                    )))
                }
            };
            agents.insert(e.name.clone(), verifier);
        }
        Ok(Self { agents })
    }

    pub fn verifier(&self, name: &str) -> Option<&Verifier> {
        self.agents.get(name)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("client asked for SASL mechanism {0:?}; only SCRAM-SHA-256 is offered")]
    Mechanism(String),
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("proof does not match")]
    BadProof,
}

/// The server side of one SCRAM exchange.
pub struct ScramServer {
    verifier: Verifier,
    client_first_bare: String,
    server_first: String,
    gs2_header: String,
    nonce: String,
}

impl ScramServer {
    /// Takes the client-first message, returns the server-first message.
    pub fn start(verifier: Verifier, client_first: &[u8]) -> Result<(Self, String), ScramError> {
        let msg =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (cbind, rest) = msg
            .split_once(',')
            .ok_or(ScramError::Malformed("no GS2 header"))?;
        match cbind {
            "n" | "y" => {}
            _ if cbind.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed("bad channel binding flag")),
        }
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(ScramError::Malformed("no GS2 header"))?;
        if !authzid.is_empty() {
            return Err(ScramError::Malformed(
                "authorization identity not supported",
            ));
        }
        let mut client_nonce = None;
        for attr in bare.split(',') {
            if let Some(r) = attr.strip_prefix("r=") {
                client_nonce = Some(r);
            } else if attr.starts_with("m=") {
                return Err(ScramError::Malformed("extensions not supported"));
            }
        }
        let client_nonce = client_nonce.ok_or(ScramError::Malformed("no nonce"))?;
        if client_nonce.is_empty()
            || !client_nonce
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Err(ScramError::Malformed("invalid nonce"));
        }
        let mut ours = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut ours);
        let nonce = format!("{client_nonce}{}", B64.encode(ours));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        let gs2_header = format!("{cbind},{authzid},");
        Ok((
            Self {
                verifier,
                client_first_bare: bare.to_owned(),
                server_first: server_first.clone(),
                gs2_header,
                nonce,
            },
            server_first,
        ))
    }

    /// Checks the client-final message; on success returns server-final.
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramError> {
        let msg =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let mut channel = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                channel = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            }
        }
        if channel != Some(B64.encode(self.gs2_header.as_bytes()).as_str()) {
            return Err(ScramError::Malformed("channel binding data does not match"));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("bad proof encoding"))?;
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ client_signature[i];
        }
        let computed: [u8; 32] = Sha256::digest(client_key).into();
        if !constant_time_eq(&computed, &self.verifier.stored_key) {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn exchange(secret: &str, tried: &str) -> Result<(), ScramError> {
        let verifier = Verifier::from_secret(secret);
        let mut client = ScramSha256::new(tried.as_bytes(), ChannelBinding::unsupported());
        let (server, first) = ScramServer::start(verifier, client.message())?;
        client.update(first.as_bytes()).unwrap();
        let last = server.finish(client.message())?;
        client.finish(last.as_bytes()).unwrap();
        Ok(())
    }

    #[test]
    fn a_real_scram_client_logs_in_with_the_right_secret_only() {
        assert_eq!(exchange("s3cret", "s3cret"), Ok(()));
        assert_eq!(exchange("s3cret", "wrong"), Err(ScramError::BadProof));
    }

    #[test]
    fn rejects_malformed_messages() {
        let v = Verifier::impossible();
        assert!(ScramServer::start(v.clone(), b"x").is_err());
        assert!(ScramServer::start(v.clone(), b"p=tls-server-end-point,,n=,r=abc").is_err());
        assert!(ScramServer::start(v, b"n,,n=,r=").is_err());
        assert!(Verifier::parse("md5abc").is_err());
    }
}
