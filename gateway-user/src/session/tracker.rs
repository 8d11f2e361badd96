//! Which backend answer belongs to which frontend message.
//!
//! Every message that gets an answer is queued in the order it went
//! upstream; backend messages complete the head of the queue. This is what
//! ties outcomes to statements for the audit, tells which ErrorResponse to
//! replace with a denial, and mirrors the server's "discard until Sync"
//! after an error in the extended protocol.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use smallvec::SmallVec;

use crate::audit::{Outcome, StatementRecord};
use crate::mask::plan::RowSource;
use crate::policy::Decision;
use crate::wire::backend::{self, rows_in_tag};
use crate::wire::frontend::{ResultFormats, Target};
use crate::wire::rows::{self, Field};
use crate::wire::{Frame, FrameRef};

use super::names::Named;

/// A statement on its way through, kept until its outcome is known.
#[derive(Debug, Clone)]
pub struct PendingStatement {
    /// What its audit line says about it.
    pub statement: StatementRecord,
    pub decision: Arc<Decision>,
    pub started: Instant,
    /// What its rows are made of, for masking computed columns.
    pub rows: RowSource,
    /// For an Execute: the portal, its statement and the result formats
    /// its Bind asked for (none: all text; one: for every column).
    pub portal: Option<String>,
    pub formats: ResultFormats,
}

/// What a Describe asks about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Described {
    Statement(String),
    Portal(String),
}

impl Described {
    pub fn as_target(&self) -> Target<'_> {
        match self {
            Described::Statement(n) => Target::Statement(n),
            Described::Portal(n) => Target::Portal(n),
        }
    }
}

impl From<Target<'_>> for Described {
    fn from(t: Target<'_>) -> Self {
        match t {
            Target::Statement(n) => Described::Statement(n.to_owned()),
            Target::Portal(n) => Described::Portal(n.to_owned()),
        }
    }
}

/// What the head of the queue is, for the masking path.
pub enum Head<'a> {
    Statement(&'a PendingStatement),
    Describe,
    Other,
}

/// The statements of one message, in order. Nearly every message carries
/// exactly one, so one is kept inline: no allocation per statement.
pub type Statements = SmallVec<[PendingStatement; 1]>;

/// A statement whose outcome is known, ready for the audit.
#[derive(Debug)]
pub struct Completed {
    pub statement: PendingStatement,
    pub outcome: Outcome,
}

/// One message the backend will answer, as the relay hands it over.
#[derive(Debug)]
pub enum Expect {
    /// A simple Query: its statements complete one by one, ReadyForQuery ends it.
    Simple(Statements),
    /// Parse of the named statement.
    Parse(String),
    /// Bind of the named portal.
    Bind(String),
    /// `hidden`: sent by the gateway itself to learn a portal's row shape;
    /// its answer does not go to the client.
    Describe {
        target: Described,
        hidden: bool,
    },
    Close,
    Execute(PendingStatement),
    Sync,
    /// A denied message, replaced upstream by one that fails at once, so the
    /// server itself enters the error state PostgreSQL would. Its error is
    /// replaced by `error`. `extended` says whether the server will then
    /// discard until Sync (a Parse stand-in) or answer ReadyForQuery (a
    /// Query stand-in).
    Denied {
        statements: Statements,
        error: Frame,
        extended: bool,
    },
}

/// A message in the queue. Its statements are not in it but, in the same
/// order, in the tracker's statement queue: a queued message stays a few
/// words long, and neither queue allocates once it has grown.
#[derive(Debug)]
enum Queued {
    /// `left`: its statements not completed yet.
    Simple {
        left: usize,
    },
    Parse,
    Bind,
    Describe {
        target: Described,
        hidden: bool,
    },
    Close,
    Execute,
    Sync,
    Denied {
        left: usize,
        error: Frame,
        extended: bool,
    },
}

impl Queued {
    /// How many statements at the front of the statement queue are its own.
    fn statements(&self) -> usize {
        match self {
            Queued::Simple { left } | Queued::Denied { left, .. } => *left,
            Queued::Execute => 1,
            _ => 0,
        }
    }
}

/// What to do with one backend message.
#[derive(Debug)]
pub enum Verdict {
    Forward,
    Replace(Frame),
    Drop,
}

