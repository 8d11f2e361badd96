//! The relay loop of a logged-in session: client messages are judged and
//! forwarded, backend messages are accounted for and passed back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::masking::ResultMasker;
use super::names::{ByName, Fast, Named};
use super::stream::{fill, ReadError};
use super::tracker::{Completed, Expect, PendingStatement, Statements, Tracker, Verdict};
use super::Shared;
use crate::audit::{
    DecisionRecord, Record, RecordBody, SessionInfo, StatementLines, StatementRecord,
};
use crate::mask::plan::RowSource;
use crate::policy::masking::MaskSet;
use crate::policy::{self, Decision, Policy, PolicyStore, Who};
use crate::sql::lineage::{CursorEffect, RowsOf};
use crate::sql::{Analysis, PreparedEffect, StatementFacts};
use crate::wire::frontend::{self as fe, Target};
use crate::wire::{backend, DecodeError, Frame, FrameError, FrameRef, FrameSplitter};

/// What a denied message is replaced with upstream: text the server's parser
/// rejects at once, so the server raises an error at exactly that point of
/// the stream and applies its own error rules (abort the transaction,
/// discard until Sync). Its error is then replaced by the denial.
const DENIED_SQL: &str = "agentgate_denied";
const DENIED_STATEMENT: &str = "agentgate_denied";

/// What goes upstream for a judged client message.
enum Pass {
    Forward,
    /// A stand-in (a denial's failing statement).
    Replace(Frame),
}

/// Why a relay ended.
#[derive(Debug)]
pub enum End {
    ClientTerminated,
    ClientGone,
    ServerGone,
    /// The client sent something that is not the protocol; it gets a FATAL.
    Malformed(String),
    Io(String),
    /// The gateway is shutting down; the client gets a FATAL.
    Shutdown,
}

impl End {
    pub fn describe(&self) -> String {
        match self {
            End::ClientTerminated => "client terminated".into(),
            End::ClientGone => "client closed the connection".into(),
            End::ServerGone => "database closed the connection".into(),
            End::Malformed(m) => format!("malformed client message: {m}"),
            End::Io(m) => m.clone(),
            End::Shutdown => "gateway shutting down".into(),
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

/// Where the messages of a client batch are put on record as they are
/// judged: the tracker, locked once for the batch rather than once per
/// message, and the statements completed meanwhile.
struct Ledger<'a> {
    tracker: std::sync::MutexGuard<'a, Tracker>,
    done: &'a mut Vec<Completed>,
}

impl Ledger<'_> {
    fn push(&mut self, expect: Expect) {
        self.tracker.push(expect, self.done);
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
    name: Arc<str>,
    decision: Arc<Decision>,
}

/// Messages bound for one peer, joined back into one buffer. Adjacent frames
/// of one read are rejoined without copying (`unsplit` of neighbours).
#[derive(Default)]
pub(super) struct Outbox {
    buf: BytesMut,
}

impl Outbox {
    fn push(&mut self, frame: Frame) {
        self.push_bytes(frame.into_buf());
    }

    /// Whole messages taken off the front of a read buffer.
    fn push_bytes(&mut self, bytes: BytesMut) {
        if !bytes.is_empty() {
            self.buf.unsplit(bytes);
        }
    }

    /// Moves the `kept` bytes at the front of `buf` (messages judged and
    /// going through unchanged) here, leaving `kept` at zero.
    fn take_kept(&mut self, buf: &mut BytesMut, kept: &mut usize) {
        if *kept > 0 {
            self.push_bytes(buf.split_to(std::mem::take(kept)));
        }
    }

    async fn send<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.buf);
        w.write_all(&out).await?;
        w.flush().await
    }

