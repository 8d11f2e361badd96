//! Logging in to the database with the gateway's own credentials.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::SCRAM_SHA_256;
use postgres_protocol::message::frontend as pgfe;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::scram::{salted_password, SaltedPasswords, ScramClient, ScramClientError};
use super::stream::{read_frame, Conn, ReadError, UpstreamConn};
use crate::wire::backend::{self, ErrorFields};
use crate::wire::startup::{encode_request, encode_startup, SSL_REQUEST_CODE};
use crate::wire::{Frame, FrameSplitter};

/// How to reach and log in to the database.
#[derive(Clone)]
pub struct UpstreamSettings {
    /// The configured database; in intercept mode, the fallback when a
    /// connection carries no original destination (or the pinned target).
    pub addr: Option<String>,
    pub user: String,
    pub password: Option<String>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub connect_timeout: Duration,
    /// The password salted for each server salt seen (shared by clones).
    pub salted: Arc<SaltedPasswords>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connecting to {addr} timed out")]
    Timeout { addr: String },
    #[error("the database at {addr} does not offer TLS, and TLS is required")]
    TlsRefused { addr: String },
    #[error("TLS handshake with {addr} failed: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("the database asks for a password and none is configured")]
    NoPassword,
    #[error("the database asks for authentication method {0}, which the gateway does not support")]
    UnsupportedAuth(i32),
    #[error(
        "the server at {addr} asks for {what}; the gateway answers that only to its configured \
         --upstream, not to a destination an agent connected to (it could be the agent's own \
         server, collecting the password or what it takes to guess it)"
    )]
    UntrustedAsks { addr: String, what: String },
    #[error("SCRAM exchange with the database failed: {0}")]
    Scram(#[from] ScramClientError),
    /// The server answered with an ErrorResponse; the frame is kept so it can
    /// be passed on as the server sent it.
    #[error("the database refused the connection: {} ({})", .fields.message, .fields.code)]
    Server { fields: ErrorFields, frame: Frame },
    #[error("protocol error from the database: {0}")]
    Protocol(String),
    #[error("reading from the database: {0}")]
    Read(#[from] ReadError),
    #[error("writing to the database: {0}")]
    Write(#[from] std::io::Error),
}

impl UpstreamError {
    /// True when the failure is about the gateway's own credentials, which the
    /// client must not learn details of.
    pub fn is_credentials(&self) -> bool {
        match self {
            UpstreamError::Server { fields, .. } => fields.code.starts_with("28"),
            UpstreamError::NoPassword
            | UpstreamError::UnsupportedAuth(_)
            | UpstreamError::UntrustedAsks { .. }
            | UpstreamError::Scram(_) => true,
            _ => false,
        }
    }
}

/// A logged-in upstream connection, positioned after its first ReadyForQuery.
pub struct Upstream {
    pub conn: UpstreamConn,
    /// Bytes read past the first ReadyForQuery (normally none).
    pub buf: BytesMut,
    pub pid: i32,
    pub key: i32,
    /// ParameterStatus, NoticeResponse and NegotiateProtocolVersion frames to
    /// pass to the client, in the order the server sent them.
    pub greeting: Vec<Frame>,
    pub ready: Frame,
}

/// The splitter for backend messages: rows may be as large as PostgreSQL
/// allows (1 GiB), which the client-side cap must not limit.
pub fn backend_splitter() -> FrameSplitter {
    FrameSplitter::new(1 << 30)
}

pub async fn connect(
    settings: &UpstreamSettings,
    addr: &str,
    version: i32,
    params: &[(&str, &str)],
) -> Result<Upstream, UpstreamError> {
    let addr = addr.to_owned();
    let tcp = tokio::time::timeout(settings.connect_timeout, TcpStream::connect(&addr))
        .await
        .map_err(|_| UpstreamError::Timeout { addr: addr.clone() })?
        .map_err(|source| UpstreamError::Connect {
            addr: addr.clone(),
            source,
        })?;
    tcp.set_nodelay(true)?;
    let mut conn = match &settings.tls {
        None => Conn::Plain(tcp),
        Some(config) => Conn::Tls(Box::new(start_tls(tcp, config, &addr).await?)),
    };
    conn.write_all(&encode_startup(version, params)).await?;
    let mut buf = BytesMut::with_capacity(8192);
    let splitter = backend_splitter();
    // A destination the gateway was not configured with came from the
    // agent (its original destination, in intercept mode): a server there
    // may be the agent's own.
    let chosen_by_agent = settings.addr.as_deref() != Some(addr.as_str());
    authenticate(
        &mut conn,
        &mut buf,
        splitter,
        settings,
        &addr,
        chosen_by_agent,
    )
    .await?;

    let mut greeting = Vec::new();
    let mut pid_key = None;
    loop {
        let frame = read_frame(&mut conn, &mut buf, splitter).await?;
        match frame.tag() {
            backend::BACKEND_KEY_DATA => {
                pid_key = Some(
                    backend::decode_backend_key_data(frame.body())
                        .map_err(|e| UpstreamError::Protocol(e.to_string()))?,
                );
            }
            backend::READY_FOR_QUERY => {
                let (pid, key) = pid_key.ok_or_else(|| {
                    UpstreamError::Protocol("no BackendKeyData before ReadyForQuery".into())
                })?;
                return Ok(Upstream {
                    conn,
                    buf,
                    pid,
                    key,
                    greeting,
                    ready: frame,
                });
            }
            backend::ERROR_RESPONSE => return Err(server_error(frame)),
            backend::PARAMETER_STATUS
            | backend::NOTICE_RESPONSE
            | backend::NEGOTIATE_PROTOCOL_VERSION => greeting.push(frame),
            other => {
                return Err(UpstreamError::Protocol(format!(
                    "unexpected message '{}' during startup",
                    other as char
                )))
            }
        }
    }
}

async fn start_tls(
    mut tcp: TcpStream,
    config: &Arc<rustls::ClientConfig>,
    addr: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, UpstreamError> {
    tcp.write_all(&encode_request(SSL_REQUEST_CODE, &[]))
        .await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    if answer[0] != b'S' {
        return Err(UpstreamError::TlsRefused { addr: addr.into() });
    }
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| UpstreamError::Protocol(format!("invalid server name {host:?}: {e}")))?;
    tokio_rustls::TlsConnector::from(Arc::clone(config))
        .connect(name, tcp)
        .await
        .map_err(|source| UpstreamError::Tls {
            addr: addr.into(),
            source,
        })
}

fn server_error(frame: Frame) -> UpstreamError {
    match backend::decode_error_fields(frame.tag(), frame.body()) {
        Ok(fields) => UpstreamError::Server { fields, frame },
        Err(e) => UpstreamError::Protocol(e.to_string()),
    }
}

const AUTH_OK: i32 = 0;
const AUTH_CLEARTEXT: i32 = 3;
const AUTH_MD5: i32 = 5;
const AUTH_SASL: i32 = 10;
const AUTH_SASL_CONTINUE: i32 = 11;
const AUTH_SASL_FINAL: i32 = 12;

/// What a destination an agent chose may ask of SCRAM: at least
/// PostgreSQL's default, and at most what salts in well under a second.
const AGENT_CHOSEN_SCRAM_ITERATIONS: std::ops::RangeInclusive<u32> = 4096..=1_000_000;

async fn authenticate(
    conn: &mut UpstreamConn,
    buf: &mut BytesMut,
    splitter: FrameSplitter,
    settings: &UpstreamSettings,
    addr: &str,
    chosen_by_agent: bool,
) -> Result<(), UpstreamError> {
    let mut scram: Option<ScramClient> = None;
    loop {
        let frame = read_frame(conn, buf, splitter).await?;
        match frame.tag() {
            backend::AUTHENTICATION => {}
            backend::ERROR_RESPONSE => return Err(server_error(frame)),
            backend::NEGOTIATE_PROTOCOL_VERSION | backend::NOTICE_RESPONSE => continue,
            other => {
                return Err(UpstreamError::Protocol(format!(
                    "unexpected message '{}' during authentication",
                    other as char
                )))
            }
        }
        let (code, payload) = backend::decode_authentication(frame.body())
            .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        let password = || {
            settings
                .password
                .as_deref()
                .ok_or(UpstreamError::NoPassword)
        };
        let mut out = BytesMut::new();
        match code {
            AUTH_OK => {
                // A server that ends SCRAM without its final message has not
                // proved it knows the password: not the database we meant.
                if scram.as_ref().is_some_and(|s| !s.verified()) {
                    return Err(ScramClientError::Malformed(
                        "the server skipped its signature and accepted the login",
                    )
                    .into());
                }
                return Ok(());
            }
            // The password itself, or an MD5 hash cheap to guess it from,
            // goes only to the server the gateway is configured with, never
            // to one an agent pointed it at.
            AUTH_CLEARTEXT | AUTH_MD5 if chosen_by_agent => {
                return Err(UpstreamError::UntrustedAsks {
                    addr: addr.into(),
                    what: if code == AUTH_MD5 {
                        "an MD5 password hash".into()
                    } else {
                        "the password in cleartext".into()
                    },
                });
            }
            AUTH_CLEARTEXT => pgfe::password_message(password()?.as_bytes(), &mut out)?,
            AUTH_MD5 => {
                let salt: [u8; 4] = payload
                    .try_into()
                    .map_err(|_| UpstreamError::Protocol("MD5 salt is not 4 bytes".into()))?;
                let hash = postgres_protocol::authentication::md5_hash(
                    settings.user.as_bytes(),
                    password()?.as_bytes(),
                    salt,
                );
                pgfe::password_message(hash.as_bytes(), &mut out)?;
            }
            AUTH_SASL => {
                let offers_scram = payload
                    .split(|&b| b == 0)
                    .any(|m| m == SCRAM_SHA_256.as_bytes());
                if !offers_scram {
                    return Err(UpstreamError::UnsupportedAuth(code));
                }
                password()?;
                let s = ScramClient::new();
                pgfe::sasl_initial_response(SCRAM_SHA_256, s.first_message().as_bytes(), &mut out)?;
                scram = Some(s);
            }
            AUTH_SASL_CONTINUE => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| UpstreamError::Protocol("SASL continue before start".into()))?;
                let challenge = s.challenge(payload)?;
                // A server an agent chose picks the iteration count: too few
                // make its copy of the proof cheap to guess the password
                // from, too many make each login a denial of service.
                if chosen_by_agent && !AGENT_CHOSEN_SCRAM_ITERATIONS.contains(&challenge.iterations)
                {
                    return Err(UpstreamError::UntrustedAsks {
                        addr: addr.into(),
                        what: format!(
                            "SCRAM with {} iterations (outside {}..={})",
                            challenge.iterations,
                            AGENT_CHOSEN_SCRAM_ITERATIONS.start(),
                            AGENT_CHOSEN_SCRAM_ITERATIONS.end()
                        ),
                    });
                }
                let salted = match settings.salted.get(&challenge.salt, challenge.iterations) {
                    Some(salted) => salted,
                    None => {
                        // Salting is thousands of HMAC rounds (about a
                        // millisecond): done off the relay thread, so a
                        // burst of first logins does not stall the sessions
                        // already relaying; kept, so later logins skip it.
                        let password = password()?.to_owned();
                        let (salt, iterations) = (challenge.salt.clone(), challenge.iterations);
                        let salted = tokio::task::spawn_blocking(move || {
                            salted_password(&password, &salt, iterations)
                        })
                        .await
                        .map_err(|e| {
                            UpstreamError::Protocol(format!("SCRAM computation failed: {e}"))
                        })?;
                        settings
                            .salted
                            .put(&challenge.salt, challenge.iterations, salted);
                        salted
                    }
                };
                let reply = s.respond(&challenge, &salted);
                pgfe::sasl_response(reply.as_bytes(), &mut out)?;
            }
            AUTH_SASL_FINAL => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| UpstreamError::Protocol("SASL final before start".into()))?;
                s.verify(payload)?;
                continue;
            }
            other => return Err(UpstreamError::UnsupportedAuth(other)),
        }
        conn.write_all(&out).await?;
    }
}

/// Sends a CancelRequest for `pid`/`key` to the database on a new connection.
pub async fn cancel(addr: &str, pid: i32, key: i32, timeout: Duration) -> std::io::Result<()> {
    let mut tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    tcp.write_all(&encode_request(
        crate::wire::startup::CANCEL_REQUEST_CODE,
        &[pid, key],
    ))
    .await?;
    // The server closes the connection when it has handled the request.
    let mut sink = [0u8; 16];
    let _ = tokio::time::timeout(timeout, tcp.read(&mut sink)).await;
    Ok(())
}
