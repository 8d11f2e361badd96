//! From accept() to a logged-in relay: TLS, startup, client authentication,
//! upstream login, then the relay, then the session's last audit record.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use rand::RngCore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::client_auth::{ScramServer, Verifier};
use super::event_loop::Handoff;
use super::relay::{End, Relay};
use super::stream::{read_frame, ClientConn, Conn};
use super::upstream::{self, UpstreamError};
use super::{CancelTarget, ClientAuth, Shared};
use crate::audit::{Actor, Record, RecordBody, SessionInfo, Source, Target};
use crate::policy::{Decision, Who};
use crate::sql::PINNED_SETTINGS;
use crate::wire::backend::{self, INSUFFICIENT_PRIVILEGE};
use crate::wire::startup::{self, Startup, StartupPacket, MAX_STARTUP_LEN};
use crate::wire::{frontend as fe, Cursor, DecodeError, Frame, FrameSplitter};

const PROTOCOL_VIOLATION: &str = "08P01";
const INVALID_PASSWORD: &str = "28P01";
const INVALID_AUTHORIZATION: &str = "28000";
const CANNOT_CONNECT: &str = "08001";
const REJECTED_CONNECTION: &str = "08004";
/// What PostgreSQL itself sends when it shuts down under its clients.
const ADMIN_SHUTDOWN: &str = "57P01";

#[derive(Debug, thiserror::Error)]
enum StartupError {
    #[error("client closed the connection during startup")]
    Closed,
    #[error("startup I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid startup packet: {0}")]
    Invalid(String),
    #[error("TLS handshake with the client failed: {0}")]
    Tls(std::io::Error),
}

impl From<DecodeError> for StartupError {
    fn from(e: DecodeError) -> Self {
        StartupError::Invalid(e.to_string())
    }
}

fn session_id() -> String {
    let mut id = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut id);
    id.iter().map(|b| format!("{b:02x}")).collect()
}

