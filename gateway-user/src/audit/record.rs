//! What an audit record holds.

use std::sync::Arc;

use serde::Serialize;

use crate::sql::ObjectRef;

/// Who is asking. Fields the gateway cannot vouch for are named as claims.
#[derive(Debug, Clone, Serialize)]
pub struct Actor {
    /// The `user` the client sent at startup: a claim unless `auth` verified it.
    pub user: String,
    /// How the gateway checked the client: `trust` or `scram-sha-256`.
    pub auth: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub application_name: Option<String>,
    /// Facts from the kernel (eBPF interception): pid, uid, gid, comm,
    /// cgroup. Absent when the connection was not intercepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<crate::intercept::KernelIdentity>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Source {
    pub addr: String,
    pub tls: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub addr: String,
    /// The destination the client connected to, before redirection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_dst: Option<String>,
    pub database: String,
    pub user: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_pid: Option<i32>,
}

/// The parts every record of one session repeats.
#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    pub session: String,
    pub actor: Actor,
    pub source: Source,
    pub target: Target,
}

impl SessionInfo {
    /// The gateway itself, for records no client session caused.
    pub fn process(upstream: &str) -> Self {
        Self {
            session: "process".into(),
            actor: Actor {
                user: "agentgate".into(),
                auth: "process",
                application_name: None,
                kernel: None,
            },
            source: Source {
                addr: "local".into(),
                tls: false,
            },
            target: Target {
                addr: upstream.to_owned(),
                original_dst: None,
                database: String::new(),
                user: String::new(),
                backend_pid: None,
            },
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StatementRecord {
    /// `simple`, `extended` or `function_call`.
    pub protocol: &'static str,
    /// The statement with literals replaced by `$n`; absent when it did not
    /// parse (its raw text could hold anything).
    pub text: Option<String>,
    pub fingerprint: Option<String>,
    pub kinds: Vec<&'static str>,
    pub objects: Vec<ObjectRef>,
    pub functions: Vec<String>,
    /// Length in bytes of the text the client sent for this statement.
    pub bytes: usize,
    /// The prepared statement name, in the extended protocol.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prepared: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DecisionRecord {
    pub action: crate::policy::Action,
    pub rule: String,
    /// Policy name and digest, or `builtin`.
    pub policy: String,
    pub mode: crate::policy::Mode,
    pub controls: Vec<String>,
    /// Why a statement was refused, in one sentence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl From<&crate::policy::Decision> for DecisionRecord {
    fn from(d: &crate::policy::Decision) -> Self {
        Self {
            action: d.action,
            rule: d.rule.to_string(),
            policy: d.policy.to_string(),
            mode: d.mode,
            controls: d.controls.to_vec(),
            reason: (!d.reason.is_empty()).then(|| d.reason.clone()),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcome {
    /// `ok`, `error`, `denied`, `suspended` (Execute hit its row limit),
    /// `skipped` (not run because an earlier message of its batch failed),
    /// or `unknown` (the connection ended first).
    pub status: &'static str,
    pub sqlstate: Option<String>,
    pub rows: Option<u64>,
    pub duration_us: u64,
    /// Values masked, per column (`schema.table.column`, or the result
    /// column's name when computed). Absent when nothing was masked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masked: Option<std::collections::BTreeMap<String, u64>>,
}

/// One line of the audit trail, before it is numbered.
#[derive(Debug, Clone)]
pub struct Record {
    pub ts: String,
    pub event: &'static str,
    pub session: Arc<SessionInfo>,
    pub body: RecordBody,
}

// Most records are statements; the whole record is boxed when queued, so the
// small variants wasting space costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum RecordBody {
    Empty {},
    Statement {
        statement: StatementRecord,
        decision: DecisionRecord,
        outcome: Outcome,
    },
    SessionEnd {
        statements: u64,
        duration_us: u64,
        reason: String,
    },
    SessionRefused {
        reason: String,
    },
    PolicyReload {
        policy: PolicyReloadRecord,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct PolicyReloadRecord {
    /// `applied` or `rejected` (the previous policy stays in force).
    pub status: &'static str,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

impl Record {
    pub fn new(event: &'static str, session: Arc<SessionInfo>, body: RecordBody) -> Self {
        Self {
            ts: now_rfc3339(),
            event,
            session,
            body,
        }
    }
}

/// Serialised shape of a line: fixed fields first, then the event's own.
#[derive(Serialize)]
pub(super) struct Line<'a> {
    pub v: u32,
    pub ts: &'a str,
    pub seq: u64,
    pub event: &'a str,
    #[serde(flatten)]
    pub session: &'a SessionInfo,
    #[serde(flatten)]
    pub body: &'a RecordBody,
}

const RFC3339_MICROS: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
);

/// The current time in RFC 3339, UTC, with microseconds.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(RFC3339_MICROS)
        .unwrap_or_else(|_| String::from("1970-01-01T00:00:00.000000Z"))
}
