//! Settings of `agentgate run`: command-line flags over a YAML file over
//! defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::audit::AuditTarget;

pub const DEFAULT_LISTEN_IP: [u8; 4] = [127, 0, 0, 1];
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;
/// About ten thousand statement records: a second or more of a busy
/// gateway's output, enough to ride out a slow log shipper.
pub const DEFAULT_AUDIT_BUFFER_BYTES: usize = 8 * 1024 * 1024;
/// Long enough for a typical statement or short transaction to finish, well
/// inside Kubernetes' default 30 s between SIGTERM and SIGKILL.
pub const DEFAULT_SHUTDOWN_GRACE_SECONDS: u64 = 5;
pub const UPSTREAM_PASSWORD_ENV: &str = "AGENTGATE_UPSTREAM_PASSWORD";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTls {
    /// Plain TCP to the database.
    #[default]
    Disable,
    /// TLS, without checking the server's certificate (like libpq's `require`).
    Require,
    /// TLS, the certificate checked against --upstream-ca and the host name.
    VerifyFull,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAuthMode {
    /// Accept any client that reaches the listener (interception vouches for it).
    #[default]
    Trust,
    /// Agents prove a secret from the config file by SCRAM-SHA-256.
    Password,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "kebab-case")]
pub enum InterceptMode {
    /// Clients connect to --listen themselves.
    #[default]
    None,
    /// eBPF probes redirect the cgroup's connections to the capture ports.
    Ebpf,
}

/// The CPU scheduling policy of the gateway's threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SchedPolicy {
    /// SCHED_BATCH: a woken gateway thread does not preempt the task
    /// running on its CPU (measured on two shared cores: less CPU per
    /// statement, more throughput and a shorter tail under load).
    #[default]
    Batch,
    /// Keep the policy the gateway was started with (e.g. by `chrt`).
    Inherit,
}

/// Whether intercepted connections may skip loopback TCP (see
/// `intercept::fast_path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FastPath {
    /// Where the kernel allows it: agent and sidecar exchange bytes through
    /// an eBPF sockmap, and a reader that falls behind gets TCP again.
    #[default]
    On,
    /// Always loopback TCP.
    Off,
}

/// Flags of `agentgate run`. Every one may also be set in `--config`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunArgs {
    /// YAML file with the same settings as the flags (flags win).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Address to accept PostgreSQL clients on [default: 127.0.0.1:15432].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// The database server to relay to.
    #[arg(long, value_name = "HOST:PORT")]
    pub upstream: Option<String>,
    /// The role the gateway logs in upstream as (agents never see its secret).
    #[arg(long, value_name = "NAME")]
    pub upstream_user: Option<String>,
    /// File holding the upstream password (or set AGENTGATE_UPSTREAM_PASSWORD).
    #[arg(long, value_name = "PATH")]
    pub upstream_password_file: Option<PathBuf>,
    /// TLS to the database [default: disable].
    #[arg(long, value_enum, value_name = "MODE")]
    pub upstream_tls: Option<UpstreamTls>,
    /// CA certificate(s), PEM, that sign the database's certificate (verify-full).
    #[arg(long, value_name = "PATH")]
    pub upstream_ca: Option<PathBuf>,
    /// Certificate chain, PEM, offered to clients that ask for TLS.
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key, PEM, for --tls-cert.
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How clients authenticate to the gateway [default: trust].
    #[arg(long, value_enum, value_name = "MODE")]
    pub client_auth: Option<ClientAuthMode>,
    /// Policy file, or a directory of policy files.
    #[arg(long, value_name = "PATH")]
    pub policy: Option<PathBuf>,
    /// Where audit records go: `-` for stdout, or a file to append to [default: -].
    #[arg(long, value_name = "-|PATH")]
    pub audit: Option<String>,
    /// Audit records that may wait for a slow sink, in bytes; beyond it,
    /// statements wait instead of records being dropped [default: 8388608].
    #[arg(long, value_name = "BYTES")]
    pub audit_buffer_bytes: Option<usize>,
    /// Largest client message accepted, in bytes [default: 67108864].
    #[arg(long, value_name = "BYTES")]
    pub max_frame_bytes: Option<usize>,
    /// Redirect the agent's connections with eBPF [default: none].
    #[arg(long, value_enum, value_name = "MODE")]
    pub intercept: Option<InterceptMode>,
    /// The cgroup to intercept (path, or `auto`: this pod's cgroup).
    #[arg(long, value_name = "PATH|auto")]
    pub cgroup: Option<String>,
    /// The compiled probes [default: $AGENTGATE_PROBES, else agentgate-probes next to this binary].
    #[arg(long, value_name = "PATH")]
    pub probes: Option<PathBuf>,
    /// Destination port to capture (repeat for several) [default: 5432].
    #[arg(long = "capture-port", value_name = "PORT")]
    pub capture_ports: Vec<u16>,
    /// With --intercept ebpf: let intercepted connections skip loopback TCP
    /// between agent and gateway [default: on].
    #[arg(long, value_enum, value_name = "on|off")]
    pub fast_path: Option<FastPath>,
    /// Threads relaying plain-TCP sessions, each an epoll loop (like
    /// pgbouncer's one); 0 is one per CPU. Above 1, logins and TLS
    /// sessions also run on that many runtime threads [default: 1].
    #[arg(long, value_name = "N")]
    pub worker_threads: Option<usize>,
    /// CPU scheduling policy of the gateway's threads [default: batch].
    #[arg(long, value_enum, value_name = "POLICY")]
    pub sched_policy: Option<SchedPolicy>,
    /// At SIGTERM, how long sessions may finish their statements and open
    /// transactions before they are cut [default: 5].
    #[arg(long, value_name = "SECONDS")]
    pub shutdown_grace: Option<u64>,
}