pub async fn handle(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    // What the kernel says, read before anything the client sends.
    let kernel = shared.intercept.as_ref().map(|i| i.facts(&tcp, peer));
    let original = kernel.as_ref().and_then(|k| k.original_dst);
    let Some(upstream_addr) = shared
        .upstream
        .addr
        .clone()
        .or_else(|| original.map(|o| o.to_string()))
    else {
        let mut tcp = tcp;
        tracing::warn!(%peer, "connection without an original destination and no --upstream");
        fatal(
            &mut tcp,
            CANNOT_CONNECT,
            "agentgate: this connection was not redirected by the probes and no upstream is configured",
        )
        .await;
        return;
    };
    let (mut client, startup) = match negotiate(tcp, &shared).await {
        Ok(Some(c)) => c,
        Ok(None) => return,
        Err(StartupError::Closed) => return,
        Err(e) => {
            tracing::info!(%peer, error = %e, "client startup failed");
            return;
        }
    };
    let user = startup.get("user").unwrap_or_default().to_owned();
    let database = startup
        .get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(&user)
        .to_owned();
    let mut info = SessionInfo {
        session: session_id(),
        actor: Actor {
            user: user.clone(),
            auth: match shared.client_auth {
                ClientAuth::Trust => "trust",
                ClientAuth::Scram(_) => "scram-sha-256",
            },
            application_name: startup.get("application_name").map(str::to_owned),
            kernel: kernel.as_ref().and_then(|k| k.identity.clone()),
        },
        source: Source {
            addr: peer.to_string(),
            tls: client.is_tls(),
        },
        target: Target {
            addr: upstream_addr.clone(),
            original_dst: original.map(|o| o.to_string()),
            database: database.clone(),
            user: shared.upstream.user.clone(),
            backend_pid: None,
        },
        json: Default::default(),
    };

    if let Some(refusal) = refuse(&startup) {
        let (code, message) = refusal;
        fatal(&mut client, code, &message).await;
        refused(&shared, info, message).await;
        return;
    }

    let mut buf = BytesMut::with_capacity(8192);
    if let ClientAuth::Scram(agents) = &shared.client_auth {
        let verifier = agents
            .verifier(&user)
            .cloned()
            .unwrap_or_else(Verifier::impossible);
        if let Err(reason) = scram_exchange(&mut client, &mut buf, verifier).await {
            let message = format!("password authentication failed for user \"{user}\"");
            fatal(&mut client, INVALID_PASSWORD, &message).await;
            refused(
                &shared,
                info,
                format!("client authentication failed: {reason}"),
            )
            .await;
            return;
        }
    }

    let ident = kernel.as_ref().and_then(|k| k.identity.as_ref());
    let who = Who {
        agent: matches!(shared.client_auth, ClientAuth::Scram(_)).then(|| user.clone()),
        client_addr: Some(peer.ip()),
        uid: ident.map(|k| k.uid),
        gid: ident.map(|k| k.gid),
        comm: ident.map(|k| k.comm.clone()),
        cgroup: ident.and_then(|k| k.cgroup.clone()),
        startup_user: user.clone(),
        database: database.clone(),
    };

    // Everything the client asked for goes upstream, but the gateway logs in
    // as itself.
    let mut params: Vec<(&str, &str)> = vec![
        ("user", shared.upstream.user.as_str()),
        ("database", database.as_str()),
    ];
    params.extend(
        startup
            .params
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "user" | "database" | "replication"))
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    let up =
        match upstream::connect(&shared.upstream, &upstream_addr, startup.version, &params).await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(session = %info.session, error = %e, "upstream login failed");
                match (&e, e.is_credentials()) {
                    (UpstreamError::Server { frame, .. }, false) => {
                        let _ = client.write_all(frame.as_bytes()).await;
                    }
                    (_, true) => {
                        fatal(
                            &mut client,
                            REJECTED_CONNECTION,
                            "agentgate: the database refused the gateway's credentials",
                        )
                        .await
                    }
                    _ => {
                        fatal(
                            &mut client,
                            CANNOT_CONNECT,
                            &format!("agentgate: cannot reach the database: {e}"),
                        )
                        .await
                    }
                }
                refused(&shared, info, format!("upstream: {e}")).await;
                return;
            }
        };

    let minted = shared.cancel.register(CancelTarget {
        addr: upstream_addr.clone(),
        pid: up.pid,
        key: up.key,
    });
    info.target.backend_pid = Some(up.pid);
    let info = Arc::new(info);
    let started = Instant::now();
    let mut hello = BytesMut::new();
    backend::put_frame(&mut hello, &backend::authentication_ok());
    for f in &up.greeting {
        backend::put_frame(&mut hello, f);
    }
    backend::put_frame(&mut hello, &backend::backend_key_data(up.pid, minted));
    backend::put_frame(&mut hello, &up.ready);
    let _ = shared
        .audit
        .emit(Record::new(
            "session.start",
            Arc::clone(&info),
            RecordBody::Empty {},
        ))
        .await;

    let end = if let Err(e) = async {
        client.write_all(&hello).await?;
        client.flush().await
    }
    .await
    {
        End::Io(format!("writing to the client: {e}"))
    } else {
        let relay = Arc::new(Relay::new(Arc::clone(&shared), Arc::clone(&info)));
        let end = match (client, up.conn) {
            // Plain TCP both ways (the common case): on a relay loop.
            (Conn::Plain(c), Conn::Plain(u)) => {
                relay_on_loop(&relay, c, u, (buf, up.buf), who).await
            }
            (client, conn) => {
                let c = tokio::io::split(client);
                let u = tokio::io::split(conn);
                relay_both_ways(&relay, c, u, (buf, up.buf), who).await
            }
        };
        relay.abandon().await;
        tracing::debug!(session = %info.session, reason = %end.describe(), "session ended");
        let statements = relay.statements_audited();
        shared.cancel.unregister(up.pid, minted);
        emit_end(&shared, &info, statements, started, end.describe()).await;
        return;
    };
    shared.cancel.unregister(up.pid, minted);
    emit_end(&shared, &info, 0, started, end.describe()).await;
}

