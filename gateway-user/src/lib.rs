//! agentgate: a PostgreSQL gateway for autonomous agents.
//!
//! The rooms follow `DESIGN.md`: `wire` frames and codecs, `session` the
//! per-client state machine, `sql` statement analysis, `policy` decisions,
//! `audit` the record stream, `config` the settings of `agentgate run`,
//! `sched` the CPU scheduling policy of its threads.

pub mod audit;
pub mod config;
pub mod gateway;
pub mod intercept;
pub mod mask;
pub mod policy;
pub mod sched;
pub mod session;
pub mod sql;
pub mod wire;
