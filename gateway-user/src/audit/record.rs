//! What an audit record holds.

use std::sync::Arc;

use serde::Serialize;

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
    /// These fields as serialised once, for every record of the session.
    #[serde(skip)]
    pub json: std::sync::OnceLock<String>,
}

impl SessionInfo {
    /// The session's fields as JSON object members (no braces), made once.
    pub fn members(&self) -> &str {
        self.json.get_or_init(|| {
            let whole = serde_json::to_string(self).unwrap_or_else(|_| "{}".into());
            whole
                .strip_prefix('{')
                .and_then(|w| w.strip_suffix('}'))
                .unwrap_or("")
                .to_owned()
        })
    }

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
            json: Default::default(),
        }
    }
}

/// The statement part of a record. It holds the shared analysis rather
/// than copies of its fields: the copying and formatting happen once, in the
/// writer thread, off the relay's path.
#[derive(Debug, Clone)]
pub struct StatementRecord {
    /// `simple`, `extended` or `function_call`.
    pub protocol: &'static str,
    pub analysis: Arc<crate::sql::Analysis>,
    /// Which statement of the analysis this is.
    pub index: usize,
    /// Length in bytes of the text the client sent for this statement.
    pub bytes: usize,
    /// The prepared statement name, in the extended protocol.
    pub prepared: Option<Arc<str>>,
}

impl StatementRecord {
    pub fn as_ref(&self) -> StatementRef<'_> {
        StatementRef {
            protocol: self.protocol,
            analysis: &self.analysis,
            index: self.index,
            bytes: self.bytes,
            prepared: self.prepared.as_deref(),
        }
    }
}

/// A statement's audited facts, borrowed from wherever they are kept.
#[derive(Debug, Clone, Copy)]
pub struct StatementRef<'a> {
    pub protocol: &'static str,
    pub analysis: &'a crate::sql::Analysis,
    pub index: usize,
    pub bytes: usize,
    pub prepared: Option<&'a str>,
}

impl Serialize for StatementRecord {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let facts = self.analysis.statements.get(self.index);
        let n = 7 + usize::from(self.prepared.is_some());
        let mut st = s.serialize_struct("StatementRecord", n)?;
        st.serialize_field("protocol", self.protocol)?;
        // The text with literals replaced by `$n`; absent when it did not
        // parse (its raw text could hold anything).
        st.serialize_field("text", &facts.map(|f| &f.text))?;
        st.serialize_field("fingerprint", &facts.map(|f| &f.fingerprint))?;
        st.serialize_field(
            "kinds",
            facts.map(|f| f.kinds.as_slice()).unwrap_or_default(),
        )?;
        st.serialize_field(
            "objects",
            facts.map(|f| f.objects.as_slice()).unwrap_or_default(),
        )?;
        st.serialize_field(
            "functions",
            facts.map(|f| f.functions.as_slice()).unwrap_or_default(),
        )?;
        st.serialize_field("bytes", &self.bytes)?;
        if let Some(p) = &self.prepared {
            st.serialize_field("prepared", &**p)?;
        }
        st.end()
    }
}

/// The decision part of a record: action, rule, policy (name and digest,
/// or `builtin`), mode, controls, and why a statement was refused.
#[derive(Debug, Clone)]
pub struct DecisionRecord(pub crate::policy::Decision);

impl Serialize for DecisionRecord {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        DecisionView(&self.0).serialize(s)
    }
}

/// A decision serialised where it lies (the relay audits its own records
/// without moving them into a `Record`).
struct DecisionView<'a>(&'a crate::policy::Decision);

impl Serialize for DecisionView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let d = self.0;
        let mut st = s.serialize_struct("DecisionRecord", 6)?;
        st.serialize_field("action", &d.action)?;
        st.serialize_field("rule", &*d.rule)?;
        st.serialize_field("policy", &*d.policy)?;
        st.serialize_field("mode", &d.mode)?;
        st.serialize_field("controls", &*d.controls)?;
        if !d.reason.is_empty() {
            st.serialize_field("reason", &d.reason)?;
        }
        st.end()
    }
}