/// Relays a plain-TCP session on one of the relay loops until it ends (or,
/// at shutdown, until it rests between transactions), then says the
/// goodbyes with the sockets it gets back.
async fn relay_on_loop(
    relay: &Arc<Relay>,
    client: TcpStream,
    upstream: TcpStream,
    (client_buf, upstream_buf): (BytesMut, BytesMut),
    who: Who,
) -> End {
    let (client, upstream) = match (client.into_std(), upstream.into_std()) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => return End::Io(format!("relay loop: {e}")),
    };
    let (returned, back) = tokio::sync::oneshot::channel();
    let ticket = relay.shared.relay_loops.hand_over(Handoff {
        relay: Arc::clone(relay),
        client,
        upstream,
        client_buf,
        upstream_buf,
        who,
        returned,
    });
    tokio::pin!(back);
    let returned = tokio::select! {
        r = &mut back => r,
        () = drained(relay) => {
            ticket.stop();
            back.await
        }
    };
    let Ok(mut r) = returned else {
        return End::Io("relay loop stopped".into());
    };
    let _ = relay.emit(&mut r.done).await;
    let (cw, uw) = match (
        TcpStream::from_std(r.client),
        TcpStream::from_std(r.upstream),
    ) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => return End::Io(format!("relay loop: {e}")),
    };
    goodbye(r.end, Some(cw), Some(uw), (r.to_client, r.to_upstream)).await
}

/// Runs both directions of a logged-in TLS session until one ends (or, at
/// shutdown, until it rests between transactions), then says the goodbyes.
///
/// Each direction is its own task, so a message arriving on one socket
/// wakes only the code that reads it (one task selecting over both would
/// poll the idle socket on every wake-up). The first to end stops the other,
/// which hands its socket halves back for the goodbyes.
async fn relay_both_ways<CR, CW, UR, UW>(
    relay: &Arc<Relay>,
    (cr, cw): (CR, CW),
    (ur, uw): (UR, UW),
    (client_buf, upstream_buf): (BytesMut, BytesMut),
    who: Who,
) -> End
where
    CR: AsyncRead + Unpin + Send + 'static,
    CW: AsyncWrite + Unpin + Send + 'static,
    UR: AsyncRead + Unpin + Send + 'static,
    UW: AsyncWrite + Unpin + Send + 'static,
{
    let (stop_front, front_stopped) = tokio::sync::oneshot::channel::<()>();
    let (stop_back, back_stopped) = tokio::sync::oneshot::channel::<()>();
    let r = Arc::clone(relay);
    let mut front = tokio::spawn(async move {
        let (mut cr, mut uw) = (cr, uw);
        let end = tokio::select! {
            biased;
            _ = front_stopped => None,
            end = r.frontend(&mut cr, &mut uw, client_buf, who) => Some(end),
        };
        (end, uw)
    });
    let r = Arc::clone(relay);
    let mut back = tokio::spawn(async move {
        let (mut ur, mut cw) = (ur, cw);
        let end = tokio::select! {
            biased;
            _ = back_stopped => None,
            end = r.backend(&mut ur, &mut cw, upstream_buf) => Some(end),
        };
        (end, cw)
    });
    let lost = |e: tokio::task::JoinError| End::Io(format!("relay task failed: {e}"));
    // The direction that ended first says why the session ends, unless the
    // gateway is shutting down.
    let (end, cw, uw) = tokio::select! {
        () = drained(relay) => {
            let _ = stop_front.send(());
            let _ = stop_back.send(());
            let uw = front.await.ok().map(|f| f.1);
            let cw = back.await.ok().map(|b| b.1);
            (Some(End::Shutdown), cw, uw)
        }
        f = &mut front => {
            let _ = stop_back.send(());
            let cw = back.await.ok().map(|b| b.1);
            match f {
                Ok((end, uw)) => (end, cw, Some(uw)),
                Err(e) => (Some(lost(e)), cw, None),
            }
        }
        b = &mut back => {
            let _ = stop_front.send(());
            let uw = front.await.ok().map(|f| f.1);
            match b {
                Ok((end, cw)) => (end, Some(cw), uw),
                Err(e) => (Some(lost(e)), None, uw),
            }
        }
    };
    let end = end.unwrap_or_else(|| End::Io("relay stopped".into()));
    goodbye(end, cw, uw, Default::default()).await
}