    pub(super) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Writes as much as a non-blocking socket takes; true once all is
    /// out, false when the socket is full and the rest waits here.
    pub(super) fn send_now(&mut self, w: &mut impl std::io::Write) -> std::io::Result<bool> {
        if self.buf.is_empty() {
            return Ok(true);
        }
        while !self.buf.is_empty() {
            match w.write(&self.buf) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => self.buf.advance(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // Drops the view into the read buffer, so it can be reused.
        self.buf = BytesMut::new();
        Ok(true)
    }

    /// What has not been sent.
    pub(super) fn into_unsent(self) -> BytesMut {
        self.buf
    }
}

pub struct Relay {
    pub shared: Arc<Shared>,
    pub info: Arc<SessionInfo>,
    tracker: Mutex<Tracker>,
    statements_audited: std::sync::atomic::AtomicU64,
    /// The part of its statement lines the audit can reuse.
    lines: Mutex<StatementLines>,
    /// The session's masking rules under the policy in force.
    mask: Mutex<Arc<MaskSet>>,
    /// Woken, once shutdown has begun, after each batch the backend
    /// direction passes to the client, so a drain can look again.
    rest: tokio::sync::Notify,
}

impl Relay {
    pub fn new(shared: Arc<Shared>, info: Arc<SessionInfo>) -> Self {
        Self {
            shared,
            info,
            tracker: Mutex::new(Tracker::default()),
            statements_audited: Default::default(),
            lines: Mutex::default(),
            mask: Mutex::new(Arc::new(MaskSet::default())),
            rest: tokio::sync::Notify::new(),
        }
    }

    /// Returns once nothing is in flight and no transaction is open, so the
    /// session can end at shutdown without cutting the client's work short.
    pub async fn rested(&self) {
        loop {
            let woken = self.rest.notified();
            tokio::pin!(woken);
            // Registered before looking, so a wake-up in between is kept.
            woken.as_mut().enable();
            if self.tracker().at_rest() {
                return;
            }
            woken.await;
        }
    }

    /// The masking rules for the results of the next backend batch (the
    /// client side picks up policy reloads).
    pub(super) fn backend_mask(&self) -> Arc<MaskSet> {
        let mask = Arc::clone(&self.mask.lock().unwrap_or_else(|p| p.into_inner()));
        self.tracker().masking = !mask.is_empty();
        mask
    }

    /// After each backend batch passed to the client: once shutdown has
    /// begun, the drain looks again whether the session rests.
    pub(super) fn offer_rest(&self) {
        if self.shared.shutdown.is_cancelled() {
            self.rest.notify_waiters();
        }
    }

    pub fn statements_audited(&self) -> u64 {
        self.statements_audited
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn tracker(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Audits completed statements, waiting for room in the audit buffer
    /// when it is full.
    pub(super) async fn emit(&self, done: &mut Vec<Completed>) -> Result<(), End> {
        while !self.try_emit(done)? {
            // The buffer is full: wait for room for the first one left.
            let c = done.remove(0);
            self.account(&c);
            self.shared
                .audit
                .emit(statement_record(&self.info, c))
                .await
                .map_err(audit_failed)?;
        }
        Ok(())
    }

    /// Audits completed statements without waiting; false when the audit
    /// buffer is full, with the statements not yet audited left in `done`.
    pub(super) fn try_emit(&self, done: &mut Vec<Completed>) -> Result<bool, End> {
        if done.is_empty() {
            return Ok(true);
        }
        let mut sent = 0;
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        let all = loop {
            let Some(c) = done.get(sent) else {
                break Ok(true);
            };
            let s = &c.statement;
            match self.shared.audit.try_emit_statement(
                &self.info,
                &s.statement,
                &s.decision,
                &c.outcome,
                &mut lines,
            ) {
                Ok(true) => {
                    self.account(c);
                    sent += 1;
                }
                Ok(false) => break Ok(false),
                Err(e) => break Err(audit_failed(e)),
            }
        };
        done.drain(..sent);
        all
    }

    /// Counts an audited statement; a DDL statement that succeeded may have
    /// changed names, columns or views under the masks.
    fn account(&self, c: &Completed) {
        self.statements_audited
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let s = &c.statement;
        let ddl = s
            .statement
            .analysis
            .statements
            .get(s.statement.index)
            .is_some_and(|f| f.kinds.contains(&"ddl"));
        if ddl && c.outcome.status == "ok" {
            self.shared
                .catalogs
                .invalidate(&self.info.target.addr, &self.info.target.database);
        }
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
        let mut state = FrontendState::new(who);
        let mut out = Outbox::default();
        let mut done = Vec::new();
        loop {
            let terminate =
                match self.frontend_batch(&splitter, &mut buf, &mut state, &mut out, &mut done) {
                    Ok(t) => t,
                    Err(end) => {
                        // What was judged before the bad message is audited.
                        let _ = self.emit(&mut done).await;
                        return end;
                    }
                };
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

    /// Judges the whole messages at the front of `buf` and moves what goes
    /// upstream into `out`; true when the client said Terminate.
    pub(super) fn frontend_batch(
        &self,
        splitter: &FrameSplitter,
        buf: &mut BytesMut,
        state: &mut FrontendState,
        out: &mut Outbox,
        done: &mut Vec<Completed>,
    ) -> Result<bool, End> {
        let mut terminate = false;
        // A reloaded policy applies from the next batch of messages on: one
        // look per batch rather than per message.
        if state.judge.refresh(&self.shared.policy) {
            *self.mask.lock().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&state.judge.mask);
        }
        let mut ledger = Ledger {
            tracker: self.tracker(),
            done,
        };
        // Bytes at the front of `buf` judged and going upstream as they are.
        let mut kept = 0;
        while let Some(total) = splitter.peek(&buf[kept..])? {
            let frame = FrameRef::new(&buf[kept..kept + total]);
            terminate = frame.tag() == fe::TERMINATE;
            let pass = self.judge(frame, state, &mut ledger)?;
            match (pass, state.inject.take()) {
                (Pass::Forward, None) => kept += total,
                (pass, inject) => {
                    out.take_kept(buf, &mut kept);
                    if let Some(pre) = inject {
                        out.push(pre);
                    }
                    match pass {
                        // Now at the front of `buf`: it starts the next run.
                        Pass::Forward => kept = total,
                        Pass::Replace(f) => {
                            buf.advance(total);
                            out.push(f);
                        }
                    }
                }
            }
            if terminate {
                break;
            }
        }
        out.take_kept(buf, &mut kept);
        splitter.reserve_pending(buf)?;
        Ok(terminate)
    }

    /// The analysis of a statement text off the wire and the decision on
    /// it. A text the cache knows by its bytes is not checked for UTF-8
    /// again; an unknown one must be UTF-8, or the message is malformed.
    fn judge_text(
        &self,
        text: fe::SqlText<'_>,
        judge: &mut Judge,
        healthy: bool,
    ) -> Result<(Arc<Analysis>, Arc<Decision>), End> {
        let cache = &self.shared.cache;
        let analysis = match cache.known(text.bytes()) {
            Some(known) => known,
            None => cache.analyze_unknown(text.check()?),
        };
        let decision = if healthy {
            judge.decide(&analysis)
        } else {
            Arc::new(Decision::audit_unavailable())
        };
        let decision = self.deny_computed(decision, judge, &analysis);
        Ok((analysis, decision))
    }

    /// Judges one client message and says what goes upstream in its place.
    fn judge(
        &self,
        frame: FrameRef<'_>,
        state: &mut FrontendState,
        ledger: &mut Ledger<'_>,
    ) -> Result<Pass, End> {
        let body = frame.body();
        let healthy = self.shared.audit.is_healthy();
        let expect = match frame.tag() {
            fe::QUERY => {
                let text = fe::decode_query(body)?;
                let (analysis, decision) = self.judge_text(text, &mut state.judge, healthy)?;
                if !decision.lets_through() {
                    let pending = pending_statements(
                        "simple",
                        &analysis,
                        text.len(),
                        None,
                        &decision,
                        no_rows,
                    );
                    return Ok(Pass::Replace(self.deny_simple(pending, &decision, ledger)));
                }
                // Row sources matter only to masking.
                let masking = !state.judge.mask.is_empty();
                let pending =
                    pending_statements("simple", &analysis, text.len(), None, &decision, |f| {
                        if masking {
                            state.rows_in_turn(f)
                        } else {
                            RowSource::NoData
                        }
                    });
                state.track_sql_prepares(&analysis, text.len(), &decision);
                Expect::Simple(pending)
            }
            fe::PARSE => {
                let parse = fe::decode_parse(body)?;
                let (analysis, decision) =
                    self.judge_text(parse.query, &mut state.judge, healthy)?;
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
                        no_rows,
                    );
                    return Ok(Pass::Replace(
                        self.deny_extended(pending, &decision, ledger),
                    ));
                }
                state.track_sql_prepares(&analysis, parse.query.len(), &decision);
                // Drivers re-parse the unnamed statement with the same text
                // for every execution: the entry it would get is the one
                // already there.
                let same = state.statements.get(parse.statement).is_some_and(|p| {
                    Arc::ptr_eq(&p.analysis, &analysis)
                        && p.bytes == parse.query.len()
                        && p.decision == decision
                });
                if !same {
                    state.statements.insert(
                        parse.statement,
                        Arc::new(Prepared {
                            analysis,
                            index: 0,
                            bytes: parse.query.len(),
                            name: Arc::from(parse.statement),
                            decision,
                        }),
                    );
                }
                state.described.remove(Target::Statement(parse.statement));
                Expect::Parse(parse.statement.to_owned())
            }
            fe::BIND => {
                let bind = fe::decode_bind(body)?;
                match state.statements.get(bind.statement) {
                    Some(p) => {
                        state.portals.insert(
                            bind.portal,
                            Portal {
                                prepared: Arc::clone(p),
                                formats: bind.result_formats,
                            },
                        );
                        state.described.remove(Target::Portal(bind.portal));
                        Expect::Bind(bind.portal.to_owned())
                    }
                    None => {
                        state.portals.remove(bind.portal);
                        let decision = Decision::unknown_statement(&format!(
                            "prepared statement {:?}",
                            bind.statement
                        ));
                        return Ok(Pass::Replace(self.deny_extended(
                            Statements::new(),
                            &decision,
                            ledger,
                        )));
                    }
                }
            }
            fe::EXECUTE => {
                let exec = fe::decode_execute(body)?;
                let Some(p) = state.portals.get(exec.portal) else {
                    let decision =
                        Decision::unknown_statement(&format!("portal {:?}", exec.portal));
                    return Ok(Pass::Replace(self.deny_extended(
                        Statements::new(),
                        &decision,
                        ledger,
                    )));
                };
                if !healthy {
                    let decision = Arc::new(Decision::audit_unavailable());
                    let pending =
                        smallvec::smallvec![pending_for(&p.prepared, &decision, RowSource::NoData)];
                    return Ok(Pass::Replace(
                        self.deny_extended(pending, &decision, ledger),
                    ));
                }
                let rows = state.rows_of_prepared(&p.prepared);
                let prepared = Arc::clone(&p.prepared);
                let formats = p.formats.clone();
                // A cursor declared or closed in the extended protocol.
                if let Some(facts) = prepared.analysis.statements.get(prepared.index) {
                    state.apply_cursor_effect(facts);
                }
                let mut pending = pending_for(&prepared, &prepared.decision, rows);
                pending.portal = Some(exec.portal.to_owned());
                pending.formats = formats;
                // Masking needs the row shape; a client that never described
                // this portal or its statement gets one asked for it.
                let portal = Target::Portal(exec.portal);
                if !state.judge.mask.is_empty()
                    && !state.described.contains(portal)
                    && !state.described.contains(Target::Statement(&prepared.name))
                {
                    state.inject = Some(fe::describe_portal(exec.portal));
                    ledger.push(Expect::Describe {
                        target: portal.into(),
                        hidden: true,
                    });
                    state.described.insert(portal, ());
                }
                Expect::Execute(pending)
            }
            fe::DESCRIBE => {
                let target = fe::decode_target(fe::DESCRIBE, body)?;
                // Only masking asks which portals were described; a session
                // that starts masking later may describe one portal twice.
                if !state.judge.mask.is_empty() {
                    state.described.insert(target, ());
                }
                Expect::Describe {
                    target: target.into(),
                    hidden: false,
                }
            }
            fe::CLOSE => {
                match fe::decode_target(fe::CLOSE, body)? {
                    Target::Statement(name) => {
                        state.statements.remove(name);
                    }
                    Target::Portal(name) => {
                        state.portals.remove(name);
                    }
                };
                Expect::Close
            }
            fe::SYNC => {
                fe::decode_empty(fe::SYNC, body)?;
                Expect::Sync
            }
            fe::FLUSH | fe::TERMINATE | fe::COPY_DONE => {
                fe::decode_empty(frame.tag(), body)?;
                return Ok(Pass::Forward);
            }
            fe::COPY_DATA => return Ok(Pass::Forward),
            fe::COPY_FAIL => {
                fe::decode_copy_fail(body)?;
                return Ok(Pass::Forward);
            }
            fe::FUNCTION_CALL => {
                let decision = Arc::new(Decision::function_call());
                let pending = smallvec::smallvec![PendingStatement {
                    statement: StatementRecord {
                        protocol: "function_call",
                        analysis: Arc::new(Analysis {
                            statements: Vec::new(),
                            parse_error: None,
                            shareable: false,
                        }),
                        index: 0,
                        bytes: body.len(),
                        prepared: None,
                    },
                    decision: Arc::clone(&decision),
                    started: Instant::now(),
                    rows: RowSource::NoData,
                    portal: None,
                    formats: fe::ResultFormats::default(),
                }];
                return Ok(Pass::Replace(self.deny_simple(pending, &decision, ledger)));
            }
            other => {
                return Err(End::Malformed(format!(
                    "unknown message type '{}'",
                    other.escape_ascii()
                )))
            }
        };
        ledger.push(expect);
        Ok(Pass::Forward)
    }

    /// Refuses a statement whose computed output would carry a column
    /// protected by a rule with `computed: deny`. Judged by the names in the
    /// statement and what the catalog cache already knows (views,
    /// partitions); anything it misses is still masked in the result.
    fn deny_computed(
        &self,
        decision: Arc<Decision>,
        judge: &Judge,
        analysis: &Analysis,
    ) -> Arc<Decision> {
        if !decision.lets_through() || !judge.mask.has_computed_deny() {
            return decision;
        }
        let catalog = self
            .shared
            .catalogs
            .get(&self.info.target.addr, &self.info.target.database);
        let state = catalog.read();
        let resolver = crate::mask::plan::Resolver {
            set: &judge.mask,
            catalog: Some(&state),
        };
        for facts in &analysis.statements {
            if let Some(l) = &facts.output.lineage {
                if let Some(rule) = resolver.computed_denial(l) {
                    let label = judge
                        .policy
                        .as_ref()
                        .map(|p| Arc::clone(&p.label))
                        .unwrap_or_else(|| Arc::from("builtin"));
                    return Arc::new(Decision::computed_from_protected(&rule, label));
                }
            }
        }
        decision
    }

    fn deny_simple(
        &self,
        statements: Statements,
        decision: &Decision,
        ledger: &mut Ledger<'_>,
    ) -> Frame {
        self.deny(statements, decision, false, ledger);
        fe::query(DENIED_SQL)
    }

    fn deny_extended(
        &self,
        statements: Statements,
        decision: &Decision,
        ledger: &mut Ledger<'_>,
    ) -> Frame {
        self.deny(statements, decision, true, ledger);
        fe::parse(DENIED_STATEMENT, DENIED_SQL)
    }

    fn deny(
        &self,
        statements: Statements,
        decision: &Decision,
        extended: bool,
        ledger: &mut Ledger<'_>,
    ) {
        tracing::info!(session = %self.info.session, rule = %decision.rule, "statement denied");
        let error = backend::error_response(
            "ERROR",
            backend::INSUFFICIENT_PRIVILEGE,
            &decision.client_message(),
        );
        ledger.push(Expect::Denied {
            statements,
            error,
            extended,
        });
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
        let catalog = self
            .shared
            .catalogs
            .get(&self.info.target.addr, &self.info.target.database);
        let mut masker = ResultMasker::new(Some(catalog));
        loop {
            let mask = self.backend_mask();
            let mut planned = false;
            loop {
                match self.backend_batch(
                    &splitter,
                    &mut buf,
                    &mut masker,
                    &mask,
                    planned,
                    &mut out,
                    &mut done,
                ) {
                    Ok(None) => break,
                    Ok(Some(request)) => {
                        masker.prepare(request, &mask).await;
                        planned = true;
                    }
                    Err(end) => {
                        let _ = self.emit(&mut done).await;
                        return end;
                    }
                }
            }
            if let Err(e) = out.send(client).await {
                return End::Io(format!("writing to the client: {e}"));
            }
            if let Err(end) = self.emit(&mut done).await {
                return end;
            }
            self.offer_rest();
            match fill(upstream, &mut buf).await {
                Ok(()) => {}
                Err(ReadError::Closed) => return End::ServerGone,
                Err(e) => return End::Io(format!("reading from the database: {e}")),
            }
        }
    }

    /// Accounts for the whole messages at the front of `buf` and moves what
    /// goes to the client into `out`. Stops early with what a masking plan
    /// needs when the message at the front needs one (`planned` says it has
    /// been made since).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backend_batch(
        &self,
        splitter: &FrameSplitter,
        buf: &mut BytesMut,
        masker: &mut ResultMasker,
        mask: &Arc<MaskSet>,
        mut planned: bool,
        out: &mut Outbox,
        done: &mut Vec<Completed>,
    ) -> Result<Option<super::masking::Request>, End> {
        let bad_frame = |e: FrameError| End::Io(format!("database sent a bad frame: {e}"));
        // Bytes at the front of `buf` going to the client as they are.
        let mut kept = 0;
        // Locked at the first message it follows, then kept for the batch.
        let mut tracker = None;
        while let Some(total) = splitter.peek(&buf[kept..]).map_err(bad_frame)? {
            let frame = FrameRef::new(&buf[kept..kept + total]);
            let tag = frame.tag();
            let mut masked = None;
            if !mask.is_empty() {
                if !planned && masker.needs_plan(tag) {
                    out.take_kept(buf, &mut kept);
                    let tracker = tracker.get_or_insert_with(|| self.tracker());
                    return Ok(Some(ResultMasker::request(
                        tracker,
                        FrameRef::new(&buf[..total]),
                    )));
                }
                // `planned` was for the message at the front only.
                planned = false;
                match masker.rewrite(mask, frame) {
                    Ok(m) => masked = m,
                    Err(e) => return Err(End::Io(format!("database sent a bad message: {e}"))),
                }
            }
            if masked.is_none() && !Tracker::follows(tag) {
                // Rows and copy data: nothing to account for.
                kept += total;
                continue;
            }
            let before = done.len();
            let verdict = {
                let tracker = tracker.get_or_insert_with(|| self.tracker());
                let seen = masked.as_ref().map_or(frame, Frame::as_ref);
                let v = tracker.on_backend(seen, done);
                if ends_result(tag) {
                    tracker.end_result();
                }
                v
            };
            if ends_result(tag) {
                let counts = masker.finish();
                if let (Some(c), Some(first)) = (counts, done.get_mut(before)) {
                    first.outcome.masked = Some(c);
                }
            }
            match (verdict, masked) {
                (Verdict::Forward, None) => kept += total,
                (verdict, masked) => {
                    out.take_kept(buf, &mut kept);
                    buf.advance(total);
                    match (verdict, masked) {
                        (Verdict::Forward, Some(m)) => out.push(m),
                        (Verdict::Replace(f), _) => out.push(f),
                        (Verdict::Forward, None) | (Verdict::Drop, _) => {}
                    }
                }
            }
        }
        out.take_kept(buf, &mut kept);
        splitter.reserve_pending(buf).map_err(bad_frame)?;
        Ok(None)
    }
}

/// Messages after which no more rows of the current result come.
fn ends_result(tag: u8) -> bool {
    matches!(
        tag,
        backend::COMMAND_COMPLETE
            | backend::EMPTY_QUERY_RESPONSE
            | backend::PORTAL_SUSPENDED
            | backend::ERROR_RESPONSE
            | backend::READY_FOR_QUERY
    )
}

pub(super) struct FrontendState {
    judge: Judge,
    statements: ByName<Arc<Prepared>>,
    portals: ByName<Portal>,
    /// What each cursor declared through the gateway returns.
    cursors: HashMap<String, RowSource, Fast>,
    /// Statements and portals the client has described since they were
    /// (re)defined.
    described: Named<()>,
    /// A message the gateway sends upstream before the one being judged.
    inject: Option<Frame>,
}

impl FrontendState {
    pub(super) fn new(who: Who) -> Self {
        Self {
            judge: Judge::new(who),
            statements: ByName::default(),
            portals: ByName::default(),
            cursors: HashMap::default(),
            described: Named::default(),
            inject: None,
        }
    }
}

/// A bound portal: its statement and the result formats Bind asked for.
struct Portal {
    prepared: Arc<Prepared>,
    formats: fe::ResultFormats,
}

/// One session's view of the policy: its identities under the policy in
/// force, and decisions cached by analysis (the identity is fixed for the
/// session, so the analysis is the rest of the key). A reload clears both.
struct Judge {
    who: Who,
    version: u64,
    policy: Option<Arc<Policy>>,
    identities: Vec<usize>,
    /// Keyed by the analysis' address; the entry holds the analysis so the
    /// address cannot be reused while it is a key.
    cache: HashMap<usize, (Arc<Analysis>, Arc<Decision>), Fast>,
    mask: Arc<MaskSet>,
}

const DECISION_CACHE_ENTRIES: usize = 4096;

impl Judge {
    fn new(who: Who) -> Self {
        Self {
            who,
            version: 0,
            policy: None,
            identities: Vec::new(),
            cache: HashMap::default(),
            mask: Arc::new(MaskSet::default()),
        }
    }

    /// Picks up a reloaded policy; true when it changed.
    fn refresh(&mut self, store: &PolicyStore) -> bool {
        if store.version() == self.version {
            return false;
        }
        let (version, policy) = store.current();
        self.identities = policy
            .as_ref()
            .map(|p| p.identities_of(&self.who))
            .unwrap_or_default();
        self.mask = Arc::new(
            policy
                .as_ref()
                .map(|p| p.mask_set(&self.identities))
                .unwrap_or_default(),
        );
        self.version = version;
        self.policy = policy;
        self.cache.clear();
        true
    }

    /// The decision under the policy last picked up by `refresh`.
    fn decide(&mut self, analysis: &Arc<Analysis>) -> Arc<Decision> {
        let key = Arc::as_ptr(analysis) as usize;
        if let Some((_, d)) = self.cache.get(&key) {
            return Arc::clone(d);
        }
        let d = Arc::new(policy::decide(
            self.policy.as_deref(),
            &self.identities,
            analysis,
        ));
        if self.cache.len() >= DECISION_CACHE_ENTRIES {
            self.cache.clear();
        }
        self.cache
            .insert(key, (Arc::clone(analysis), Arc::clone(&d)));
        d
    }
}

impl FrontendState {
    /// What a statement of an allowed text returns; called for each in
    /// order, since the cursors it declares and closes change what later
    /// statements read.
    fn rows_in_turn(&mut self, facts: &StatementFacts) -> RowSource {
        let rows = self.rows_of(facts);
        self.apply_cursor_effect(facts);
        rows
    }

    fn apply_cursor_effect(&mut self, facts: &StatementFacts) {
        match &facts.output.cursor {
            Some(CursorEffect::Declare(name)) => {
                let declared = match &facts.output.lineage {
                    Some(l) => RowSource::Known(Arc::clone(l)),
                    None => RowSource::Unknown,
                };
                self.cursors.insert(name.clone(), declared);
            }
            Some(CursorEffect::Close(name)) => {
                self.cursors.remove(name);
            }
            Some(CursorEffect::CloseAll) => self.cursors.clear(),
            None => {}
        }
    }

    fn rows_of(&self, facts: &StatementFacts) -> RowSource {
        match &facts.output.rows_of {
            Some(RowsOf::Cursor(name)) => self
                .cursors
                .get(name)
                .cloned()
                .unwrap_or(RowSource::Unknown),
            Some(RowsOf::Prepared(name)) => match self.statements.get(name) {
                Some(p) => self.rows_of_prepared(p),
                None => RowSource::Unknown,
            },
            None => match &facts.output.lineage {
                Some(l) => RowSource::Known(Arc::clone(l)),
                // Procedures return what they like.
                None if facts.kinds.first() == Some(&"call") => RowSource::Unknown,
                None => RowSource::NoData,
            },
        }
    }

    fn rows_of_prepared(&self, p: &Prepared) -> RowSource {
        match p.analysis.statements.get(p.index) {
            // A SQL PREPARE's lineage is its statement's; a Parse's is its own.
            Some(f) => match (&f.output.lineage, &f.output.rows_of) {
                (Some(l), _) => RowSource::Known(Arc::clone(l)),
                (None, Some(_)) => self.rows_of(f),
                (None, None) if f.kinds.first() == Some(&"call") => RowSource::Unknown,
                (None, None) => RowSource::NoData,
            },
            None => RowSource::Unknown,
        }
    }

    /// Statements prepared or dropped by SQL (`PREPARE`, `DEALLOCATE`,
    /// `DISCARD ALL`) are the same objects a Bind can name; an allowed
    /// PREPARE makes its name known with the judgement it got.
    fn track_sql_prepares(
        &mut self,
        analysis: &Arc<Analysis>,
        bytes: usize,
        decision: &Arc<Decision>,
    ) {
        for (index, facts) in analysis.statements.iter().enumerate() {
            match &facts.prepared_effect {
                PreparedEffect::None => {}
                PreparedEffect::Prepare(name) => {
                    self.statements.insert(
                        name,
                        Arc::new(Prepared {
                            analysis: Arc::clone(analysis),
                            index,
                            bytes,
                            name: Arc::from(name.as_str()),
                            decision: Arc::clone(decision),
                        }),
                    );
                }
                PreparedEffect::Deallocate(name) => {
                    self.statements.remove(name);
                }
                PreparedEffect::DeallocateAll => self.statements.clear_named(),
            }
        }
    }
}

fn pending_for(p: &Prepared, decision: &Arc<Decision>, rows: RowSource) -> PendingStatement {
    PendingStatement {
        rows,
        portal: None,
        formats: fe::ResultFormats::default(),
        statement: StatementRecord {
            protocol: "extended",
            analysis: Arc::clone(&p.analysis),
            index: p.index,
            bytes: p.bytes,
            prepared: Some(Arc::clone(&p.name)),
        },
        decision: Arc::clone(decision),
        started: Instant::now(),
    }
}

/// One pending entry per statement of the text; at least one, so that a text
/// that does not parse is still audited. `rows` says what each statement
/// returns, called in order.
fn pending_statements(
    protocol: &'static str,
    analysis: &Arc<Analysis>,
    bytes: usize,
    prepared: Option<&str>,
    decision: &Arc<Decision>,
    mut rows: impl FnMut(&StatementFacts) -> RowSource,
) -> Statements {
    let n = analysis
        .statements
        .len()
        .max(usize::from(analysis.parse_error.is_some()));
    let started = Instant::now();
    (0..n)
        .map(|index| PendingStatement {
            rows: analysis
                .statements
                .get(index)
                .map_or(RowSource::NoData, &mut rows),
            portal: None,
            formats: fe::ResultFormats::default(),
            statement: StatementRecord {
                protocol,
                analysis: Arc::clone(analysis),
                index,
                bytes,
                prepared: prepared.map(Arc::from),
            },
            decision: Arc::clone(decision),
            started,
        })
        .collect()
}

/// What a denied statement returns: nothing.
fn no_rows(_: &StatementFacts) -> RowSource {
    RowSource::NoData
}

fn audit_failed(e: crate::audit::AuditError) -> End {
    End::Io(e.to_string())
}

fn statement_record(info: &Arc<SessionInfo>, c: Completed) -> Record {
    let s = c.statement;
    Record::new(
        "statement",
        Arc::clone(info),
        RecordBody::Statement {
            statement: s.statement,
            decision: DecisionRecord(Arc::unwrap_or_clone(s.decision)),
            outcome: c.outcome,
        },
    )
}
