//! The audit trail: one JSON object per line, in order, gap-free.
//!
//! Sessions number (`seq`) and serialise their records into one bounded
//! buffer; one writer thread writes it out and flushes whenever it runs dry
//! and at least every 100 ms. A full buffer makes sessions wait rather than
//! drop a record. A failed write marks the sink unhealthy, which makes sessions
//! deny new statements until a retry succeeds; the unwritten bytes are kept
//! and retried, so nothing is lost.

mod record;
mod write_behind;
mod writer;

pub use record::{
    now_rfc3339, Actor, DecisionRecord, Outcome, PolicyReloadRecord, Record, RecordBody,
    SessionInfo, Source, StatementRecord, StatementRef, Target,
};
pub use writer::{AuditError, AuditSink, AuditTarget, StatementLines};

/// Version of the record schema (`docs/audit-schema.md`).
pub const SCHEMA_VERSION: u32 = 1;
