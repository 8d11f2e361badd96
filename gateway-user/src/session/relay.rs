//! The relay loop of a logged-in session: client messages are judged and
//! forwarded, backend messages are accounted for and passed back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::stream::{fill, ReadError};
use super::tracker::{Completed, Expect, PendingStatement, Tracker, Verdict};
use super::Shared;
use crate::audit::{DecisionRecord, Record, RecordBody, SessionInfo, StatementRecord};
use crate::policy::{self, Decision, Policy, PolicyStore, Who};
use crate::sql::{Analysis, PreparedEffect};
use crate::wire::frontend::{self as fe, Target};
use crate::wire::{backend, DecodeError, Frame, FrameError, FrameSplitter};

/// What a denied message is replaced with upstream: text the server's parser
/// rejects at once, so the server raises an error at exactly that point of
/// the stream and applies its own error rules (abort the transaction,
/// discard until Sync). Its error is then replaced by the denial.
const DENIED_SQL: &str = "agentgate_denied";
const DENIED_STATEMENT: &str = "agentgate_denied";

/// Why a relay ended.
#[derive(Debug)]
pub enum End {
    ClientTerminated,
    ClientGone,
    ServerGone,
    /// The client sent something that is not the protocol; it gets a FATAL.
    Malformed(String),
    Io(String),
}

impl End {
    pub fn describe(&self) -> String {
        match self {
            End::ClientTerminated => "client terminated".into(),
            End::ClientGone => "client closed the connection".into(),
            End::ServerGone => "database closed the connection".into(),
            End::Malformed(m) => format!("malformed client message: {m}"),
            End::Io(m) => m.clone(),
        }
    }
}

impl From<FrameError> for End {
    fn from(e: FrameError) -> Self {
        End::Malformed(e.to_string())
    }
}

impl From<DecodeError> for End {
    fn from(e: DecodeError) -> Self {
        End::Malformed(e.to_string())
    }
}

/// A prepared statement or portal the gateway has judged.
#[derive(Debug)]
struct Prepared {
    analysis: Arc<Analysis>,
    /// Which statement of the analysis runs (a PREPARE may sit in a
    /// multi-statement Query).
    index: usize,
    bytes: usize,
    name: String,
    decision: Decision,
}

/// Messages bound for one peer, joined back into one buffer. Adjacent frames
/// of one read are rejoined without copying (`unsplit` of neighbours).
#[derive(Default)]
struct Outbox {
    buf: BytesMut,
}

impl Outbox {
    fn push(&mut self, frame: Frame) {
        self.buf.unsplit(frame.into_buf());
    }

    async fn send<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.buf);
        w.write_all(&out).await?;
        w.flush().await
    }
}

pub struct Relay {
    pub shared: Arc<Shared>,
    pub info: Arc<SessionInfo>,
    tracker: Mutex<Tracker>,
    statements_audited: std::sync::atomic::AtomicU64,
}

impl Relay {
    pub fn new(shared: Arc<Shared>, info: Arc<SessionInfo>) -> Self {
        Self {
            shared,
            info,
            tracker: Mutex::new(Tracker::default()),
            statements_audited: Default::default(),
        }
    }

