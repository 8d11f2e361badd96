//! The single writer of the audit stream.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use super::record::{
    decision_json, push_json_name, push_json_str, Outcome, Record, RecordBody, SessionInfo,
    Stamper, StatementRecord, StatementRef,
};
use super::write_behind::WriteBehind;
use crate::policy::Decision;

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    Stdout,
    File(PathBuf),
}

impl AuditTarget {
    /// `-` is stdout; anything else is a file path, appended to.
    pub fn parse(s: &str) -> Self {
        if s == "-" {
            Self::Stdout
        } else {
            Self::File(PathBuf::from(s))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the audit writer thread: {0}")]
    Thread(std::io::Error),
    #[error("the audit writer has stopped")]
    Stopped,
}

/// Lines waiting for the writer, already numbered and serialised.
struct Pending {
    bytes: Vec<u8>,
    seq: u64,
    /// Flush requests, answered once everything before them is written.
    flushes: Vec<oneshot::Sender<()>>,
    /// The writer thread has ended (it never does while the sink lives).
    stopped: bool,
    stamper: Stamper,
}

struct Inner {
    pending: Mutex<Pending>,
    /// How many serialised bytes may wait before sessions wait for the writer.
    max_pending: usize,
    /// Wakes an idle writer (it polls while records keep coming).
    wake: Condvar,
    writer_idle: AtomicBool,
    /// Wakes sessions waiting for room in a full buffer.
    room: Notify,
    healthy: AtomicBool,
    /// Records that had to wait for room since the last warning.
    held_back: AtomicU64,
    /// When that warning went out, in ms since the sink opened (0: never).
    warned_at_ms: AtomicU64,
    opened: Instant,
}

/// At most one "not keeping up" warning this often: a slow sink would
/// otherwise flood the log it may itself be part of.
const HELD_BACK_WARNING_EVERY_MS: u64 = 10_000;

impl Inner {
    /// Counts a record held back by a full buffer, and says so now and then:
    /// the operator learns the audit sink is the bottleneck.
    fn note_held_back(&self) {
        self.held_back.fetch_add(1, Ordering::Relaxed);
        let now = u64::try_from(self.opened.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let last = self.warned_at_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < HELD_BACK_WARNING_EVERY_MS {
            return;
        }
        if self
            .warned_at_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::warn!(
                held_back = self.held_back.swap(0, Ordering::Relaxed),
                buffer_bytes = self.max_pending,
                "the audit sink is not keeping up: statements wait for room in the audit buffer \
                 (nothing is dropped; the sessions are slowed down)"
            );
        }
    }
}

/// A handle to the audit stream; cheap to clone, one per session.
///
/// Sessions serialise and number their records straight into a shared
/// buffer; the writer thread swaps it out and writes it. No record is
/// boxed, queued or freed on another thread, so the relay threads and the
/// writer never contend in the allocator.
#[derive(Clone)]
pub struct AuditSink {
    inner: Arc<Inner>,
}

const FLUSH_EVERY: Duration = Duration::from_millis(100);
const RETRY_EVERY: Duration = Duration::from_millis(500);
/// While records keep coming, the writer polls at this interval instead of
/// being woken for each one: one wake-up and one write per batch. Each
/// write of a file costs the kernel a fixed part besides the copy, so
/// fewer, larger writes cost less: at 25 ms rather than 5 the writer's
/// system time per statement was about halved (0.5-0.6 us against 1.0-1.2
/// on the bench's select-only load), well inside the 100 ms flush bound.
const BATCH_WINDOW: Duration = Duration::from_millis(25);

impl AuditSink {
    /// `max_pending`: serialised bytes that may wait for the writer before
    /// sessions wait for room.
    pub fn open(target: &AuditTarget, max_pending: usize) -> Result<Self, AuditError> {
        let writer = match target {
            AuditTarget::Stdout => Writer::new(std::io::stdout()),
            AuditTarget::File(path) => Writer::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| AuditError::Open {
                        path: path.clone(),
                        source,
                    })?,
            ),
        };
        let inner = Arc::new(Inner {
            pending: Mutex::new(Pending {
                bytes: Vec::with_capacity(64 * 1024),
                seq: 0,
                flushes: Vec::new(),
                stopped: false,
                stamper: Stamper::default(),
            }),
            max_pending,
            wake: Condvar::new(),
            writer_idle: AtomicBool::new(false),
            room: Notify::new(),
            healthy: AtomicBool::new(true),
            held_back: AtomicU64::new(0),
            warned_at_ms: AtomicU64::new(0),
            opened: Instant::now(),
        });
        let shared = Arc::clone(&inner);
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || run_writer(writer, shared))
            .map_err(AuditError::Thread)?;
        Ok(Self { inner })
    }

    /// False while the last write failed: sessions must deny statements.
    pub fn is_healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        // Appends are whole lines or nothing, so a poisoned lock still holds
        // a consistent buffer.
        self.inner.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake_writer(&self) {
        // Looked at before the swap: the writer is nearly always busy
        // gathering a batch, and a load is not a locked instruction.
        let idle = &self.inner.writer_idle;
        if idle.load(Ordering::Acquire) && idle.swap(false, Ordering::AcqRel) {
            self.inner.wake.notify_one();
        }
    }

    /// Wakes the writer whether idle or letting a batch gather: a flush, or
    /// a session held back by a full buffer, needs it now.
    fn hurry_writer(&self) {
        self.inner.writer_idle.store(false, Ordering::Release);
        self.inner.wake.notify_one();
    }

    /// Numbers and appends a record, waiting for room when the writer is
    /// behind (a full buffer slows sessions down; it never drops a record).
    pub async fn emit(&self, record: Record) -> Result<(), AuditError> {
        let mut counted = false;
        loop {
            let room = self.inner.room.notified();
            if self.try_emit(&record)? {
                return Ok(());
            }
            if !counted {
                counted = true;
                self.inner.note_held_back();
            }
            self.hurry_writer();
            room.await;
        }
    }

    /// Appends a record if the buffer has room (the usual case, with no
    /// future to set up); false when the caller must wait with `emit`.
    pub fn try_emit(&self, record: &Record) -> Result<bool, AuditError> {
        self.try_append(|out, seq, stamper| append(out, seq, stamper, record))
    }

    /// `try_emit` for a statement's line, from the relay's own records
    /// (building a `Record` would only move and drop them). `lines` is the
    /// session's: the part of the line its last statement shares with this
    /// one is reused rather than serialised again.
    pub fn try_emit_statement(
        &self,
        session: &Arc<SessionInfo>,
        statement: &StatementRecord,
        decision: &Arc<Decision>,
        outcome: &Outcome,
        lines: &mut StatementLines,
    ) -> Result<bool, AuditError> {
        let ts = std::time::SystemTime::now();
        self.try_append(|out, seq, stamper| {
            let start = out.len();
            opening(out, seq, stamper, ts);
            let written = lines
                .push(out, session, statement, decision)
                .and_then(|()| outcome.write_json(out));
            end_statement_line(out, start, written);
        })
    }

    /// Numbers one line and lets `write` append it, unless the buffer is
    /// full (false) or the writer has stopped.
    fn try_append(
        &self,
        write: impl FnOnce(&mut Vec<u8>, u64, &mut Stamper),
    ) -> Result<bool, AuditError> {
        let mut p = self.lock();
        if p.stopped {
            return Err(AuditError::Stopped);
        }
        if p.bytes.len() >= self.inner.max_pending {
            return Ok(false);
        }
        p.seq += 1;
        let Pending {
            bytes,
            seq,
            stamper,
            ..
        } = &mut *p;
        write(bytes, *seq, stamper);
        drop(p);
        self.wake_writer();
        Ok(true)
    }

    /// Returns once every record appended before the call is written and
    /// flushed (used at shutdown).
    pub async fn flush(&self) -> Result<(), AuditError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.lock();
            if p.stopped {
                return Err(AuditError::Stopped);
            }
            p.flushes.push(tx);
        }
        self.hurry_writer();
        rx.await.map_err(|_| AuditError::Stopped)
    }
}