/// An agent allowed to log in with `--client-auth password`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentEntry {
    pub name: String,
    /// File holding the agent's secret (not a database password).
    pub password_file: Option<PathBuf>,
    /// A SCRAM-SHA-256 verifier as PostgreSQL stores it
    /// (`SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`).
    pub scram_verifier: Option<String>,
}

/// The YAML config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub upstream: Option<String>,
    pub upstream_user: Option<String>,
    pub upstream_password_file: Option<PathBuf>,
    pub upstream_tls: Option<UpstreamTls>,
    pub upstream_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub client_auth: Option<ClientAuthMode>,
    #[serde(default)]
    pub agents: Vec<AgentEntry>,
    pub policy: Option<PathBuf>,
    pub audit: Option<String>,
    pub audit_buffer_bytes: Option<usize>,
    pub max_frame_bytes: Option<usize>,
    pub intercept: Option<InterceptMode>,
    pub cgroup: Option<String>,
    pub probes: Option<PathBuf>,
    #[serde(default)]
    pub capture_ports: Vec<u16>,
    pub fast_path: Option<FastPath>,
    pub worker_threads: Option<usize>,
    pub sched_policy: Option<SchedPolicy>,
    pub shutdown_grace: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{0}")]
    Missing(&'static str),
    #[error("{0}")]
    Conflict(String),
}

/// Everything `run` needs, resolved and checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    /// Required unless intercepting: then the original destination is used
    /// and this, when given, pins the target.
    pub upstream: Option<String>,
    pub upstream_user: String,
    pub upstream_password: Option<String>,
    pub upstream_tls: UpstreamTls,
    pub upstream_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub client_auth: ClientAuthMode,
    pub agents: Vec<AgentEntry>,
    pub policy: Option<PathBuf>,
    pub audit: AuditTarget,
    pub audit_buffer_bytes: usize,
    pub max_frame_bytes: usize,
    pub intercept: InterceptMode,
    pub cgroup: Option<String>,
    pub probes: Option<PathBuf>,
    pub capture_ports: Vec<u16>,
    pub fast_path: FastPath,
    pub worker_threads: usize,
    pub sched_policy: SchedPolicy,
    pub shutdown_grace: std::time::Duration,
}

