//! The audit trail: one JSON object per line, in order, gap-free.
//!
//! Records go through a bounded queue to one writer thread, which numbers
//! them (`seq`), writes them and flushes whenever the queue runs dry and at
//! least every 100 ms. A full queue makes sessions wait rather than drop a
//! record. A failed write marks the sink unhealthy, which makes sessions
//! deny new statements until a retry succeeds; the unwritten bytes are kept
//! and retried, so nothing is lost.

mod record;
mod writer;

pub use record::{
    now_rfc3339, Actor, DecisionRecord, Outcome, PolicyReloadRecord, Record, RecordBody,
    SessionInfo, Source, StatementRecord, Target,
};
pub use writer::{AuditError, AuditSink, AuditTarget};

/// Version of the record schema (`docs/audit-schema.md`).
pub const SCHEMA_VERSION: u32 = 1;
