//! Interception by eBPF: load, attach, pin and detach the probes; the
//! original destination and the kernel's identity of each caller.

pub mod cgroup;
pub mod fast_path;
pub mod probes;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;

use serde::Serialize;

pub use probes::{
    attach, detach, detach_all, status, AttachOptions, Attached, InterceptError, PeerTable,
    SidecarProbes,
};

/// Where the compiled probes are: the given path, $AGENTGATE_PROBES, or
/// `agentgate-probes` next to this binary.
pub fn probe_object(given: Option<&std::path::Path>) -> std::path::PathBuf {
    if let Some(p) = given {
        return p.to_owned();
    }
    if let Some(p) = std::env::var_os("AGENTGATE_PROBES") {
        return p.into();
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("agentgate-probes")))
        .unwrap_or_else(|| "agentgate-probes".into())
}

/// What the kernel says about the process behind a connection.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KernelIdentity {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
}

impl KernelIdentity {
    pub fn from_record(r: &gateway_common::ConnRecord, cgroup: Option<String>) -> Self {
        let end = r.comm.iter().position(|b| *b == 0).unwrap_or(r.comm.len());
        Self {
            pid: r.pid,
            uid: r.uid,
            gid: r.gid,
            comm: String::from_utf8_lossy(&r.comm[..end]).into_owned(),
            cgroup_id: r.cgroup_id,
            cgroup,
        }
    }
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` on an accepted socket: the same
/// call a proxy behind iptables REDIRECT makes, answered by our probe.
pub fn original_destination(sock: &impl AsFd) -> Option<SocketAddr> {
    let sin = nix::sys::socket::getsockopt(sock, nix::sys::socket::sockopt::OriginalDst).ok()?;
    let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
    Some(SocketAddr::V4(SocketAddrV4::new(
        ip,
        u16::from_be(sin.sin_port),
    )))
}

/// What the sidecar knows from the kernel about one accepted connection.
#[derive(Debug, Clone, Default)]
pub struct ConnectionFacts {
    pub original_dst: Option<SocketAddr>,
    pub identity: Option<KernelIdentity>,
}

impl Interception {
    fn cgroup_path(&self, id: u64) -> Option<String> {
        let mut paths = self.paths.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hit) = paths.get(&id) {
            return hit.clone();
        }
        let found = cgroup::path_of_id(&self.cgroup_root, id).map(|p| {
            let rel = p.strip_prefix(&self.cgroup_root).unwrap_or(&p);
            format!("/{}", rel.display())
        });
        // Bounded: a pod has few cgroups; a churn of them only costs walks.
        // A miss is not remembered: the cgroup may be found on a later try.
        if found.is_some() {
            if paths.len() >= 1024 {
                paths.clear();
            }
            paths.insert(id, found.clone());
        }
        found
    }
}

/// Intercept mode, as the sessions see it.
pub struct Interception {
    peers: PeerTable,
    cgroup_root: std::path::PathBuf,
    /// cgroup id -> path below the mount: a walk of the hierarchy is paid
    /// once per cgroup, not once per connection.
    paths: std::sync::Mutex<std::collections::HashMap<u64, Option<String>>>,
    /// Keeps the sidecar's own probes attached while it runs.
    _probes: SidecarProbes,
}

impl Interception {
    /// `fast_path`: try the socket-level fast path (it stays off, with a
    /// warning, where this kernel does not allow it).
    pub fn new(
        cgroup: &std::path::Path,
        object: &std::path::Path,
        fast_path: bool,
    ) -> Result<Self, InterceptError> {
        let probes = SidecarProbes::start(cgroup, object, fast_path)?;
        Ok(Self {
            peers: PeerTable::open(cgroup)?,
            cgroup_root: cgroup::cgroup2_mount()?,
            paths: Default::default(),
            _probes: probes,
        })
    }

    /// The original destination (by getsockopt, as behind iptables) and
    /// the caller's identity (from the probes' record of the connection).
    pub fn facts(&self, sock: &impl AsFd, peer: SocketAddr) -> ConnectionFacts {
        let record = self.peers.lookup(peer);
        let original_dst = original_destination(sock).or_else(|| {
            record.map(|r| {
                SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(r.orig_ip4.to_ne_bytes()),
                    r.orig_port,
                ))
            })
        });
        let identity =
            record.map(|r| KernelIdentity::from_record(&r, self.cgroup_path(r.cgroup_id)));
        ConnectionFacts {
            original_dst,
            identity,
        }
    }
}