/// A decision's serialised object, made once and shared by its clones.
pub fn decision_json(d: &crate::policy::Decision) -> &str {
    d.audit_form
        .get_or_init(|| serde_json::to_string(&DecisionView(d)).unwrap_or_else(|_| "null".into()))
}

impl From<&crate::policy::Decision> for DecisionRecord {
    fn from(d: &crate::policy::Decision) -> Self {
        Self(d.clone())
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

impl Outcome {
    /// Appends the same object serde's serialisation gives, without its
    /// per-field machinery: one runs for every statement.
    pub fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        out.extend_from_slice(b"{\"status\":");
        push_json_name(out, self.status);
        match &self.sqlstate {
            Some(code) => {
                out.extend_from_slice(b",\"sqlstate\":");
                push_json_str(out, code)?;
                out.extend_from_slice(b",\"rows\":");
            }
            None => out.extend_from_slice(b",\"sqlstate\":null,\"rows\":"),
        }
        match self.rows {
            Some(n) => out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"duration_us\":");
        out.extend_from_slice(itoa::Buffer::new().format(self.duration_us).as_bytes());
        if let Some(masked) = &self.masked {
            out.extend_from_slice(b",\"masked\":");
            serde_json::to_writer(&mut *out, masked)?;
        }
        out.push(b'}');
        Ok(())
    }
}

/// Appends one of the gateway's own names (event, protocol, status), which
/// never need escaping.
pub fn push_json_name(out: &mut Vec<u8>, name: &'static str) {
    debug_assert!(name
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\'));
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.push(b'"');
}

/// Appends a JSON string: copied as is when nothing in it needs escaping
/// (the usual case for statuses, names and codes), escaped by serde_json
/// otherwise.
pub fn push_json_str(out: &mut Vec<u8>, s: &str) -> serde_json::Result<()> {
    if s.bytes()
        .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b < 0x7f)
    {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        Ok(())
    } else {
        serde_json::to_writer(out, s)
    }
}

/// One line of the audit trail, before it is numbered.
#[derive(Debug, Clone)]
pub struct Record {
    /// When it happened; formatted by the writer thread.
    pub ts: std::time::SystemTime,
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
            ts: std::time::SystemTime::now(),
            event,
            session,
            body,
        }
    }
}

const RFC3339_MICROS: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
);

/// The current time in RFC 3339, UTC, with microseconds.
pub fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

/// Writes audit timestamps: RFC 3339, UTC, with microseconds. Records come
/// many per second, so the date and time down to the second are formatted
/// once per second and reused; only the microseconds are written each time.
#[derive(Debug, Default)]
pub struct Stamper {
    second: Option<u64>,
    /// `YYYY-MM-DDTHH:MM:SS.`
    prefix: [u8; 20],
}

impl Stamper {
    /// Takes the system clock's reading as is: the calendar conversion is
    /// the once-a-second part.
    pub fn push(&mut self, out: &mut Vec<u8>, t: std::time::SystemTime) {
        // A clock set before 1970 is written as 1970.
        let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let second = since.as_secs();
        if self.second == Some(second) {
            out.extend_from_slice(&self.prefix);
        } else {
            let t = i64::try_from(second)
                .ok()
                .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            let start = out.len();
            digits(out, t.year().clamp(0, 9999) as u32, 4);
            out.push(b'-');
            digits(out, u32::from(u8::from(t.month())), 2);
            out.push(b'-');
            digits(out, u32::from(t.day()), 2);
            out.push(b'T');
            digits(out, u32::from(t.hour()), 2);
            out.push(b':');
            digits(out, u32::from(t.minute()), 2);
            out.push(b':');
            digits(out, u32::from(t.second()), 2);
            out.push(b'.');
            self.prefix.copy_from_slice(&out[start..]);
            self.second = Some(second);
        }
        digits(out, since.subsec_micros(), 6);
        out.push(b'Z');
    }
}

fn digits(out: &mut Vec<u8>, v: u32, n: usize) {
    let mut buf = [b'0'; 10];
    let mut v = v;
    for i in (0..n).rev() {
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
    }
    out.extend_from_slice(&buf[..n]);
}

/// A time in RFC 3339, UTC, with microseconds.
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(RFC3339_MICROS)
        .unwrap_or_else(|_| String::from("1970-01-01T00:00:00.000000Z"))
}
