//! Putting the rooms together for `agentgate run`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::audit::AuditSink;
use crate::config::{ClientAuthMode, Settings, UpstreamTls};
use crate::policy::{load_policy_path, Policy};
use crate::session::{
    self, tls, AgentRegistry, CancelRegistry, ClientAuth, Shared, UpstreamSettings,
};
use crate::sql::AnalysisCache;

const ANALYSIS_CACHE_ENTRIES: usize = 16 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(10);

/// Checks the settings and builds what sessions share. Fails before
/// anything listens, so a bad configuration never serves.
pub fn build(settings: &Settings) -> anyhow::Result<Arc<Shared>> {
    if let Some(path) = &settings.policy {
        let sources = load_policy_path(path)?;
        tracing::warn!(
            files = sources.len(),
            "policy files are read and checked for syntax, but the policy language is not \
             implemented yet: only the built-in rules apply"
        );
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
    let audit = AuditSink::open(&settings.audit)?;
    Ok(Arc::new(Shared {
        policy: Policy::builtin(),
        cache: AnalysisCache::new(ANALYSIS_CACHE_ENTRIES),
        audit,
        cancel: CancelRegistry::default(),
        upstream: UpstreamSettings {
            addr: settings.upstream.clone(),
            user: settings.upstream_user.clone(),
            password: settings.upstream_password.clone(),
            tls: upstream_tls,
            connect_timeout: CONNECT_TIMEOUT,
        },
        client_tls,
        client_auth,
        max_frame_bytes: settings.max_frame_bytes,
    }))
}

/// Serves until SIGINT or SIGTERM, then flushes the audit trail.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let shared = build(&settings)?;
    let listener = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    tracing::info!(
        listen = %settings.listen,
        upstream = %settings.upstream,
        "agentgate is accepting PostgreSQL clients"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    tokio::select! {
        r = session::serve(listener, Arc::clone(&shared)) => r.context("listener failed")?,
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
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