pub fn read_secret(what: &'static str, path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

impl Settings {
    /// Flags over the file over defaults; `env_password` is the value of
    /// AGENTGATE_UPSTREAM_PASSWORD, if set.
    pub fn resolve(args: RunArgs, env_password: Option<String>) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    what: "config file",
                    path: path.clone(),
                    source,
                })?;
                serde_yaml_ng::from_str::<FileConfig>(&text).map_err(|e| ConfigError::Invalid {
                    path: path.clone(),
                    message: e.to_string(),
                })?
            }
            None => FileConfig::default(),
        };
        let intercept = args.intercept.or(file.intercept).unwrap_or_default();
        let upstream = args.upstream.or(file.upstream);
        if upstream.is_none() && intercept == InterceptMode::None {
            return Err(ConfigError::Missing(
                "no upstream database: give --upstream HOST:PORT (or --intercept ebpf to use each connection's original destination)",
            ));
        }
        if let Some(u) = &upstream {
            if !u.contains(':') {
                return Err(ConfigError::Conflict(format!(
                    "upstream {u:?} must be HOST:PORT"
                )));
            }
        }
        let cgroup = args.cgroup.or(file.cgroup);
        if intercept == InterceptMode::Ebpf && cgroup.is_none() {
            return Err(ConfigError::Missing(
                "--intercept ebpf needs --cgroup PATH|auto",
            ));
        }
        let mut capture_ports = if args.capture_ports.is_empty() {
            file.capture_ports
        } else {
            args.capture_ports
        };
        if capture_ports.is_empty() {
            capture_ports.push(gateway_common::POSTGRES_PORT);
        }
        let upstream_user = args
            .upstream_user
            .or(file.upstream_user)
            .ok_or(ConfigError::Missing(
            "no upstream user: give --upstream-user NAME or `upstream_user:` in the config file",
        ))?;
        let upstream_password = match args.upstream_password_file.or(file.upstream_password_file) {
            Some(path) => Some(read_secret("upstream password file", &path)?),
            None => env_password,
        };
        let upstream_tls = args.upstream_tls.or(file.upstream_tls).unwrap_or_default();
        let upstream_ca = args.upstream_ca.or(file.upstream_ca);
        if upstream_tls == UpstreamTls::VerifyFull && upstream_ca.is_none() {
            return Err(ConfigError::Missing(
                "--upstream-tls verify-full needs --upstream-ca PATH",
            ));
        }
        let tls_cert = args.tls_cert.or(file.tls_cert);
        let tls_key = args.tls_key.or(file.tls_key);
        if tls_cert.is_some() != tls_key.is_some() {
            return Err(ConfigError::Missing("--tls-cert and --tls-key go together"));
        }
        let client_auth = args.client_auth.or(file.client_auth).unwrap_or_default();
        if client_auth == ClientAuthMode::Password && file.agents.is_empty() {
            return Err(ConfigError::Missing(
                "--client-auth password needs `agents:` with their secrets in the config file",
            ));
        }
        for agent in &file.agents {
            if agent.password_file.is_some() == agent.scram_verifier.is_some() {
                return Err(ConfigError::Conflict(format!(
                    "agent {:?}: give exactly one of password_file and scram_verifier",
                    agent.name
                )));
            }
        }
        let audit_buffer_bytes = args
            .audit_buffer_bytes
            .or(file.audit_buffer_bytes)
            .unwrap_or(DEFAULT_AUDIT_BUFFER_BYTES);
        if audit_buffer_bytes == 0 {
            return Err(ConfigError::Conflict(
                "--audit-buffer-bytes must be at least 1".into(),
            ));
        }
        Ok(Self {
            listen: args.listen.or(file.listen).unwrap_or(SocketAddr::from((
                DEFAULT_LISTEN_IP,
                gateway_common::GATEWAY_PORT,
            ))),
            upstream,
            upstream_user,
            upstream_password,
            upstream_tls,
            upstream_ca,
            tls_cert,
            tls_key,
            client_auth,
            agents: file.agents,
            policy: args.policy.or(file.policy),
            audit: AuditTarget::parse(args.audit.or(file.audit).as_deref().unwrap_or("-")),
            audit_buffer_bytes,
            max_frame_bytes: args
                .max_frame_bytes
                .or(file.max_frame_bytes)
                .unwrap_or(DEFAULT_MAX_FRAME_BYTES),
            intercept,
            cgroup,
            probes: args.probes.or(file.probes),
            capture_ports,
            fast_path: args.fast_path.or(file.fast_path).unwrap_or_default(),
            worker_threads: args.worker_threads.or(file.worker_threads).unwrap_or(1),
            sched_policy: args.sched_policy.or(file.sched_policy).unwrap_or_default(),
            shutdown_grace: std::time::Duration::from_secs(
                args.shutdown_grace
                    .or(file.shutdown_grace)
                    .unwrap_or(DEFAULT_SHUTDOWN_GRACE_SECONDS),
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_audit_buffer_is_refused() {
        let args = RunArgs {
            upstream: Some("db:5432".into()),
            upstream_user: Some("u".into()),
            audit_buffer_bytes: Some(0),
            ..Default::default()
        };
        let e = Settings::resolve(args, None).unwrap_err().to_string();
        assert!(e.contains("--audit-buffer-bytes"), "{e}");
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            "upstream: db:5432\nupstream_user: file_user\nlisten: 127.0.0.1:1\n",
        )
        .unwrap();
        let args = RunArgs {
            config: Some(path),
            upstream_user: Some("flag_user".into()),
            ..Default::default()
        };
        let s = Settings::resolve(args, None).unwrap();
        assert_eq!(s.upstream.as_deref(), Some("db:5432"));
        assert_eq!(s.upstream_user, "flag_user");
        assert_eq!(s.listen.port(), 1);
        assert_eq!(s.audit, AuditTarget::Stdout);
    }

    #[test]
    fn the_scheduling_policy_defaults_to_batch_and_the_file_can_keep_the_inherited_one() {
        let args = |config| RunArgs {
            config,
            upstream: Some("db:5432".into()),
            upstream_user: Some("u".into()),
            ..Default::default()
        };
        let s = Settings::resolve(args(None), None).unwrap();
        assert_eq!(s.sched_policy, SchedPolicy::Batch);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "sched_policy: inherit\n").unwrap();
        let s = Settings::resolve(args(Some(path.clone())), None).unwrap();
        assert_eq!(s.sched_policy, SchedPolicy::Inherit);
        std::fs::write(&path, "sched_policy: fifo\n").unwrap();
        let err = Settings::resolve(args(Some(path)), None).unwrap_err();
        assert!(err.to_string().contains("fifo"), "{err}");
    }

    #[test]
    fn unknown_keys_and_missing_pieces_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "upstreem: db:5432\n").unwrap();
        let err = Settings::resolve(
            RunArgs {
                config: Some(path),
                ..Default::default()
            },
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("upstreem"), "{err}");
        let err = Settings::resolve(RunArgs::default(), None).unwrap_err();
        assert!(err.to_string().contains("--upstream"), "{err}");
    }
}
