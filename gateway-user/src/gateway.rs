//! Putting the rooms together for `agentgate run`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::runtime::Handle;

use crate::audit::AuditSink;
use crate::audit::{PolicyReloadRecord, Record, RecordBody, SessionInfo};
use crate::config::{ClientAuthMode, InterceptMode, Settings, UpstreamTls};
use crate::intercept::{self, AttachOptions, Attached, Interception};
use crate::policy::{PolicyStore, ReloadOutcome};
use crate::session::{
    self, tls, AgentRegistry, CancelRegistry, ClientAuth, RelayLoops, Shared, UpstreamSettings,
};
use crate::sql::AnalysisCache;

const ANALYSIS_CACHE_ENTRIES: usize = 16 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(10);
/// How long shutdown waits for sessions to end beyond the grace they get to
/// finish their work (those still logging in finish their login first).
const SESSION_DRAIN: Duration = Duration::from_secs(5);

/// `--worker-threads`: 0 is one per CPU.
fn relay_threads(setting: usize) -> usize {
    match setting {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Checks the settings and builds what sessions share. Fails before
/// anything listens, so a bad configuration never serves.
pub fn build(settings: &Settings) -> anyhow::Result<Arc<Shared>> {
    let policy = PolicyStore::open(settings.policy.as_deref())
        .map_err(|problems| anyhow::anyhow!("invalid policy: {}", problems.join("; ")))?;
    match policy.current().1 {
        Some(p) => tracing::info!(policy = %p.label, rules = p.rules.len(), "policy loaded"),
        None => tracing::warn!(
            "no --policy given: only the built-in rules apply, every other parsed statement is allowed"
        ),
    }
    let client_tls = match (&settings.tls_cert, &settings.tls_key) {
        (Some(cert), Some(key)) => Some(tokio_rustls::TlsAcceptor::from(tls::server_config(
            cert, key,
        )?)),
        _ => None,
    };
    let upstream_tls = match settings.upstream_tls {
        UpstreamTls::Disable => None,
        UpstreamTls::Require => Some(tls::client_config(None)?),
        UpstreamTls::VerifyFull => Some(tls::client_config(settings.upstream_ca.as_deref())?),
    };
    let client_auth = match settings.client_auth {
        ClientAuthMode::Trust => ClientAuth::Trust,
        ClientAuthMode::Password => ClientAuth::Scram(AgentRegistry::load(&settings.agents)?),
    };
    let audit = AuditSink::open(&settings.audit, settings.audit_buffer_bytes)?;
    let intercept = match settings.intercept {
        InterceptMode::None => None,
        InterceptMode::Ebpf => Some(start_interception(settings)?),
    };
    let upstream = UpstreamSettings {
        addr: settings.upstream.clone(),
        user: settings.upstream_user.clone(),
        password: settings.upstream_password.clone(),
        tls: upstream_tls,
        connect_timeout: CONNECT_TIMEOUT,
        salted: Default::default(),
    };
    Ok(Arc::new(Shared {
        policy,
        cache: AnalysisCache::new(ANALYSIS_CACHE_ENTRIES),
        audit,
        cancel: CancelRegistry::default(),
        catalogs: crate::mask::catalog::Catalogs::new(upstream.clone()),
        upstream,
        client_tls,
        client_auth,
        max_frame_bytes: settings.max_frame_bytes,
        intercept,
        shutdown: Default::default(),
        shutdown_grace: settings.shutdown_grace,
        sessions: Default::default(),
        relay_loops: RelayLoops::start(relay_threads(settings.worker_threads), Handle::current())
            .context("cannot start the relay threads")?,
    }))
}

/// Attaches the probes (if not yet) and takes the sidecar's part.
fn start_interception(settings: &Settings) -> anyhow::Result<Interception> {
    let spec = settings.cgroup.as_deref().unwrap_or("auto");
    let cgroup = intercept::cgroup::resolve(spec)?;
    let object = intercept::probe_object(settings.probes.as_deref());
    let redirect = match settings.listen {
        std::net::SocketAddr::V4(v4) => (*v4.ip(), v4.port()),
        other => anyhow::bail!("--intercept ebpf needs an IPv4 --listen address, not {other}"),
    };
    let opts = AttachOptions {
        cgroup: cgroup.clone(),
        object: object.clone(),
        sidecar_uid: nix::unistd::geteuid().as_raw(),
        sidecar_gid: nix::unistd::getegid().as_raw(),
        sidecar_cgroup: 0,
        redirect,
        ports: settings.capture_ports.clone(),
    };
    match intercept::attach(&opts)? {
        Attached::New(dir) => {
            tracing::info!(cgroup = %cgroup.display(), pins = %dir.display(), "probes attached")
        }
        Attached::Existing(dir) => {
            tracing::info!(cgroup = %cgroup.display(), pins = %dir.display(), "probes were attached already")
        }
    }
    let fast_path = settings.fast_path == crate::config::FastPath::On;
    Ok(Interception::new(&cgroup, &object, fast_path)?)
}

/// Serves until SIGINT or SIGTERM, then flushes the audit trail.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let shared = build(&settings)?;
    let listener = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    tracing::info!(
        listen = %settings.listen,
        upstream = settings.upstream.as_deref().unwrap_or("original destination"),
        "agentgate is accepting PostgreSQL clients"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot install the SIGHUP handler")?;
    let label = settings
        .upstream
        .clone()
        .unwrap_or_else(|| "original destination".into());
    tokio::spawn(watch_policy(Arc::clone(&shared), hup, label));
    tokio::select! {
        r = session::serve(listener, Arc::clone(&shared)) => r.context("listener failed")?,
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
    }
    // No new sessions (the listener is gone). The open ones end once their
    // statements and transactions are done, or when the grace runs out, each
    // telling its client and auditing what was still in flight and its end.
    shared.shutdown.cancel();
    shared.sessions.close();
    // Saturating: a grace of u64::MAX seconds means "wait as long as it takes".
    let drain = shared.shutdown_grace.saturating_add(SESSION_DRAIN);
    if tokio::time::timeout(drain, shared.sessions.wait())
        .await
        .is_err()
    {
        tracing::error!(
            sessions = shared.sessions.len(),
            "sessions had not ended {}s after shutdown began; they are cut",
            drain.as_secs()
        );
    }
    // A sink that stays unwritable (a closed pipe) must not hang the
    // shutdown forever; the operator is told records may be missing.
    match tokio::time::timeout(SHUTDOWN_FLUSH, shared.audit.flush()).await {
        Ok(r) => r.context("flushing the audit trail at shutdown")?,
        Err(_) => anyhow::bail!(
            "the audit trail could not be written within {}s of shutdown; its last records are lost",
            SHUTDOWN_FLUSH.as_secs()
        ),
    }
    Ok(())
}

const POLICY_POLL: Duration = Duration::from_secs(1);

/// Reloads the policy on SIGHUP and when its files change; every reload,
/// applied or rejected, is an audit record.
async fn watch_policy(shared: Arc<Shared>, mut hup: tokio::signal::unix::Signal, upstream: String) {
    let Some(path) = shared.policy.path().map(|p| p.display().to_string()) else {
        return;
    };
    let mut tick = tokio::time::interval(POLICY_POLL);
    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the policy");
                // Refresh the on-disk signature so the poll does not reload twice.
                shared.policy.changed_on_disk();
            }
            _ = tick.tick() => {
                if !shared.policy.changed_on_disk() {
                    continue;
                }
                tracing::info!("policy files changed: reloading");
            }
        }
        let Some(outcome) = shared.policy.reload() else {
            continue;
        };
        let record = match outcome {
            ReloadOutcome::Applied { label } => {
                tracing::info!(policy = %label, "policy reloaded");
                PolicyReloadRecord {
                    status: "applied",
                    path: path.clone(),
                    label: Some(label),
                    problems: Vec::new(),
                }
            }
            ReloadOutcome::Rejected { problems } => {
                for p in &problems {
                    tracing::error!(
                        "policy reload rejected, the previous policy stays in force: {p}"
                    );
                }
                PolicyReloadRecord {
                    status: "rejected",
                    path: path.clone(),
                    label: None,
                    problems,
                }
            }
        };
        let info = Arc::new(SessionInfo::process(&upstream));
        let _ = shared
            .audit
            .emit(Record::new(
                "policy.reload",
                info,
                RecordBody::PolicyReload { policy: record },
            ))
            .await;
    }
}