/// Serialises one numbered line onto `out`: the fixed fields, the
/// session's members (serialised once per session), then the event's own.
fn append(out: &mut Vec<u8>, seq: u64, stamper: &mut Stamper, record: &Record) {
    let start = out.len();
    head(out, seq, stamper, record.ts, record.event, &record.session);
    if let RecordBody::Statement {
        statement,
        decision,
        outcome,
    } = &record.body
    {
        finish_statement(out, start, statement.as_ref(), &decision.0, outcome);
        return;
    }
    let body = out.len();
    // Serialising plain structs into a Vec cannot fail; if it somehow did,
    // the partial line is removed so the stream stays one object per line.
    if let Err(e) = serde_json::to_writer(&mut *out, &record.body) {
        out.truncate(start);
        tracing::error!(error = %e, "audit record could not be serialised");
        return;
    }
    // The body is an object: its members join the line's.
    if out.len() - body <= 2 {
        out.truncate(body);
        out.push(b'}');
    } else {
        out[body] = b',';
    }
    out.push(b'\n');
}

/// The members every line starts with, the session's included.
fn head(
    out: &mut Vec<u8>,
    seq: u64,
    stamper: &mut Stamper,
    ts: std::time::SystemTime,
    event: &'static str,
    session: &SessionInfo,
) {
    opening(out, seq, stamper, ts);
    event_and_session(out, event, session);
}

