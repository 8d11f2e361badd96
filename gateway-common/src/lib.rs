//! `#[repr(C)]` types shared by the eBPF probes and the user-space gateway.
//!
//! The probes are built for `bpfel-unknown-none` without `std`, so this crate
//! stays `no_std`; the `user` feature adds what user space needs (aya's
//! `Pod`) and is never enabled for the probes.
#![no_std]

/// The port PostgreSQL clients connect to when nobody told them otherwise.
pub const POSTGRES_PORT: u16 = 5432;

/// The gateway's default listener port: connections redirected by the probes
/// land here.
pub const GATEWAY_PORT: u16 = 15432;

/// How many destination ports the probes can capture.
pub const MAX_CAPTURE_PORTS: usize = 8;

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)`, as iptables REDIRECT answers it.
pub const SOL_IP: i32 = 0;
pub const SO_ORIGINAL_DST: i32 = 80;
/// `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)`.
pub const SOL_IPV6: i32 = 41;
pub const IP6T_SO_ORIGINAL_DST: i32 = 80;

/// Settings the loader writes into the probes' config map (index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeConfig {
    /// The sidecar's uid and gid: its own connections are never redirected
    /// and only it may bind the listener port.
    pub sidecar_uid: u32,
    pub sidecar_gid: u32,
    /// A cgroup id whose processes are also exempt (0: none).
    pub sidecar_cgroup: u64,
    /// Where redirected connections go: IPv4 in network byte order, port in
    /// host byte order.
    pub redirect_ip4: u32,
    pub redirect_port: u16,
    /// Number of valid entries in `ports`.
    pub nports: u16,
    /// Captured destination ports, host byte order.
    pub ports: [u16; MAX_CAPTURE_PORTS],
}

/// What the probes know about one intercepted connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnRecord {
    /// The destination the client asked for: IPv4 in network byte order
    /// (IPv4-mapped IPv6 destinations are stored as IPv4), port in host
    /// byte order.
    pub orig_ip4: u32,
    pub orig_port: u16,
    /// 4 for AF_INET sockets, 6 for AF_INET6 sockets (v4-mapped).
    pub family: u16,
    /// Process (thread group) id and thread id of the caller.
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub comm: [u8; 16],
}

/// The client end of a redirected connection, as the sidecar sees its peer:
/// IPv4 in network byte order, port in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub ip4: u32,
    pub port: u32,
}

/// One end of a connection in the sockmap, as that socket sees it: the
/// network namespace (two pods can share a 4-tuple), addresses as IPv4 in
/// network byte order (v4-mapped ones too), ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub netns: u64,
    pub local_ip4: u32,
    pub remote_ip4: u32,
    pub local_port: u32,
    pub remote_port: u32,
}

impl SockKey {
    /// The key of the socket at the other end of the same connection.
    pub const fn peer(&self) -> Self {
        Self {
            netns: self.netns,
            local_ip4: self.remote_ip4,
            remote_ip4: self.local_ip4,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// What the running sidecar tells the socket-level fast path (index 0 of
/// the ACCEL map). All zero: the fast path is off.
///
/// The fast path hands a write on one end of an agent's connection straight
/// to the other end's receive queue. The kernel does not bound that queue
/// by the receiver's buffer, so the probe reads how much of it is unread
/// (`struct sk_psock`'s `msg_tot_len`, found through `struct sock`'s
/// `sk_user_data`) at offsets the sidecar takes from the kernel's BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccelConfig {
    /// Byte offset of `sk_user_data` in `struct sock`.
    pub sk_user_data: u32,
    /// Byte offset of `msg_tot_len` in `struct sk_psock`.
    pub psock_msg_tot_len: u32,
    /// Unread bytes a receiver may have queued before its connection goes
    /// back to TCP for good.
    pub unread_limit: u32,
    pub _pad: u32,
}

/// Indices of the per-CPU counters.
pub mod counter {
    pub const REDIRECTED: u32 = 0;
    pub const SKIPPED: u32 = 1;
    pub const LOOKUP_HIT: u32 = 2;
    pub const LOOKUP_MISS: u32 = 3;
    pub const BIND_DENIED: u32 = 4;
    pub const IPV6_REFUSED: u32 = 5;
    /// Sockets put into the sockmap (two per accelerated connection).
    pub const ACCELERATED: u32 = 6;
    /// Directions of a connection sent back to TCP for good (the receiver
    /// fell behind, or its end was not in the sockmap when written to).
    pub const ACCEL_TO_TCP: u32 = 7;
    pub const COUNT: u32 = 8;
    pub const NAMES: [&str; COUNT as usize] = [
        "redirected",
        "skipped",
        "lookup_hit",
        "lookup_miss",
        "bind_denied",
        "ipv6_refused",
        "accelerated",
        "accel_to_tcp",
    ];
}

/// Names of the programs and maps, shared by the probes and the loader.
pub mod names {
    pub const CONNECT4: &str = "connect4";
    pub const CONNECT6: &str = "connect6";
    pub const SOCKOPS: &str = "rekey";
    /// `rekey` that also puts intercepted connections into the sockmap.
    pub const SOCKOPS_ACCEL: &str = "rekey_accel";
    pub const SK_MSG: &str = "accel_msg";
    pub const GETSOCKOPT: &str = "getsockopt";
    pub const BIND4: &str = "bind4";
    pub const BIND6: &str = "bind6";
    pub const MAP_CONFIG: &str = "CONFIG";
    pub const MAP_BY_COOKIE: &str = "BY_COOKIE";
    pub const MAP_BY_PEER: &str = "BY_PEER";
    pub const MAP_COUNTERS: &str = "COUNTERS";
    pub const MAP_ACCEL: &str = "ACCEL";
    pub const MAP_SOCKETS: &str = "SOCKETS";
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain #[repr(C)] structs of integers, valid for any bit pattern.
    unsafe impl aya::Pod for super::ProbeConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PeerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AccelConfig {}
}