    pub fn statements_audited(&self) -> u64 {
        self.statements_audited
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn tracker(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn emit(&self, done: &mut Vec<Completed>) -> Result<(), End> {
        for c in done.drain(..) {
            self.statements_audited
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let record = statement_record(&self.info, c);
            self.shared
                .audit
                .emit(record)
                .await
                .map_err(|e| End::Io(e.to_string()))?;
        }
        Ok(())
    }

    /// Audits what was still in flight when the connection ended.
    pub async fn abandon(&self) {
        let mut done = Vec::new();
        self.tracker().abandon(&mut done);
        let _ = self.emit(&mut done).await;
    }

    /// Client to database.
    pub async fn frontend<R, W>(
        &self,
        client: &mut R,
        upstream: &mut W,
        mut buf: BytesMut,
        who: Who,
    ) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let splitter = FrameSplitter::new(self.shared.max_frame_bytes);
        let mut state = FrontendState {
            judge: Judge::new(who),
            statements: HashMap::new(),
            portals: HashMap::new(),
        };
        let mut out = Outbox::default();
        let mut done = Vec::new();
        loop {
            let mut terminate = false;
            loop {
                let frame = match splitter.split(&mut buf) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => return e.into(),
                };
                match self.judge(frame, &mut state, &mut done) {
                    Ok(Some(f)) => {
                        terminate = f.tag() == fe::TERMINATE;
                        out.push(f);
                        if terminate {
                            break;
                        }
                    }
                    Ok(None) => {}
                    Err(end) => return end,
                }
            }
            if let Err(e) = out.send(upstream).await {
                return End::Io(format!("writing to the database: {e}"));
            }
            if let Err(end) = self.emit(&mut done).await {
                return end;
            }
            if terminate {
                return End::ClientTerminated;
            }
            match fill(client, &mut buf).await {
                Ok(()) => {}
                Err(ReadError::Closed) => return End::ClientGone,
                Err(e) => return End::Io(format!("reading from the client: {e}")),
            }
        }
    }

    /// Judges one client message and returns what goes upstream in its place.
    fn judge(
        &self,
        frame: Frame,
        state: &mut FrontendState,
        done: &mut Vec<Completed>,
    ) -> Result<Option<Frame>, End> {
        let body = frame.body();
        let healthy = self.shared.audit.is_healthy();
        let expect = match frame.tag() {
            fe::QUERY => {
                let text = fe::decode_query(body)?;
                let analysis = self.shared.cache.analyze(text);
                let decision = if healthy {
                    state.judge.decide(&self.shared.policy, text, &analysis)
                } else {
                    Decision::audit_unavailable()
                };
                let pending = pending_statements("simple", &analysis, text.len(), None, &decision);
                if !decision.lets_through() {
                    return Ok(Some(self.deny_simple(pending, &decision, done)));
                }
                state.track_sql_prepares(&analysis, text.len(), &decision);
                Expect::Simple(pending.into())
            }
            fe::PARSE => {
                let parse = fe::decode_parse(body)?;
                let analysis = self.shared.cache.analyze(parse.query);
                let decision = if healthy {
                    state
                        .judge
                        .decide(&self.shared.policy, parse.query, &analysis)
                } else {
                    Decision::audit_unavailable()
                };
                if !decision.lets_through() {
                    // PostgreSQL forgets the unnamed statement at any Parse.
                    if parse.statement.is_empty() {
                        state.statements.remove("");
                    }
                    let pending = pending_statements(
                        "extended",
                        &analysis,
                        parse.query.len(),
                        Some(parse.statement),
                        &decision,
                    );
                    return Ok(Some(self.deny_extended(pending, &decision, done)));
                }
                state.track_sql_prepares(&analysis, parse.query.len(), &decision);
                state.statements.insert(
                    parse.statement.to_owned(),
                    Arc::new(Prepared {
                        analysis,
                        index: 0,
                        bytes: parse.query.len(),
                        name: parse.statement.to_owned(),
                        decision,
                    }),
                );
                Expect::Parse
            }
            fe::BIND => {
                let bind = fe::decode_bind(body)?;
                match state.statements.get(bind.statement) {
                    Some(p) => {
                        state.portals.insert(bind.portal.to_owned(), Arc::clone(p));
                        Expect::Bind
                    }
                    None => {
                        state.portals.remove(bind.portal);
                        let decision = Decision::unknown_statement(&format!(
                            "prepared statement {:?}",
                            bind.statement
                        ));
                        return Ok(Some(self.deny_extended(Vec::new(), &decision, done)));
                    }
                }
            }
            fe::EXECUTE => {
                let exec = fe::decode_execute(body)?;
                let Some(p) = state.portals.get(exec.portal) else {
                    let decision =
                        Decision::unknown_statement(&format!("portal {:?}", exec.portal));
                    return Ok(Some(self.deny_extended(Vec::new(), &decision, done)));
                };
                if !healthy {
                    let decision = Decision::audit_unavailable();
                    let pending = vec![pending_for(p, &decision)];
                    return Ok(Some(self.deny_extended(pending, &decision, done)));
                }
                Expect::Execute(pending_for(p, &p.decision))
            }
            fe::DESCRIBE => {
                fe::decode_target(fe::DESCRIBE, body)?;
                Expect::Describe
            }
            fe::CLOSE => {
                match fe::decode_target(fe::CLOSE, body)? {
                    Target::Statement(name) => state.statements.remove(name),
                    Target::Portal(name) => state.portals.remove(name),
                };
                Expect::Close
            }
            fe::SYNC => {
                fe::decode_empty(fe::SYNC, body)?;
                Expect::Sync
            }
            fe::FLUSH | fe::TERMINATE | fe::COPY_DONE => {
                fe::decode_empty(frame.tag(), body)?;
                return Ok(Some(frame));
            }
            fe::COPY_DATA => return Ok(Some(frame)),
            fe::COPY_FAIL => {
                fe::decode_copy_fail(body)?;
                return Ok(Some(frame));
            }
            fe::FUNCTION_CALL => {
                let decision = Decision::function_call();
                let pending = vec![PendingStatement {
                    protocol: "function_call",
                    analysis: Arc::new(Analysis {
                        statements: Vec::new(),
                        parse_error: None,
                    }),
                    index: 0,
                    bytes: body.len(),
                    prepared: None,
                    decision: decision.clone(),
                    started: Instant::now(),
                }];
                return Ok(Some(self.deny_simple(pending, &decision, done)));
            }
            other => {
                return Err(End::Malformed(format!(
                    "unknown message type '{}'",
                    other.escape_ascii()
                )))
            }
        };
        self.tracker().push(expect, done);
        Ok(Some(frame))
    }

