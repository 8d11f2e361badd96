//! `#[repr(C)]` types shared by the eBPF probes and the user-space gateway.
//!
//! The probes are built for `bpfel-unknown-none` without `std`, so this crate
//! stays `no_std` and dependency-free.
#![no_std]

/// The port PostgreSQL clients connect to when nobody told them otherwise.
pub const POSTGRES_PORT: u16 = 5432;

/// The gateway's default listener port: connections redirected by the probes
/// land here.
pub const GATEWAY_PORT: u16 = 15432;