/// Every line's first bytes, the schema version written out once.
const OPENING: &str = "{\"v\":1,\"ts\":\"";

/// `{"v":..,"ts":..,"seq":..`: what differs on every line.
fn opening(out: &mut Vec<u8>, seq: u64, stamper: &mut Stamper, ts: std::time::SystemTime) {
    out.extend_from_slice(OPENING.as_bytes());
    stamper.push(out, ts);
    out.extend_from_slice(b"\",\"seq\":");
    out.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
}

/// `,"event":..` and the session's members (serialised once per session).
fn event_and_session(out: &mut Vec<u8>, event: &'static str, session: &SessionInfo) {
    out.extend_from_slice(b",\"event\":");
    push_json_name(out, event);
    let members = session.members();
    if !members.is_empty() {
        out.push(b',');
        out.extend_from_slice(members.as_bytes());
    }
}

/// The rest of a statement's line (the common record: its audited facts
/// were serialised once, when first audited).
fn finish_statement(
    out: &mut Vec<u8>,
    start: usize,
    statement: StatementRef<'_>,
    decision: &Decision,
    outcome: &Outcome,
) {
    let written =
        statement_members(out, statement, decision).and_then(|()| outcome.write_json(out));
    end_statement_line(out, start, written);
}

/// Closes a statement's line. Serialising into a Vec cannot fail; if it
/// somehow did, the half-made line is taken back from `start`.
fn end_statement_line(out: &mut Vec<u8>, start: usize, written: serde_json::Result<()>) {
    if written.is_err() {
        out.truncate(start);
        tracing::error!("audit record could not be serialised");
        return;
    }
    out.extend_from_slice(b"}\n");
}

/// `,"statement":{...},"decision":{...},"outcome":`, the members
/// `StatementRecord`'s own serialisation gives, up to the outcome's value.
fn statement_members(
    out: &mut Vec<u8>,
    statement: StatementRef<'_>,
    decision: &Decision,
) -> serde_json::Result<()> {
    statement_facts(out, statement);
    push_bytes(out, statement.bytes);
    statement_rest(out, statement.prepared, decision)
}

/// From `,"statement":{` to its audited facts, before `"bytes"`.
fn statement_facts(out: &mut Vec<u8>, statement: StatementRef<'_>) {
    out.extend_from_slice(b",\"statement\":{\"protocol\":");
    push_json_name(out, statement.protocol);
    match statement.analysis.statements.get(statement.index) {
        Some(f) => {
            out.push(b',');
            out.extend_from_slice(f.audit_members().as_bytes());
        }
        None => out.extend_from_slice(
            b",\"text\":null,\"fingerprint\":null,\"kinds\":[],\"objects\":[],\"functions\":[]",
        ),
    }
}

fn push_bytes(out: &mut Vec<u8>, bytes: usize) {
    out.extend_from_slice(b",\"bytes\":");
    out.extend_from_slice(itoa::Buffer::new().format(bytes).as_bytes());
}

/// After `"bytes"`: the prepared statement's name, the decision, and the
/// outcome's name.
fn statement_rest(
    out: &mut Vec<u8>,
    prepared: Option<&str>,
    decision: &Decision,
) -> serde_json::Result<()> {
    if let Some(p) = prepared {
        out.extend_from_slice(b",\"prepared\":");
        push_json_str(out, p)?;
    }
    out.extend_from_slice(b"},\"decision\":");
    out.extend_from_slice(decision_json(decision).as_bytes());
    out.extend_from_slice(b",\"outcome\":");
    Ok(())
}

/// The middle of a session's statement lines, from `,"event"` to
/// `"outcome":` but for the statement's length, kept for the statement it
/// was made for. A client runs the same few statements over and over (with
/// other literals, hence other lengths), and this part changes only with
/// the statement or its decision, while serialising it again is most of a
/// line's cost.
#[derive(Default)]
pub struct StatementLines {
    made_for: Option<LineKey>,
    /// Up to the statement's `"bytes"`.
    before: Vec<u8>,
    /// After it.
    after: Vec<u8>,
}