    fn deny_simple(
        &self,
        statements: Vec<PendingStatement>,
        decision: &Decision,
        done: &mut Vec<Completed>,
    ) -> Frame {
        self.deny(statements, decision, false, done);
        fe::query(DENIED_SQL)
    }

    fn deny_extended(
        &self,
        statements: Vec<PendingStatement>,
        decision: &Decision,
        done: &mut Vec<Completed>,
    ) -> Frame {
        self.deny(statements, decision, true, done);
        fe::parse(DENIED_STATEMENT, DENIED_SQL)
    }

    fn deny(
        &self,
        statements: Vec<PendingStatement>,
        decision: &Decision,
        extended: bool,
        done: &mut Vec<Completed>,
    ) {
        tracing::info!(session = %self.info.session, rule = %decision.rule, "statement denied");
        let error = backend::error_response(
            "ERROR",
            backend::INSUFFICIENT_PRIVILEGE,
            &decision.client_message(),
        );
        self.tracker().push(
            Expect::Denied {
                statements,
                error,
                extended,
            },
            done,
        );
    }

    /// Database to client.
    pub async fn backend<R, W>(&self, upstream: &mut R, client: &mut W, mut buf: BytesMut) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let splitter = super::upstream::backend_splitter();
        let mut out = Outbox::default();
        let mut done = Vec::new();
        loop {
            {
                let mut tracker = self.tracker();
                loop {
                    let frame = match splitter.split(&mut buf) {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(e) => return End::Io(format!("database sent a bad frame: {e}")),
                    };
                    match tracker.on_backend(&frame, &mut done) {
                        Verdict::Forward => out.push(frame),
                        Verdict::Replace(f) => out.push(f),
                    }
                }
            }
            if let Err(e) = out.send(client).await {
                return End::Io(format!("writing to the client: {e}"));
            }
            if let Err(end) = self.emit(&mut done).await {
                return end;
            }
            match fill(upstream, &mut buf).await {
                Ok(()) => {}
                Err(ReadError::Closed) => return End::ServerGone,
                Err(e) => return End::Io(format!("reading from the database: {e}")),
            }
        }
    }
}

struct FrontendState {
    judge: Judge,
    statements: HashMap<String, Arc<Prepared>>,
    portals: HashMap<String, Arc<Prepared>>,
}