/// Returns once shutdown has begun and the session rests between
/// transactions (a rollout should not abort an agent's work), or the grace
/// has run out.
async fn drained(relay: &Relay) {
    relay.shared.shutdown.cancelled().await;
    let grace = relay.shared.shutdown_grace;
    if tokio::time::timeout(grace, relay.rested()).await.is_err() {
        tracing::warn!(
            session = %relay.info.session,
            "session still busy {}s after shutdown began: its statements in flight are cut",
            grace.as_secs()
        );
    }
}

/// How long the last words to a peer may take: one that does not read must
/// not keep the session from ending.
const GOODBYE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Tells the peers what they need to know as the session ends: what was
/// still on its way to them where it still matters (the database's last
/// error, the client's Terminate), a FATAL to a client that broke the
/// protocol or is cut at shutdown, a Terminate upstream when the client is
/// gone.
async fn goodbye<CW, UW>(
    end: End,
    cw: Option<CW>,
    uw: Option<UW>,
    (to_client, to_upstream): (BytesMut, BytesMut),
) -> End
where
    CW: AsyncWrite + Unpin,
    UW: AsyncWrite + Unpin,
{
    let fatal = match &end {
        End::Malformed(m) => Some((
            PROTOCOL_VIOLATION,
            format!("agentgate: invalid frontend message: {m}"),
        )),
        End::Shutdown => Some((
            ADMIN_SHUTDOWN,
            "agentgate: terminating connection because the gateway is shutting down".into(),
        )),
        _ => None,
    };
    let to_client = match (&end, fatal) {
        (End::ServerGone, _) => Some(to_client),
        (_, Some((code, msg))) => Some(backend::error_response("FATAL", code, &msg).into_buf()),
        _ => None,
    };
    let to_upstream = match &end {
        End::ClientTerminated => Some(to_upstream),
        // Say goodbye upstream so the backend ends at once.
        End::ClientGone | End::Malformed(_) | End::Io(_) | End::Shutdown => {
            Some(fe::terminate().into_buf())
        }
        End::ServerGone => None,
    };
    let words = async {
        if let (Some(bytes), Some(mut cw)) = (to_client, cw) {
            if !bytes.is_empty() {
                let _ = cw.write_all(&bytes).await;
                let _ = cw.flush().await;
            }
        }
        if let (Some(bytes), Some(mut uw)) = (to_upstream, uw) {
            if !bytes.is_empty() {
                let _ = uw.write_all(&bytes).await;
                let _ = uw.flush().await;
            }
        }
    };
    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, words).await;
    end
}

async fn emit_end(
    shared: &Shared,
    info: &Arc<SessionInfo>,
    statements: u64,
    started: Instant,
    reason: String,
) {
    let _ = shared
        .audit
        .emit(Record::new(
            "session.end",
            Arc::clone(info),
            RecordBody::SessionEnd {
                statements,
                duration_us: started.elapsed().as_micros() as u64,
                reason,
            },
        ))
        .await;
}

async fn refused(shared: &Shared, info: SessionInfo, reason: String) {
    let _ = shared
        .audit
        .emit(Record::new(
            "session.refused",
            Arc::new(info),
            RecordBody::SessionRefused { reason },
        ))
        .await;
}

/// Startup parameters the gateway refuses outright.
fn refuse(startup: &Startup) -> Option<(&'static str, String)> {
    if startup.get("user").is_none_or(str::is_empty) {
        return Some((
            INVALID_AUTHORIZATION,
            "no PostgreSQL user name specified in startup packet".into(),
        ));
    }
    if let Some(v) = startup.get("replication") {
        if !matches!(
            v.to_ascii_lowercase().as_str(),
            "false" | "off" | "no" | "0"
        ) {
            return Some((
                INSUFFICIENT_PRIVILEGE,
                Decision::replication().client_message(),
            ));
        }
    }
    if let Some(setting) = pinned_startup_setting(startup) {
        let d = Decision::pinned_setting(&format!("the startup setting {setting}"));
        return Some((INSUFFICIENT_PRIVILEGE, d.client_message()));
    }
    None
}

async fn fatal<W: AsyncWrite + Unpin>(w: &mut W, code: &str, message: &str) {
    let _ = w
        .write_all(backend::error_response("FATAL", code, message).as_bytes())
        .await;
    let _ = w.flush().await;
}