#[derive(Debug, Default)]
pub struct Tracker {
    queue: VecDeque<Queued>,
    /// The statements of the queued messages, front first.
    statements: VecDeque<PendingStatement>,
    /// After an extended-protocol error with no Sync queued yet: the server
    /// discards every message until the next Sync, and so must we.
    discarding: bool,
    /// Row shapes learnt from Describe, so that an Execute without its own
    /// Describe can still be masked.
    descriptions: Named<Arc<Vec<Field>>>,
    /// The row shape of the result being sent now.
    current: Option<std::sync::Arc<Vec<Field>>>,
    /// Whether row shapes are needed (the session masks something); when
    /// not, RowDescriptions are not decoded at all.
    pub masking: bool,
    /// The last RowDescription's bytes and what they decoded to.
    last_shape: Option<(Vec<u8>, Arc<Vec<Field>>)>,
    /// The last ReadyForQuery said a transaction block is open (or failed).
    in_transaction: bool,
}

/// Hands a statement to the audit with `status`; the outcome is returned
/// for the caller to add what else it knows.
fn complete<'d>(
    s: PendingStatement,
    status: &'static str,
    done: &'d mut Vec<Completed>,
) -> &'d mut Outcome {
    let outcome = Outcome {
        status,
        sqlstate: None,
        rows: None,
        duration_us: s.started.elapsed().as_micros() as u64,
        masked: None,
    };
    done.push(Completed {
        statement: s,
        outcome,
    });
    let last = done.len() - 1;
    &mut done[last].outcome
}

impl Tracker {
    /// Queues a message just before it goes upstream.
    pub fn push(&mut self, expect: Expect, done: &mut Vec<Completed>) {
        // A new Parse or Bind of a name replaces what was described under it.
        match &expect {
            Expect::Parse(name) => self.descriptions.remove(Target::Statement(name)),
            Expect::Bind(name) => self.descriptions.remove(Target::Portal(name)),
            _ => {}
        }
        if self.discarding {
            if matches!(expect, Expect::Sync) {
                self.discarding = false;
            } else {
                // The server discards it: its statements never run.
                let statements = match expect {
                    Expect::Simple(s) | Expect::Denied { statements: s, .. } => s,
                    Expect::Execute(s) => smallvec::smallvec![s],
                    _ => Statements::new(),
                };
                for s in statements {
                    complete(s, "skipped", done);
                }
                return;
            }
        }
        // Moved straight into the statement queue, not through a
        // `Statements` as the discard path above does: that detour cost an
        // Execute about 490 instructions (callgrind, prepared mode).
        let queued = match expect {
            Expect::Simple(s) => {
                let left = s.len();
                self.statements.extend(s);
                Queued::Simple { left }
            }
            Expect::Execute(s) => {
                self.statements.push_back(s);
                Queued::Execute
            }
            Expect::Denied {
                statements,
                error,
                extended,
            } => {
                let left = statements.len();
                self.statements.extend(statements);
                Queued::Denied {
                    left,
                    error,
                    extended,
                }
            }
            Expect::Parse(_) => Queued::Parse,
            Expect::Bind(_) => Queued::Bind,
            Expect::Describe { target, hidden } => Queued::Describe { target, hidden },
            Expect::Close => Queued::Close,
            Expect::Sync => Queued::Sync,
        };
        self.queue.push_back(queued);
    }

    /// Whether `on_backend` does anything with messages of this type (the
    /// relay passes the others, rows above all, without taking the lock).
    pub fn follows(tag: u8) -> bool {
        matches!(
            tag,
            backend::PARSE_COMPLETE
                | backend::BIND_COMPLETE
                | backend::CLOSE_COMPLETE
                | backend::ROW_DESCRIPTION
                | backend::NO_DATA
                | backend::COMMAND_COMPLETE
                | backend::EMPTY_QUERY_RESPONSE
                | backend::PORTAL_SUSPENDED
                | backend::ERROR_RESPONSE
                | backend::READY_FOR_QUERY
        )
    }