/// What a line's middle was made from. It holds the `Arc`s it compares by
/// address, so no other value can take one of those addresses while the
/// middle is kept: equal addresses mean the same, unchanging values.
struct LineKey {
    session: Arc<SessionInfo>,
    analysis: Arc<crate::sql::Analysis>,
    index: usize,
    protocol: &'static str,
    prepared: Option<Arc<str>>,
    decision: Arc<Decision>,
}

impl LineKey {
    fn is_for(
        &self,
        session: &Arc<SessionInfo>,
        s: &StatementRecord,
        decision: &Arc<Decision>,
    ) -> bool {
        Arc::ptr_eq(&self.analysis, &s.analysis)
            && Arc::ptr_eq(&self.decision, decision)
            && Arc::ptr_eq(&self.session, session)
            && self.index == s.index
            && self.protocol == s.protocol
            && self.prepared == s.prepared
    }
}

impl StatementLines {
    /// Appends the middle of the statement's line to `out`.
    fn push(
        &mut self,
        out: &mut Vec<u8>,
        session: &Arc<SessionInfo>,
        statement: &StatementRecord,
        decision: &Arc<Decision>,
    ) -> serde_json::Result<()> {
        if !self
            .made_for
            .as_ref()
            .is_some_and(|k| k.is_for(session, statement, decision))
        {
            self.made_for = None;
            self.before.clear();
            self.after.clear();
            event_and_session(&mut self.before, "statement", session);
            statement_facts(&mut self.before, statement.as_ref());
            statement_rest(&mut self.after, statement.prepared.as_deref(), decision)?;
            self.made_for = Some(LineKey {
                session: Arc::clone(session),
                analysis: Arc::clone(&statement.analysis),
                index: statement.index,
                protocol: statement.protocol,
                prepared: statement.prepared.clone(),
                decision: Arc::clone(decision),
            });
        }
        out.extend_from_slice(&self.before);
        push_bytes(out, statement.bytes);
        out.extend_from_slice(&self.after);
        Ok(())
    }
}

struct Writer {
    out: Box<dyn Write + Send>,
    /// When the output is a regular file.
    behind: Option<WriteBehind>,
}

impl Writer {
    fn new(out: impl Write + AsFd + Send + 'static) -> Self {
        Self {
            behind: WriteBehind::for_output(&out),
            out: Box::new(out),
        }
    }

    /// Writes a batch; on failure keeps it and retries until it goes
    /// through, with the sink marked unhealthy meanwhile.
    fn write(&mut self, batch: &[u8], healthy: &AtomicBool) {
        loop {
            let result = self.out.write_all(batch).and_then(|()| self.out.flush());
            match result {
                Ok(()) => {
                    if let Some(behind) = self.behind.as_mut() {
                        if !behind.written() {
                            self.behind = None;
                        }
                    }
                    if !healthy.swap(true, Ordering::Relaxed) {
                        tracing::warn!("audit sink writable again; statements are allowed again");
                    }
                    return;
                }
                Err(e) => {
                    if healthy.swap(false, Ordering::Relaxed) {
                        tracing::error!(error = %e, "audit write failed; denying statements until it recovers");
                    }
                    // A partial write_all may have put part of the batch out;
                    // with no way to know how much, the whole batch is
                    // retried, which can repeat a line but never loses one.
                    std::thread::sleep(RETRY_EVERY);
                }
            }
        }
    }
}

