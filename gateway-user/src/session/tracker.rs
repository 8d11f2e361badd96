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

use crate::audit::Outcome;
use crate::policy::Decision;
use crate::sql::Analysis;
use crate::wire::backend::{self, rows_in_tag};
use crate::wire::Frame;

/// A statement on its way through, kept until its outcome is known.
#[derive(Debug, Clone)]
pub struct PendingStatement {
    pub protocol: &'static str,
    pub analysis: Arc<Analysis>,
    /// Which statement of the analysis this is.
    pub index: usize,
    /// Bytes of the client's text (the whole query string).
    pub bytes: usize,
    pub prepared: Option<String>,
    pub decision: Decision,
    pub started: Instant,
}

/// A statement whose outcome is known, ready for the audit.
#[derive(Debug)]
pub struct Completed {
    pub statement: PendingStatement,
    pub outcome: Outcome,
}

/// One message the backend will answer.
#[derive(Debug)]
pub enum Expect {
    /// A simple Query: its statements complete one by one, ReadyForQuery ends it.
    Simple(VecDeque<PendingStatement>),
    Parse,
    Bind,
    Describe,
    Close,
    Execute(PendingStatement),
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
}

#[derive(Debug, Default)]
pub struct Tracker {
    queue: VecDeque<Expect>,
    /// After an extended-protocol error with no Sync queued yet: the server
    /// discards every message until the next Sync, and so must we.
    discarding: bool,
}

fn outcome(status: &'static str, started: Instant) -> Outcome {
    Outcome {
        status,
        sqlstate: None,
        rows: None,
        duration_us: started.elapsed().as_micros() as u64,
    }
}

impl Tracker {
    /// Queues a message just before it goes upstream.
    pub fn push(&mut self, expect: Expect, done: &mut Vec<Completed>) {
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

    /// Accounts for one backend message.
    pub fn on_backend(&mut self, frame: &Frame, done: &mut Vec<Completed>) -> Verdict {
        match frame.tag() {
            backend::PARSE_COMPLETE => self.pop_if(|e| matches!(e, Expect::Parse)),
            backend::BIND_COMPLETE => self.pop_if(|e| matches!(e, Expect::Bind)),
            backend::CLOSE_COMPLETE => self.pop_if(|e| matches!(e, Expect::Close)),
            backend::ROW_DESCRIPTION | backend::NO_DATA => {
                self.pop_if(|e| matches!(e, Expect::Describe))
            }
            backend::COMMAND_COMPLETE
            | backend::EMPTY_QUERY_RESPONSE
            | backend::PORTAL_SUSPENDED => self.on_completion(frame, done),
            backend::ERROR_RESPONSE => return self.on_error(frame, done),
            backend::READY_FOR_QUERY => {
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

    fn pop_if(&mut self, f: impl Fn(&Expect) -> bool) {
        if self.queue.front().is_some_and(f) {
            self.queue.pop_front();
        }
    }

    fn on_completion(&mut self, frame: &Frame, done: &mut Vec<Completed>) {
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
                        statement: s,
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

    fn on_error(&mut self, frame: &Frame, done: &mut Vec<Completed>) -> Verdict {
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
                        statement: s,
                        outcome: o,
                    });
                }
                for s in statements.drain(..) {
                    let o = outcome("skipped", s.started);
                    done.push(Completed {
                        statement: s,
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
                        statement: s,
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
        Expect::Execute(s) => vec![s],
        Expect::Denied { statements, .. } => statements,
        _ => Vec::new(),
    };
    for s in statements {
        let o = outcome(status, s.started);
        done.push(Completed {
            statement: s,
            outcome: o,
        });
    }
}
