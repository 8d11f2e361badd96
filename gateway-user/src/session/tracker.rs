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
    pub decision: Decision,
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

/// A statement whose outcome is known, ready for the audit.
#[derive(Debug)]
pub struct Completed {
    /// Boxed: it moves from queue to audit, and a box moves in one word.
    pub statement: Box<PendingStatement>,
    pub outcome: Outcome,
}

/// One message the backend will answer.
#[derive(Debug)]
pub enum Expect {
    /// A simple Query: its statements complete one by one, ReadyForQuery ends it.
    Simple(VecDeque<PendingStatement>),
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
    Execute(Box<PendingStatement>),
    Sync,
    /// A denied message, replaced upstream by one that fails at once, so the
    /// server itself enters the error state PostgreSQL would. Its error is
    /// replaced by `error`. `extended` says whether the server will then
    /// discard until Sync (a Parse stand-in) or answer ReadyForQuery (a
    /// Query stand-in).
    Denied {
        statements: Vec<PendingStatement>,
        error: Frame,
        extended: bool,
    },
}

impl Expect {
    fn is_sync(&self) -> bool {
        matches!(self, Expect::Sync)
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
    queue: VecDeque<Expect>,
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

fn outcome(status: &'static str, started: Instant) -> Outcome {
    Outcome {
        status,
        sqlstate: None,
        rows: None,
        duration_us: started.elapsed().as_micros() as u64,
        masked: None,
    }
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
            if expect.is_sync() {
                self.discarding = false;
            } else {
                skip(expect, done);
                return;
            }
        }
        self.queue.push_back(expect);
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
            backend::PARSE_COMPLETE => self.pop_if(|e| matches!(e, Expect::Parse(_))),
            backend::BIND_COMPLETE => self.pop_if(|e| matches!(e, Expect::Bind(_))),
            backend::CLOSE_COMPLETE => self.pop_if(|e| matches!(e, Expect::Close)),
            backend::ROW_DESCRIPTION | backend::NO_DATA => {
                let fields = (self.masking && frame.tag() == backend::ROW_DESCRIPTION)
                    .then(|| self.row_shape(frame.body()))
                    .flatten();
                if let Some(Expect::Describe { target, hidden }) = self.queue.front() {
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
                if let Some(head) = self.queue.front() {
                    let ends = match head {
                        Expect::Simple(_) | Expect::Sync => true,
                        Expect::Denied { extended, .. } => !extended,
                        _ => false,
                    };
                    if ends {
                        if let Some(head) = self.queue.pop_front() {
                            finish(head, "unknown", done);
                        }
                    }
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
            Some(Expect::Simple(s)) => s.front().map_or(Head::Other, Head::Statement),
            Some(Expect::Execute(s)) => Head::Statement(s),
            Some(Expect::Describe { .. }) => Head::Describe,
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

    fn pop_if(&mut self, f: impl Fn(&Expect) -> bool) {
        if self.queue.front().is_some_and(f) {
            self.queue.pop_front();
        }
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
            Some(Expect::Simple(statements)) => {
                if let Some(s) = statements.pop_front() {
                    let mut o = outcome(status, s.started);
                    o.rows = rows;
                    done.push(Completed {
                        statement: s.into(),
                        outcome: o,
                    });
                }
            }
            Some(Expect::Execute(_)) => {
                if let Some(Expect::Execute(s)) = self.queue.pop_front() {
                    let mut o = outcome(status, s.started);
                    o.rows = rows;
                    done.push(Completed {
                        statement: s,
                        outcome: o,
                    });
                }
            }
            _ => {}
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
            Expect::Simple(statements) => {
                // The failing statement ends the query; the rest never ran.
                if let Some(s) = statements.pop_front() {
                    let mut o = outcome("error", s.started);
                    o.sqlstate = sqlstate;
                    done.push(Completed {
                        statement: s.into(),
                        outcome: o,
                    });
                }
                for s in statements.drain(..) {
                    let o = outcome("skipped", s.started);
                    done.push(Completed {
                        statement: s.into(),
                        outcome: o,
                    });
                }
                Verdict::Forward
            }
            Expect::Sync => Verdict::Forward,
            Expect::Denied {
                statements,
                error,
                extended,
            } => {
                let replacement = error.clone();
                for s in statements.drain(..) {
                    let mut o = outcome("denied", s.started);
                    o.sqlstate = Some(backend::INSUFFICIENT_PRIVILEGE.to_owned());
                    done.push(Completed {
                        statement: s.into(),
                        outcome: o,
                    });
                }
                if *extended {
                    self.queue.pop_front();
                    self.discard_until_sync(done);
                }
                Verdict::Replace(replacement)
            }
            _ => {
                if let Some(Expect::Execute(s)) = self.queue.pop_front() {
                    let mut o = outcome("error", s.started);
                    o.sqlstate = sqlstate;
                    done.push(Completed {
                        statement: s,
                        outcome: o,
                    });
                }
                self.discard_until_sync(done);
                Verdict::Forward
            }
        }
    }

    fn discard_until_sync(&mut self, done: &mut Vec<Completed>) {
        while let Some(front) = self.queue.front() {
            if front.is_sync() {
                return;
            }
            if let Some(e) = self.queue.pop_front() {
                skip(e, done);
            }
        }
        self.discarding = true;
    }

    /// The connection ended: whatever is still pending has no known outcome.
    pub fn abandon(&mut self, done: &mut Vec<Completed>) {
        for e in self.queue.drain(..) {
            finish(e, "unknown", done);
        }
    }
}

/// Completes the statements of a message the server discarded.
fn skip(e: Expect, done: &mut Vec<Completed>) {
    finish(e, "skipped", done);
}

fn finish(e: Expect, status: &'static str, done: &mut Vec<Completed>) {
    let statements: Vec<PendingStatement> = match e {
        Expect::Simple(s) => s.into(),
        Expect::Execute(s) => vec![*s],
        Expect::Denied { statements, .. } => statements,
        _ => Vec::new(),
    };
    for s in statements {
        let o = outcome(status, s.started);
        done.push(Completed {
            statement: s.into(),
            outcome: o,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::encode_frame;

    fn execute() -> Expect {
        Expect::Execute(Box::new(PendingStatement {
            statement: StatementRecord {
                protocol: "extended",
                analysis: Arc::new(crate::sql::analyze("SELECT 1")),
                index: 0,
                bytes: 8,
                prepared: None,
            },
            decision: Decision::unparseable(),
            started: Instant::now(),
            rows: RowSource::NoData,
            portal: None,
            formats: ResultFormats::default(),
        }))
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