    /// Accounts for one backend message; `follows` lists the types it reads.
    pub fn on_backend(&mut self, frame: FrameRef<'_>, done: &mut Vec<Completed>) -> Verdict {
        match frame.tag() {
            backend::PARSE_COMPLETE => self.pop_if(|e| matches!(e, Queued::Parse)),
            backend::BIND_COMPLETE => self.pop_if(|e| matches!(e, Queued::Bind)),
            backend::CLOSE_COMPLETE => self.pop_if(|e| matches!(e, Queued::Close)),
            backend::ROW_DESCRIPTION | backend::NO_DATA => {
                let fields = (self.masking && frame.tag() == backend::ROW_DESCRIPTION)
                    .then(|| self.row_shape(frame.body()))
                    .flatten();
                if let Some(Queued::Describe { target, hidden }) = self.queue.front() {
                    let hidden = *hidden;
                    match fields {
                        Some(f) => {
                            self.descriptions.insert(target.as_target(), f);
                        }
                        None => self.descriptions.remove(target.as_target()),
                    }
                    self.queue.pop_front();
                    if hidden {
                        return Verdict::Drop;
                    }
                } else {
                    // A simple Query's or an Execute's own row shape.
                    self.current = fields;
                }
            }
            backend::COMMAND_COMPLETE
            | backend::EMPTY_QUERY_RESPONSE
            | backend::PORTAL_SUSPENDED => self.on_completion(frame, done),
            backend::ERROR_RESPONSE => return self.on_error(frame, done),
            backend::READY_FOR_QUERY => {
                self.in_transaction = frame.body().first().is_some_and(|s| *s != b'I');
                let ends = match self.queue.front() {
                    Some(Queued::Simple { .. } | Queued::Sync) => true,
                    Some(Queued::Denied { extended, .. }) => !extended,
                    _ => false,
                };
                if ends {
                    self.finish_front("unknown", done);
                }
            }
            _ => {}
        }
        Verdict::Forward
    }

    /// A RowDescription decoded, or the last one again when the server sent
    /// the same bytes (a driver describing each execution of one statement).
    fn row_shape(&mut self, body: &[u8]) -> Option<Arc<Vec<Field>>> {
        if let Some((bytes, fields)) = &self.last_shape {
            if bytes.as_slice() == body {
                return Some(Arc::clone(fields));
            }
        }
        let fields = Arc::new(rows::decode_row_description(body).ok()?);
        self.last_shape = Some((body.to_vec(), Arc::clone(&fields)));
        Some(fields)
    }

    /// Nothing is in flight and no transaction is open: the session can end
    /// without losing the client any work.
    pub fn at_rest(&self) -> bool {
        self.queue.is_empty() && !self.in_transaction
    }

