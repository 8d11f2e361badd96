//! Masking: protected values never reach the agent.
//!
//! A policy names protected columns and value detectors (see
//! `policy::masking`). For each result the gateway resolves every column's
//! provenance (`plan`: server-reported table and attribute through the
//! catalog cache, or the statement's lineage for computed columns) and
//! rewrites rows, COPY data and error fields in flight (`rewrite`). A result
//! with nothing to mask and nothing to detect passes without being decoded.

pub mod catalog;
pub mod detect;
pub mod function;
pub mod plan;
pub mod rewrite;

pub use detect::Detector;
pub use function::MaskFn;
