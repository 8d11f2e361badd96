//! agentgate: a PostgreSQL gateway for autonomous agents.
//!
//! The rooms follow `DESIGN.md`: `wire` frames and codecs, `session` the
//! per-client state machine, `sql` statement analysis, `policy` decisions,
//! `audit` the record stream, `config` the settings of `agentgate run`.

pub mod audit;
pub mod config;
pub mod gateway;
pub mod intercept;
pub mod mask;
pub mod policy;
pub mod session;
pub mod sql;
pub mod wire;