    /// What the queue's head is.
    pub fn head(&self) -> Head<'_> {
        match self.queue.front() {
            Some(q @ (Queued::Simple { .. } | Queued::Execute)) if q.statements() > 0 => {
                self.statements.front().map_or(Head::Other, Head::Statement)
            }
            Some(Queued::Describe { .. }) => Head::Describe,
            _ => Head::Other,
        }
    }

    /// The row shape of the result the server is sending now: its own
    /// RowDescription, or for an Execute what Describe said of its portal
    /// or statement (with the formats its Bind asked for).
    pub fn current_fields(&self) -> Option<std::sync::Arc<Vec<Field>>> {
        if let Some(f) = &self.current {
            return Some(std::sync::Arc::clone(f));
        }
        let Head::Statement(s) = self.head() else {
            return None;
        };
        let portal = s.portal.as_ref()?;
        if let Some(f) = self.descriptions.get(Target::Portal(portal)) {
            return Some(std::sync::Arc::clone(f));
        }
        let name = s.statement.prepared.as_ref()?;
        let f = self.descriptions.get(Target::Statement(name))?;
        let mut fields: Vec<Field> = f.as_ref().clone();
        for (i, field) in fields.iter_mut().enumerate() {
            field.format = s.formats.of(i);
        }
        Some(std::sync::Arc::new(fields))
    }

    /// The result being sent ended (its completion, an error, a new query).
    pub fn end_result(&mut self) {
        self.current = None;
    }

    fn pop_if(&mut self, f: impl Fn(&Queued) -> bool) {
        if self.queue.front().is_some_and(f) {
            self.queue.pop_front();
        }
    }

    /// Completes the next statement of the head message.
    fn complete_next<'d>(
        &mut self,
        status: &'static str,
        done: &'d mut Vec<Completed>,
    ) -> Option<&'d mut Outcome> {
        let s = self.statements.pop_front()?;
        Some(complete(s, status, done))
    }

    fn on_completion(&mut self, frame: FrameRef<'_>, done: &mut Vec<Completed>) {
        let (status, rows) = match frame.tag() {
            backend::PORTAL_SUSPENDED => ("suspended", None),
            backend::EMPTY_QUERY_RESPONSE => ("ok", None),
            _ => (
                "ok",
                backend::decode_command_complete(frame.body())
                    .ok()
                    .and_then(rows_in_tag),
            ),
        };
        match self.queue.front_mut() {
            Some(Queued::Simple { left }) if *left > 0 => {
                *left -= 1;
            }
            Some(Queued::Execute) => {
                self.queue.pop_front();
            }
            _ => return,
        }
        if let Some(o) = self.complete_next(status, done) {
            o.rows = rows;
        }
    }

    fn on_error(&mut self, frame: FrameRef<'_>, done: &mut Vec<Completed>) -> Verdict {
        let sqlstate = backend::decode_error_fields(frame.tag(), frame.body())
            .ok()
            .map(|f| f.code);
        let Some(head) = self.queue.front_mut() else {
            return Verdict::Forward;
        };
        match head {
            Queued::Simple { left } => {
                // The failing statement ends the query; the rest never ran.
                let n = std::mem::take(left);
                if n > 0 {
                    if let Some(o) = self.complete_next("error", done) {
                        o.sqlstate = sqlstate;
                    }
                    for _ in 1..n {
                        self.complete_next("skipped", done);
                    }
                }
                Verdict::Forward
            }
            Queued::Sync => Verdict::Forward,
            Queued::Denied {
                left,
                error,
                extended,
            } => {
                let replacement = error.clone();
                let extended = *extended;
                for _ in 0..std::mem::take(left) {
                    if let Some(o) = self.complete_next("denied", done) {
                        o.sqlstate = Some(backend::INSUFFICIENT_PRIVILEGE.to_owned());
                    }
                }
                if extended {
                    self.queue.pop_front();
                    self.discard_until_sync(done);
                }
                Verdict::Replace(replacement)
            }
            _ => {
                if let Some(Queued::Execute) = self.queue.pop_front() {
                    if let Some(o) = self.complete_next("error", done) {
                        o.sqlstate = sqlstate;
                    }
                }
                self.discard_until_sync(done);
                Verdict::Forward
            }
        }
    }

    fn discard_until_sync(&mut self, done: &mut Vec<Completed>) {
        while let Some(front) = self.queue.front() {
            if matches!(front, Queued::Sync) {
                return;
            }
            self.finish_front("skipped", done);
        }
        self.discarding = true;
    }

    /// The connection ended: whatever is still pending has no known outcome.
    pub fn abandon(&mut self, done: &mut Vec<Completed>) {
        while !self.queue.is_empty() {
            self.finish_front("unknown", done);
        }
    }

    /// Takes the head message off the queue; its statements not yet
    /// completed get `status`.
    fn finish_front(&mut self, status: &'static str, done: &mut Vec<Completed>) {
        if let Some(head) = self.queue.pop_front() {
            for _ in 0..head.statements() {
                self.complete_next(status, done);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::encode_frame;

    /// A pending statement whose audited size says which it is.
    fn statement(bytes: usize) -> PendingStatement {
        PendingStatement {
            statement: StatementRecord {
                protocol: "extended",
                analysis: Arc::new(crate::sql::analyze("SELECT 1")),
                index: 0,
                bytes,
                prepared: None,
            },
            decision: Arc::new(Decision::unparseable()),
            started: Instant::now(),
            rows: RowSource::NoData,
            portal: None,
            formats: ResultFormats::default(),
        }
    }

    fn execute() -> Expect {
        Expect::Execute(statement(8))
    }

    /// A simple Query of statements numbered from `first`.
    fn simple(first: usize, n: usize) -> Expect {
        Expect::Simple((first..first + n).map(statement).collect())
    }

    fn complete() -> Frame {
        encode_frame(backend::COMMAND_COMPLETE, |b| {
            b.extend_from_slice(b"SELECT 1\0")
        })
    }

    fn error() -> Frame {
        backend::error_response("ERROR", "22012", "division by zero")
    }

    fn ready() -> Frame {
        encode_frame(backend::READY_FOR_QUERY, |b| b.extend_from_slice(b"I"))
    }

    /// Which statements were audited, in order, with what status.
    fn audited(done: &[Completed]) -> Vec<(usize, &'static str)> {
        done.iter()
            .map(|c| (c.statement.statement.bytes, c.outcome.status))
            .collect()
    }

    #[test]
    fn each_statement_of_a_query_gets_its_own_outcome_in_order() {
        let mut t = Tracker::default();
        let mut done = Vec::new();
        t.push(simple(1, 3), &mut done);
        t.push(simple(4, 1), &mut done);
        for f in [complete(), error(), ready(), complete(), ready()] {
            t.on_backend(f.as_ref(), &mut done);
        }
        assert_eq!(
            audited(&done),
            [(1, "ok"), (2, "error"), (3, "skipped"), (4, "ok")]
        );
        assert_eq!(done[1].outcome.sqlstate.as_deref(), Some("22012"));
        assert_eq!(done[0].outcome.rows, Some(1));
        assert!(t.at_rest());
        assert!(t.statements.is_empty());
    }

    #[test]
    fn after_an_extended_error_the_rest_until_sync_is_skipped() {
        let mut t = Tracker::default();
        let mut done = Vec::new();
        t.push(Expect::Bind(String::new()), &mut done);
        t.push(Expect::Execute(statement(1)), &mut done);
        t.push(Expect::Execute(statement(2)), &mut done);
        t.on_backend(
            encode_frame(backend::BIND_COMPLETE, |_| {}).as_ref(),
            &mut done,
        );
        t.on_backend(error().as_ref(), &mut done);
        // Sent after the error, before its Sync: the server discards it too.
        t.push(Expect::Execute(statement(3)), &mut done);
        t.push(Expect::Sync, &mut done);
        t.push(Expect::Execute(statement(4)), &mut done);
        t.push(Expect::Sync, &mut done);
        for f in [ready(), complete(), ready()] {
            t.on_backend(f.as_ref(), &mut done);
        }
        assert_eq!(
            audited(&done),
            [(1, "error"), (2, "skipped"), (3, "skipped"), (4, "ok")]
        );
        assert!(t.at_rest());
    }

    #[test]
    fn a_denied_query_audits_all_its_statements_as_denied() {
        let mut t = Tracker::default();
        let mut done = Vec::new();
        let denial = backend::error_response("ERROR", "42501", "denied by rule x");
        t.push(
            Expect::Denied {
                statements: (1..=2).map(statement).collect(),
                error: denial.clone(),
                extended: false,
            },
            &mut done,
        );
        let verdict = t.on_backend(error().as_ref(), &mut done);
        assert!(
            matches!(verdict, Verdict::Replace(f) if f.as_ref().body() == denial.as_ref().body())
        );
        t.on_backend(ready().as_ref(), &mut done);
        assert_eq!(audited(&done), [(1, "denied"), (2, "denied")]);
        assert!(t.at_rest());
    }

    #[test]
    fn a_lost_connection_leaves_what_was_in_flight_unknown() {
        let mut t = Tracker::default();
        let mut done = Vec::new();
        t.push(simple(1, 2), &mut done);
        t.push(Expect::Execute(statement(3)), &mut done);
        t.on_backend(complete().as_ref(), &mut done);
        t.abandon(&mut done);
        assert_eq!(audited(&done), [(1, "ok"), (2, "unknown"), (3, "unknown")]);
        assert!(t.statements.is_empty());
    }

    #[test]
    fn messages_it_does_not_follow_change_nothing() {
        let mut t = Tracker {
            masking: true,
            ..Tracker::default()
        };
        let mut done = Vec::new();
        t.push(execute(), &mut done);
        for tag in (0..=u8::MAX).filter(|t| !Tracker::follows(*t)) {
            let f = encode_frame(tag, |b| b.extend_from_slice(b"x\0"));
            assert!(matches!(
                t.on_backend(f.as_ref(), &mut done),
                Verdict::Forward
            ));
            assert_eq!((t.queue.len(), done.len()), (1, 0), "tag {tag}");
        }
        let complete = encode_frame(backend::COMMAND_COMPLETE, |b| {
            b.extend_from_slice(b"SELECT 1\0")
        });
        t.on_backend(complete.as_ref(), &mut done);
        assert_eq!((t.queue.len(), done.len()), (0, 1));
        assert_eq!(done[0].outcome.rows, Some(1));
    }
}