/// Reads one untagged startup-phase packet.
async fn read_startup<R: AsyncRead + Unpin>(r: &mut R) -> Result<StartupPacket, StartupError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(StartupError::Closed)
        }
        Err(e) => return Err(e.into()),
    }
    let len = i32::from_be_bytes(len);
    let len = usize::try_from(len)
        .ok()
        .filter(|l| (8..=MAX_STARTUP_LEN).contains(l))
        .ok_or_else(|| StartupError::Invalid(format!("length {len}")))?;
    let mut body = vec![0u8; len - 4];
    r.read_exact(&mut body).await?;
    Ok(startup::decode(&body)?)
}

/// SSL/GSS negotiation and the startup packet. `None` when the connection
/// was a cancel request.
async fn negotiate(
    mut tcp: TcpStream,
    shared: &Shared,
) -> Result<Option<(ClientConn, Startup)>, StartupError> {
    let mut ssl_done = false;
    let mut gss_done = false;
    loop {
        let packet = match read_startup(&mut tcp).await {
            Ok(p) => p,
            Err(StartupError::Invalid(m)) => {
                fatal(
                    &mut tcp,
                    PROTOCOL_VIOLATION,
                    &format!("agentgate: invalid startup packet: {m}"),
                )
                .await;
                return Err(StartupError::Invalid(m));
            }
            Err(e) => return Err(e),
        };
        match packet {
            StartupPacket::SslRequest if !ssl_done => {
                ssl_done = true;
                if let Some(acceptor) = &shared.client_tls {
                    tcp.write_all(b"S").await?;
                    let tls = acceptor.accept(tcp).await.map_err(StartupError::Tls)?;
                    let mut conn = Conn::Tls(Box::new(tls));
                    // libpq 17 sends cancel requests over TLS too.
                    return match read_startup(&mut conn).await? {
                        StartupPacket::Startup(s) => Ok(Some((conn, s))),
                        StartupPacket::Cancel { pid, key } => {
                            cancel(shared, pid, key).await;
                            Ok(None)
                        }
                        _ => Err(StartupError::Invalid(
                            "expected a startup message after TLS".into(),
                        )),
                    };
                }
                tcp.write_all(b"N").await?;
            }
            StartupPacket::GssEncRequest if !gss_done => {
                gss_done = true;
                tcp.write_all(b"N").await?;
            }
            StartupPacket::Cancel { pid, key } => {
                cancel(shared, pid, key).await;
                return Ok(None);
            }
            StartupPacket::Startup(s) => return Ok(Some((Conn::Plain(tcp), s))),
            _ => {
                let m = "encryption was already negotiated";
                fatal(&mut tcp, PROTOCOL_VIOLATION, m).await;
                return Err(StartupError::Invalid(m.into()));
            }
        }
    }
}

async fn cancel(shared: &Shared, pid: i32, key: i32) {
    // As in PostgreSQL, a cancel request gets no answer either way.
    match shared.cancel.lookup(pid, key) {
        Some(t) => {
            if let Err(e) =
                upstream::cancel(&t.addr, t.pid, t.key, shared.upstream.connect_timeout).await
            {
                tracing::warn!(pid, error = %e, "forwarding cancel request failed");
            }
        }
        None => tracing::info!(pid, "cancel request with an unknown key ignored"),
    }
}

const SASL_CONTINUE: i32 = 11;
const SASL_FINAL: i32 = 12;
const SASL: i32 = 10;