fn run_writer(mut w: Writer, inner: Arc<Inner>) {
    let mut batch: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        let flushes = {
            let mut p = inner.pending.lock().unwrap_or_else(|p| p.into_inner());
            if p.bytes.is_empty() && p.flushes.is_empty() {
                // Idle: sleep until a session wakes us (or a while passes).
                inner.writer_idle.store(true, Ordering::Release);
                let (guard, _) = inner
                    .wake
                    .wait_timeout(p, FLUSH_EVERY)
                    .unwrap_or_else(|e| e.into_inner());
                p = guard;
                inner.writer_idle.store(false, Ordering::Release);
            }
            // Swap buffers: the sessions get back an empty one with the
            // capacity of the last, so nothing is freed across threads.
            std::mem::swap(&mut p.bytes, &mut batch);
            std::mem::take(&mut p.flushes)
        };
        inner.room.notify_waiters();
        let had = !batch.is_empty();
        if had {
            w.write(&batch, &inner.healthy);
            batch.clear();
        }
        for f in flushes {
            let _ = f.send(());
        }
        if had {
            // Lets the next batch gather. A session held back by a full
            // buffer, or a flush, ends the wait early: the buffer is
            // checked under the lock the sessions fill it under, so a
            // wake-up cannot fall between the check and the wait.
            let p = inner.pending.lock().unwrap_or_else(|p| p.into_inner());
            if p.bytes.len() < inner.max_pending && p.flushes.is_empty() {
                drop(inner.wake.wait_timeout(p, BATCH_WINDOW));
            }
        }
        if Arc::strong_count(&inner) == 1 {
            // Every sink is gone: write what is left and stop.
            let mut p = inner.pending.lock().unwrap_or_else(|p| p.into_inner());
            p.stopped = true;
            let rest = std::mem::take(&mut p.bytes);
            drop(p);
            w.write(&rest, &inner.healthy);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{DecisionRecord, SessionInfo, StatementRecord, SCHEMA_VERSION};

    fn line(body: RecordBody) -> serde_json::Value {
        let r = Record::new(
            "session.end",
            Arc::new(SessionInfo::process("db:5432")),
            body,
        );
        let mut out = Vec::new();
        append(&mut out, 7, &mut Stamper::default(), &r);
        assert_eq!(out.last(), Some(&b'\n'));
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        // The hand-written timestamp agrees with the `time` crate's format.
        assert_eq!(v["ts"], super::super::record::rfc3339(r.ts.into()));
        v
    }

    /// The relay's path (`try_emit_statement`, reusing the session's last
    /// line where it can) and a whole `Record` give the same line but for
    /// its number and time.
    fn assert_relay_line_is_the_same(
        session: &Arc<SessionInfo>,
        statement: &StatementRecord,
        decision: &Arc<crate::policy::Decision>,
        outcome: &Outcome,
        lines: &mut StatementLines,
    ) {
        let body = RecordBody::Statement {
            statement: statement.clone(),
            decision: DecisionRecord(decision.as_ref().clone()),
            outcome: outcome.clone(),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let sink = AuditSink::open(&AuditTarget::File(path.clone()), 1 << 20).unwrap();
        assert!(sink
            .try_emit_statement(session, statement, decision, outcome, lines)
            .unwrap());
        let record = Record::new("statement", Arc::clone(session), body);
        assert!(sink.try_emit(&record).unwrap());
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(sink.flush())
            .unwrap();
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let [mut relayed, mut whole] = <[_; 2]>::try_from(lines).unwrap();
        assert_eq!((&relayed["seq"], &whole["seq"]), (&1.into(), &2.into()));
        for line in [&mut relayed, &mut whole] {
            let fields = line.as_object_mut().unwrap();
            fields.remove("seq");
            fields.remove("ts");
        }
        assert_eq!(relayed, whole);
    }

    #[test]
    fn statement_lines_match_the_generic_serialisation() {
        let analysis = Arc::new(crate::sql::analyze(
            "SELECT name, upper(email) FROM public.customers WHERE id = 42; SELECT 'a\"b'",
        ));
        let masked: std::collections::BTreeMap<String, u64> =
            [("public.customers.email".to_owned(), 3)].into();
        let outcomes = [
            Outcome {
                status: "ok",
                rows: Some(1),
                ..Outcome::default()
            },
            Outcome {
                status: "error",
                sqlstate: Some("22\"0\u{1}2".into()),
                rows: None,
                duration_us: 123_456,
                masked: Some(masked),
            },
        ];
        let decisions = [
            Arc::new(crate::policy::Decision::unparseable()),
            Arc::new(crate::policy::Decision::unknown_statement(
                "the statement \"ä\\\n\"",
            )),
        ];
        let session = Arc::new(SessionInfo::process("db:5432"));
        let mut lines = StatementLines::default();
        let cases = [(0, None), (1, Some(Arc::from("p\"1"))), (5, None)];
        for (index, prepared) in cases {
            for outcome in &outcomes {
                for decision in &decisions {
                    // Twice: the decision's serialisation and the line's
                    // middle are reused after the first.
                    for _ in 0..2 {
                        let statement = StatementRecord {
                            protocol: "simple",
                            analysis: Arc::clone(&analysis),
                            index,
                            bytes: 77,
                            prepared: prepared.clone(),
                        };
                        assert_relay_line_is_the_same(
                            &session, &statement, decision, outcome, &mut lines,
                        );
                        let body = RecordBody::Statement {
                            statement,
                            decision: DecisionRecord(decision.as_ref().clone()),
                            outcome: outcome.clone(),
                        };
                        let generic = serde_json::to_value(&body).unwrap();
                        let v = line(body);
                        for key in ["statement", "decision", "outcome"] {
                            assert_eq!(v[key], generic[key], "{key} of statement {index}");
                        }
                    }
                }
            }
        }
    }

    /// The relay reuses the middle of a session's last statement line; a
    /// line that differs from the last in any one part of that middle must
    /// still come out whole and right.
    #[test]
    fn reused_line_parts_follow_every_change() {
        let analysis = Arc::new(crate::sql::analyze("SELECT 1; SHOW search_path"));
        let same_text = Arc::new(crate::sql::analyze("SELECT 1; SHOW search_path"));
        let session = Arc::new(SessionInfo::process("db:5432"));
        let decision = Arc::new(crate::policy::Decision::unparseable());
        let base = StatementRecord {
            protocol: "simple",
            analysis: Arc::clone(&analysis),
            index: 0,
            bytes: 8,
            prepared: None,
        };
        let mut other_session = SessionInfo::process("db:5432");
        other_session.session = "another".into();
        let variants: Vec<(
            StatementRecord,
            Arc<SessionInfo>,
            Arc<crate::policy::Decision>,
        )> = vec![
            (base.clone(), Arc::new(other_session), Arc::clone(&decision)),
            (
                base.clone(),
                Arc::clone(&session),
                Arc::new(crate::policy::Decision::function_call()),
            ),
            (
                StatementRecord {
                    index: 1,
                    ..base.clone()
                },
                Arc::clone(&session),
                Arc::clone(&decision),
            ),
            (
                StatementRecord {
                    bytes: 9,
                    ..base.clone()
                },
                Arc::clone(&session),
                Arc::clone(&decision),
            ),
            (
                StatementRecord {
                    protocol: "extended",
                    ..base.clone()
                },
                Arc::clone(&session),
                Arc::clone(&decision),
            ),
            (
                StatementRecord {
                    prepared: Some(Arc::from("s1")),
                    ..base.clone()
                },
                Arc::clone(&session),
                Arc::clone(&decision),
            ),
            // Equal facts from another analysis: reused or not, the same line.
            (
                StatementRecord {
                    analysis: same_text,
                    ..base.clone()
                },
                Arc::clone(&session),
                Arc::clone(&decision),
            ),
        ];
        let outcome = Outcome {
            status: "ok",
            ..Outcome::default()
        };
        let mut lines = StatementLines::default();
        for (statement, session_now, decision_now) in &variants {
            for (s, who, d) in [
                (&base, &session, &decision),
                (statement, session_now, decision_now),
            ] {
                assert_relay_line_is_the_same(who, s, d, &outcome, &mut lines);
            }
        }
    }

    #[test]
    fn lines_open_with_the_schema_version() {
        assert_eq!(OPENING, format!("{{\"v\":{SCHEMA_VERSION},\"ts\":\""));
    }

    #[test]
    fn timestamps_reuse_the_second_only_within_it() {
        let mut stamper = Stamper::default();
        let t0 =
            time::OffsetDateTime::from_unix_timestamp_nanos(1_795_781_384_999_999_000).unwrap();
        for t in [
            t0,
            t0 + time::Duration::microseconds(1),
            t0 - time::Duration::seconds(86_400),
            t0,
            time::OffsetDateTime::UNIX_EPOCH + time::Duration::microseconds(7),
        ] {
            let mut out = Vec::new();
            stamper.push(&mut out, t.into());
            assert_eq!(
                String::from_utf8(out).unwrap(),
                super::super::record::rfc3339(t)
            );
        }
    }

    #[test]
    fn lines_are_one_object_with_fixed_session_and_event_fields() {
        let v = line(RecordBody::SessionEnd {
            statements: 3,
            duration_us: 10,
            reason: "client said \"bye\"\n".into(),
        });
        assert_eq!(v["v"], SCHEMA_VERSION);
        assert_eq!(v["seq"], 7);
        assert_eq!(v["event"], "session.end");
        assert_eq!(v["session"], "process");
        assert_eq!(v["target"]["addr"], "db:5432");
        assert_eq!(v["statements"], 3);
        assert_eq!(v["reason"], "client said \"bye\"\n");
        let empty = line(RecordBody::Empty {});
        assert_eq!(empty["event"], "session.end");
        assert!(empty.get("statements").is_none());
    }
}
