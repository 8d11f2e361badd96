//! One task per client for TLS, startup, authentication and the upstream
//! login; then the relay: plain-TCP sessions on a relay loop thread
//! (`event_loop`), TLS sessions on two tasks (`relay`), both running the same
//! batch functions.

mod cancel;
mod client_auth;
mod event_loop;
mod handshake;
mod masking;
mod names;
mod relay;
mod scram;
mod socket;
mod stream;
pub mod tls;
mod tracker;
pub mod upstream;

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::audit::AuditSink;
use crate::policy::PolicyStore;
use crate::sql::AnalysisCache;

pub use cancel::{CancelRegistry, CancelTarget};
pub use client_auth::{AgentRegistry, ScramServer, Verifier};
pub use event_loop::RelayLoops;
pub use scram::{SaltedPasswords, ScramClientError};
pub use stream::{read_frame, ReadError};
pub use upstream::UpstreamSettings;

/// How clients prove who they are.
#[derive(Clone)]
pub enum ClientAuth {
    Trust,
    Scram(AgentRegistry),
}

/// What every session shares.
pub struct Shared {
    pub policy: PolicyStore,
    pub cache: AnalysisCache,
    pub audit: AuditSink,
    pub cancel: CancelRegistry,
    pub upstream: UpstreamSettings,
    pub client_tls: Option<tokio_rustls::TlsAcceptor>,
    pub client_auth: ClientAuth,
    pub max_frame_bytes: usize,
    /// Set in intercept mode: the kernel's records of redirected connections.
    pub intercept: Option<crate::intercept::Interception>,
    /// Table names and view definitions for masking, per database.
    pub catalogs: crate::mask::catalog::Catalogs,
    /// Cancelled at shutdown: every session ends and audits its end, once
    /// it rests between transactions or `shutdown_grace` has passed.
    pub shutdown: tokio_util::sync::CancellationToken,
    pub shutdown_grace: std::time::Duration,
    /// The running sessions, waited for at shutdown.
    pub sessions: tokio_util::task::TaskTracker,
    /// The threads that relay plain-TCP sessions once logged in.
    pub relay_loops: RelayLoops,
}

/// Accepts clients until the task is dropped.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) -> std::io::Result<()> {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Running out of file descriptors must not end the gateway.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let session = Arc::clone(&shared);
        shared.sessions.spawn(async move {
            handshake::handle(tcp, peer, session).await;
        });
    }
}