/// The server side of SCRAM-SHA-256 with the client.
async fn scram_exchange(
    client: &mut ClientConn,
    buf: &mut BytesMut,
    verifier: Verifier,
) -> Result<(), String> {
    let splitter = FrameSplitter::new(MAX_STARTUP_LEN);
    let send = |f: Frame| f.into_buf();
    let mut mechanisms = Vec::from(&b"SCRAM-SHA-256\0\0"[..]);
    client
        .write_all(&send(backend::authentication(SASL, &mechanisms)))
        .await
        .map_err(|e| e.to_string())?;
    mechanisms.clear();
    let first = expect_password(client, buf, splitter).await?;
    let client_first = {
        let mut c = Cursor::new(fe::PASSWORD, first.body());
        let mech = c.cstr().map_err(|e| e.to_string())?;
        if mech != "SCRAM-SHA-256" {
            return Err(format!("unsupported mechanism {mech:?}"));
        }
        let len = c.i32().map_err(|e| e.to_string())?;
        let data = c.bytes(usize::try_from(len).map_err(|_| "no initial response")?);
        let data = data.map_err(|e| e.to_string())?.to_vec();
        c.finish().map_err(|e| e.to_string())?;
        data
    };
    let (server, server_first) =
        ScramServer::start(verifier, &client_first).map_err(|e| e.to_string())?;
    client
        .write_all(&send(backend::authentication(
            SASL_CONTINUE,
            server_first.as_bytes(),
        )))
        .await
        .map_err(|e| e.to_string())?;
    let last = expect_password(client, buf, splitter).await?;
    let server_final = server.finish(last.body()).map_err(|e| e.to_string())?;
    client
        .write_all(&send(backend::authentication(
            SASL_FINAL,
            server_final.as_bytes(),
        )))
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

async fn expect_password(
    client: &mut ClientConn,
    buf: &mut BytesMut,
    splitter: FrameSplitter,
) -> Result<Frame, String> {
    client.flush().await.map_err(|e| e.to_string())?;
    let f = read_frame(client, buf, splitter)
        .await
        .map_err(|e| e.to_string())?;
    if f.tag() != fe::PASSWORD {
        return Err(format!(
            "expected a password message, got '{}'",
            f.tag().escape_ascii()
        ));
    }
    Ok(f)
}

/// The values the gateway parses with; a client may send them, but no other.
fn pinned_value_ok(name: &str, value: &str) -> bool {
    let v = value
        .trim()
        .trim_matches('\'')
        .to_ascii_lowercase()
        .replace(['-', '_'], "");
    match name {
        "client_encoding" => matches!(v.as_str(), "utf8" | "unicode"),
        "standard_conforming_strings" => matches!(v.as_str(), "on" | "true" | "yes" | "1"),
        "backslash_quote" => matches!(v.as_str(), "safeencoding"),
        _ => true,
    }
}

/// A pinned setting the client tries to set at startup, directly or through
/// `options` (`-c name=value` or `--name=value`, as PGOPTIONS sends them).
fn pinned_startup_setting(startup: &Startup) -> Option<String> {
    let norm = |n: &str| n.trim().to_ascii_lowercase().replace('-', "_");
    for (k, v) in &startup.params {
        let k = norm(k);
        if PINNED_SETTINGS.contains(&k.as_str()) && !pinned_value_ok(&k, v) {
            return Some(k);
        }
    }
    let options = startup.get("options")?;
    // Arguments are separated by spaces; a backslash escapes the next byte.
    let mut args = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    args.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        args.push(cur);
    }
    let mut i = 0;
    while i < args.len() {
        let setting = if args[i] == "-c" {
            i += 1;
            args.get(i).cloned()
        } else if let Some(rest) = args[i].strip_prefix("-c") {
            Some(rest.to_owned())
        } else {
            args[i].strip_prefix("--").map(str::to_owned)
        };
        if let Some((name, value)) = setting.as_deref().and_then(|s| s.split_once('=')) {
            let name = norm(name);
            if PINNED_SETTINGS.contains(&name.as_str()) && !pinned_value_ok(&name, value) {
                return Some(name);
            }
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(params: &[(&str, &str)]) -> Startup {
        Startup {
            version: 196608,
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn pinned_settings_at_startup() {
        assert_eq!(
            pinned_startup_setting(&startup(&[("client_encoding", "UTF8")])),
            None
        );
        assert!(pinned_startup_setting(&startup(&[("client_encoding", "LATIN1")])).is_some());
        for opts in [
            "-c standard_conforming_strings=off",
            "-cstandard_conforming_strings=off",
            "--standard-conforming-strings=off",
            "-c statement_timeout=5s -c client_encoding=SQL_ASCII",
        ] {
            assert!(
                pinned_startup_setting(&startup(&[("options", opts)])).is_some(),
                "{opts}"
            );
        }
        assert_eq!(
            pinned_startup_setting(&startup(&[("options", "-c statement_timeout=5s")])),
            None
        );
    }
}