/// One session's view of the policy: its identities under the policy in
/// force, and decisions cached by statement text (the identity is fixed for
/// the session, so the text is the rest of the key). A reload clears both.
struct Judge {
    who: Who,
    version: u64,
    policy: Option<Arc<Policy>>,
    identities: Vec<usize>,
    cache: HashMap<String, Decision>,
}

const DECISION_CACHE_ENTRIES: usize = 4096;

impl Judge {
    fn new(who: Who) -> Self {
        Self {
            who,
            version: 0,
            policy: None,
            identities: Vec::new(),
            cache: HashMap::new(),
        }
    }

    fn decide(&mut self, store: &PolicyStore, text: &str, analysis: &Analysis) -> Decision {
        if store.version() != self.version {
            let (version, policy) = store.current();
            self.identities = policy
                .as_ref()
                .map(|p| p.identities_of(&self.who))
                .unwrap_or_default();
            self.version = version;
            self.policy = policy;
            self.cache.clear();
        }
        if let Some(d) = self.cache.get(text) {
            return d.clone();
        }
        let d = policy::decide(self.policy.as_deref(), &self.identities, analysis);
        if self.cache.len() >= DECISION_CACHE_ENTRIES {
            self.cache.clear();
        }
        self.cache.insert(text.to_owned(), d.clone());
        d
    }
}

impl FrontendState {
    /// Statements prepared or dropped by SQL (`PREPARE`, `DEALLOCATE`,
    /// `DISCARD ALL`) are the same objects a Bind can name; an allowed
    /// PREPARE makes its name known with the judgement it got.
    fn track_sql_prepares(&mut self, analysis: &Arc<Analysis>, bytes: usize, decision: &Decision) {
        for (index, facts) in analysis.statements.iter().enumerate() {
            match &facts.prepared_effect {
                PreparedEffect::None => {}
                PreparedEffect::Prepare(name) => {
                    self.statements.insert(
                        name.clone(),
                        Arc::new(Prepared {
                            analysis: Arc::clone(analysis),
                            index,
                            bytes,
                            name: name.clone(),
                            decision: decision.clone(),
                        }),
                    );
                }
                PreparedEffect::Deallocate(name) => {
                    self.statements.remove(name);
                }
                PreparedEffect::DeallocateAll => self.statements.clear(),
            }
        }
    }
}

fn pending_for(p: &Prepared, decision: &Decision) -> PendingStatement {
    PendingStatement {
        protocol: "extended",
        analysis: Arc::clone(&p.analysis),
        index: p.index,
        bytes: p.bytes,
        prepared: Some(p.name.clone()),
        decision: decision.clone(),
        started: Instant::now(),
    }
}

/// One pending entry per statement of the text; at least one, so that a text
/// that does not parse is still audited.
fn pending_statements(
    protocol: &'static str,
    analysis: &Arc<Analysis>,
    bytes: usize,
    prepared: Option<&str>,
    decision: &Decision,
) -> Vec<PendingStatement> {
    let n = analysis
        .statements
        .len()
        .max(usize::from(analysis.parse_error.is_some()));
    let started = Instant::now();
    (0..n)
        .map(|index| PendingStatement {
            protocol,
            analysis: Arc::clone(analysis),
            index,
            bytes,
            prepared: prepared.map(str::to_owned),
            decision: decision.clone(),
            started,
        })
        .collect()
}

fn statement_record(info: &Arc<SessionInfo>, c: Completed) -> Record {
    let s = c.statement;
    let facts = s.analysis.statements.get(s.index);
    let statement = StatementRecord {
        protocol: s.protocol,
        text: facts.map(|f| f.text.clone()),
        fingerprint: facts.map(|f| f.fingerprint.clone()),
        kinds: facts.map(|f| f.kinds.clone()).unwrap_or_default(),
        objects: facts.map(|f| f.objects.clone()).unwrap_or_default(),
        functions: facts.map(|f| f.functions.clone()).unwrap_or_default(),
        bytes: s.bytes,
        prepared: s.prepared,
    };
    Record::new(
        "statement",
        Arc::clone(info),
        RecordBody::Statement {
            statement,
            decision: DecisionRecord::from(&s.decision),
            outcome: c.outcome,
        },
    )
}
