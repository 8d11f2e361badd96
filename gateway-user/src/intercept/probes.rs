//! Loading, attaching, pinning and detaching the probes.
//!
//! Links and maps are pinned under /sys/fs/bpf/agentgate/<scope>/ so the
//! interception outlives the loader and a sidecar restart: while the sidecar
//! is down, redirected connections are refused (nothing listens), never sent
//! direct.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, SockHash};
use aya::programs::{
    links::{FdLink, PinnedLink},
    CgroupAttachMode, CgroupSockAddr, CgroupSockopt, SkMsg, SockOps,
};
use aya::{Ebpf, EbpfLoader};
use gateway_common::{
    counter, names, AccelConfig, ConnRecord, PeerKey, ProbeConfig, SockKey, MAX_CAPTURE_PORTS,
};

use super::cgroup::{self, CgroupError};

pub const BPFFS: &str = "/sys/fs/bpf";
pub const PIN_ROOT: &str = "/sys/fs/bpf/agentgate";

/// Programs whose links are pinned: they redirect and guard whether or not
/// the sidecar runs (while it is down, redirected connects are refused).
const PINNED_PROGRAMS: [&str; 4] = [names::CONNECT4, names::CONNECT6, names::BIND4, names::BIND6];
/// Programs the running sidecar attaches and holds: they serve only it
/// (re-keying records and answering its getsockopt). aya 0.14 cannot pin
/// these link types.
const SIDECAR_PROGRAMS: [&str; 2] = [names::SOCKOPS, names::GETSOCKOPT];
const MAPS: [&str; 4] = [
    names::MAP_CONFIG,
    names::MAP_BY_COOKIE,
    names::MAP_BY_PEER,
    names::MAP_COUNTERS,
];

#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(
        "eBPF needs root or CAP_BPF + CAP_NET_ADMIN + CAP_SYS_ADMIN; this process has uid {0}"
    )]
    NotPrivileged(u32),
    #[error("probe object {path} not found: build it with `cargo xtask build-ebpf`, or give --probes PATH")]
    NoObject { path: PathBuf },
    #[error("cannot mount the BPF filesystem at {BPFFS}: {0}")]
    Bpffs(String),
    #[error("{what}: {message}")]
    Ebpf { what: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("at most {MAX_CAPTURE_PORTS} capture ports")]
    TooManyPorts,
}

fn ebpf_err(what: impl Into<String>) -> impl FnOnce(&dyn std::fmt::Display) -> InterceptError {
    let what = what.into();
    move |e| InterceptError::Ebpf {
        what,
        message: e.to_string(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> InterceptError + '_ {
    move |source| InterceptError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What to attach, and for whom.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    pub cgroup: PathBuf,
    pub object: PathBuf,
    pub sidecar_uid: u32,
    pub sidecar_gid: u32,
    pub sidecar_cgroup: u64,
    pub redirect: (Ipv4Addr, u16),
    pub ports: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attached {
    New(PathBuf),
    /// Already attached (the pins exist); the config was refreshed.
    Existing(PathBuf),
}

/// The pin directory of a cgroup.
pub fn pin_dir(cgroup: &Path) -> Result<PathBuf, InterceptError> {
    let mount = cgroup::cgroup2_mount()?;
    Ok(Path::new(PIN_ROOT).join(cgroup::scope_name(&mount, cgroup)))
}

fn ensure_bpffs() -> Result<(), InterceptError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err(Path::new("/proc/self/mountinfo")))?;
    if cgroup::mounts_of_type(&info, "bpf")
        .iter()
        .any(|m| m == Path::new(BPFFS))
    {
        return Ok(());
    }
    std::fs::create_dir_all(BPFFS).map_err(io_err(Path::new(BPFFS)))?;
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| InterceptError::Bpffs(e.to_string()))
}

fn check_privileges() -> Result<(), InterceptError> {
    let uid = nix::unistd::geteuid().as_raw();
    if uid != 0 {
        // Capabilities may still allow it; the kernel has the last word, but
        // a clear message first is kinder than EPERM from bpf().
        let caps = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let eff = caps
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0);
        const CAP_SYS_ADMIN: u64 = 1 << 21;
        const CAP_BPF: u64 = 1 << 39;
        if eff & (CAP_SYS_ADMIN | CAP_BPF) == 0 {
            return Err(InterceptError::NotPrivileged(uid));
        }
    }
    Ok(())
}

fn probe_config(o: &AttachOptions) -> Result<ProbeConfig, InterceptError> {
    if o.ports.len() > MAX_CAPTURE_PORTS {
        return Err(InterceptError::TooManyPorts);
    }
    let mut ports = [0u16; MAX_CAPTURE_PORTS];
    ports[..o.ports.len()].copy_from_slice(&o.ports);
    Ok(ProbeConfig {
        sidecar_uid: o.sidecar_uid,
        sidecar_gid: o.sidecar_gid,
        sidecar_cgroup: o.sidecar_cgroup,
        redirect_ip4: u32::from_ne_bytes(o.redirect.0.octets()),
        redirect_port: o.redirect.1,
        nports: o.ports.len() as u16,
        ports,
    })
}

fn write_config(map: &mut Map, cfg: ProbeConfig) -> Result<(), InterceptError> {
    let mut arr: Array<&mut MapData, ProbeConfig> =
        Array::try_from(map).map_err(|e| ebpf_err("config map")(&e))?;
    arr.set(0, cfg, 0)
        .map_err(|e| ebpf_err("writing the config map")(&e))
}

fn pinned_map(dir: &Path, name: &str) -> Result<MapData, InterceptError> {
    MapData::from_pin(dir.join(name))
        .map_err(|e| ebpf_err(format!("opening pinned map {name}"))(&e))
}

/// Attaches the probes to a cgroup, or refreshes the config if they are
/// attached already.
pub fn attach(o: &AttachOptions) -> Result<Attached, InterceptError> {
    check_privileges()?;
    ensure_bpffs()?;
    let dir = pin_dir(&o.cgroup)?;
    let cfg = probe_config(o)?;
    if PINNED_PROGRAMS
        .iter()
        .all(|p| dir.join(format!("link_{p}")).exists())
    {
        write_config(&mut Map::Array(pinned_map(&dir, names::MAP_CONFIG)?), cfg)?;
        return Ok(Attached::Existing(dir));
    }
    if !o.object.exists() {
        return Err(InterceptError::NoObject {
            path: o.object.clone(),
        });
    }
    // A half-made attachment (a crash mid-way) is cleared first.
    detach_dir(&dir)?;
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let mut bpf = load_with_pinned_maps(&o.object, &dir)?;
    // The programs refer to the maps by fd: borrow, never take, them.
    let config_map = bpf
        .map_mut(names::MAP_CONFIG)
        .ok_or_else(|| ebpf_err("probes")(&"no CONFIG map"))?;
    write_config(config_map, cfg)?;
    let cgroup_file = std::fs::File::open(&o.cgroup).map_err(io_err(&o.cgroup))?;
    for name in PINNED_PROGRAMS {
        let link = attach_program(&mut bpf, name, cgroup_file.as_fd())?;
        let Some(link) = link else { continue };
        link.pin(dir.join(format!("link_{name}")))
            .map_err(|e| ebpf_err(format!("pinning the {name} link"))(&e))?;
    }
    Ok(Attached::New(dir))
}

/// Loads the object with every map at its pin (created and pinned if new).
fn load_with_pinned_maps(object: &Path, dir: &Path) -> Result<Ebpf, InterceptError> {
    let paths: Vec<(&str, PathBuf)> = MAPS.iter().map(|m| (*m, dir.join(m))).collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    loader
        .load_file(object)
        .map_err(|e| ebpf_err("loading the probes")(&e))
}

/// Attaches one program; returns its link when the link can be pinned.
fn attach_program(
    bpf: &mut Ebpf,
    name: &str,
    cgroup: std::os::fd::BorrowedFd<'_>,
) -> Result<Option<FdLink>, InterceptError> {
    let what = |s: &str| format!("{s} program {name}");
    let prog = bpf
        .program_mut(name)
        .ok_or_else(|| ebpf_err(what("finding the"))(&"missing from the object"))?;
    // The three program types load and attach alike; only the cgroup
    // sock_addr links can be turned into pinnable FdLinks (aya 0.14), the
    // other two stay owned by the program and the process holding it.
    macro_rules! load_attach {
        ($ty:ty) => {{
            let p: &mut $ty = prog
                .try_into()
                .map_err(|e| ebpf_err(what("typing the"))(&e))?;
            p.load().map_err(|e| ebpf_err(what("loading the"))(&e))?;
            let id = p
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(|e| ebpf_err(what("attaching the"))(&e))?;
            (p, id)
        }};
    }
    if name == names::SOCKOPS || name == names::SOCKOPS_ACCEL {
        load_attach!(SockOps);
        return Ok(None);
    }
    if name == names::GETSOCKOPT {
        load_attach!(CgroupSockopt);
        return Ok(None);
    }
    let link: FdLink = {
        let (p, id) = load_attach!(CgroupSockAddr);
        p.take_link(id)
            .map_err(|e| ebpf_err(what("keeping the"))(&e))?
            .try_into()
            .map_err(|e| ebpf_err(what("pinning the"))(&e))?
    };
    Ok(Some(link))
}

/// The sidecar's own probes (sockops, getsockopt and, where the kernel
/// allows it, the fast path's sk_msg), attached while it runs; dropping
/// this detaches them. The fast path's maps are not pinned: they live and
/// die with the sidecar.
pub struct SidecarProbes {
    _bpf: Ebpf,
}

impl SidecarProbes {
    pub fn start(cgroup: &Path, object: &Path, fast_path: bool) -> Result<Self, InterceptError> {
        let dir = pin_dir(cgroup)?;
        if !object.exists() {
            return Err(InterceptError::NoObject {
                path: object.to_owned(),
            });
        }
        let mut bpf = load_with_pinned_maps(object, &dir)?;
        let cgroup_file = std::fs::File::open(cgroup).map_err(io_err(cgroup))?;
        let fast_path = fast_path
            && match start_fast_path(&mut bpf, cgroup_file.as_fd()) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "no fast path between agent and gateway: connections use loopback TCP");
                    false
                }
            };
        for name in SIDECAR_PROGRAMS {
            if name == names::SOCKOPS && fast_path {
                continue;
            }
            attach_program(&mut bpf, name, cgroup_file.as_fd())?;
        }
        if fast_path {
            tracing::info!("fast path on: intercepted connections skip loopback TCP");
        }
        Ok(Self { _bpf: bpf })
    }
}

/// Configures the fast path for this kernel and attaches its programs in
/// place of plain `rekey`. After an error no socket enters the sockmap.
fn start_fast_path(
    bpf: &mut Ebpf,
    cgroup: std::os::fd::BorrowedFd<'_>,
) -> Result<(), InterceptError> {
    let cfg = super::fast_path::config_for_kernel(Path::new(super::fast_path::KERNEL_BTF))
        .map_err(|e| ebpf_err("the fast path's kernel offsets")(&e))?;
    let accel = bpf
        .map_mut(names::MAP_ACCEL)
        .ok_or_else(|| ebpf_err("probes")(&"no ACCEL map"))?;
    let mut accel: Array<&mut MapData, AccelConfig> =
        Array::try_from(accel).map_err(|e| ebpf_err("ACCEL map")(&e))?;
    accel
        .set(0, cfg, 0)
        .map_err(|e| ebpf_err("writing the ACCEL map")(&e))?;
    let sockets: SockHash<&MapData, SockKey> = SockHash::try_from(
        bpf.map(names::MAP_SOCKETS)
            .ok_or_else(|| ebpf_err("probes")(&"no SOCKETS map"))?,
    )
    .map_err(|e| ebpf_err("SOCKETS map")(&e))?;
    let sockets = sockets
        .fd()
        .try_clone()
        .map_err(|e| ebpf_err("SOCKETS map")(&e))?;
    let what = |s: &str| format!("{s} program {}", names::SK_MSG);
    let msg: &mut SkMsg = bpf
        .program_mut(names::SK_MSG)
        .ok_or_else(|| ebpf_err(what("finding the"))(&"missing from the object"))?
        .try_into()
        .map_err(|e| ebpf_err(what("typing the"))(&e))?;
    // The verifier refuses reading kernel memory without CAP_PERFMON or
    // under a confidentiality lockdown: that, like a missing field, leaves
    // the fast path off.
    msg.load().map_err(|e| ebpf_err(what("loading the"))(&e))?;
    msg.attach(&sockets)
        .map_err(|e| ebpf_err(what("attaching the"))(&e))?;
    attach_program(bpf, names::SOCKOPS_ACCEL, cgroup)?;
    Ok(())
}

fn detach_dir(dir: &Path) -> Result<bool, InterceptError> {
    if !dir.exists() {
        return Ok(false);
    }
    for name in PINNED_PROGRAMS {
        let path = dir.join(format!("link_{name}"));
        if path.exists() {
            // Unpinning drops the last reference: the link detaches.
            let link = PinnedLink::from_pin(&path)
                .map_err(|e| ebpf_err(format!("opening {}", path.display()))(&e))?;
            drop(link.unpin().map_err(io_err(&path))?);
        }
    }
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let p = entry.map_err(io_err(dir))?.path();
        std::fs::remove_file(&p).map_err(io_err(&p))?;
    }
    std::fs::remove_dir(dir).map_err(io_err(dir))?;
    Ok(true)
}

/// Detaches and unpins everything for one cgroup. True if anything was there.
pub fn detach(cgroup: &Path) -> Result<bool, InterceptError> {
    check_privileges()?;
    detach_dir(&pin_dir(cgroup)?)
}

/// Detaches every scope under /sys/fs/bpf/agentgate.
pub fn detach_all() -> Result<usize, InterceptError> {
    check_privileges()?;
    let root = Path::new(PIN_ROOT);
    if !root.exists() {
        return Ok(0);
    }
    let mut n = 0;
    for e in std::fs::read_dir(root).map_err(io_err(root))? {
        let dir = e.map_err(io_err(root))?.path();
        if detach_dir(&dir)? {
            n += 1;
        }
    }
    let _ = std::fs::remove_dir(root);
    Ok(n)
}

/// One attached scope and its counters (summed over CPUs).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScopeStatus {
    pub scope: String,
    pub pin_dir: PathBuf,
    pub programs: Vec<String>,
    pub counters: std::collections::BTreeMap<String, u64>,
    pub sidecar_uid: u32,
    pub redirect: String,
    pub ports: Vec<u16>,
}

pub fn status() -> Result<Vec<ScopeStatus>, InterceptError> {
    check_privileges()?;
    let root = Path::new(PIN_ROOT);
    let mut out = Vec::new();
    if !root.exists() {
        return Ok(out);
    }
    for e in std::fs::read_dir(root).map_err(io_err(root))? {
        let dir = e.map_err(io_err(root))?.path();
        // A scope being detached meanwhile is not an error of the others.
        match scope_status(&dir) {
            Ok(st) => out.push(st),
            Err(e) => {
                tracing::debug!(dir = %dir.display(), error = %e, "scope vanished while reading")
            }
        }
    }
    Ok(out)
}

fn scope_status(dir: &Path) -> Result<ScopeStatus, InterceptError> {
    let dir = dir.to_owned();
    let programs = PINNED_PROGRAMS
        .iter()
        .filter(|p| dir.join(format!("link_{p}")).exists())
        .map(|p| p.to_string())
        .collect();
    let mut counters = std::collections::BTreeMap::new();
    let per_cpu: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(pinned_map(&dir, names::MAP_COUNTERS)?))
            .map_err(|e| ebpf_err("counters")(&e))?;
    for (i, name) in counter::NAMES.iter().enumerate() {
        let total = per_cpu
            .get(&(i as u32), 0)
            .map(|v| v.iter().sum::<u64>())
            .unwrap_or(0);
        counters.insert(name.to_string(), total);
    }
    let cfg_map: Array<MapData, ProbeConfig> =
        Array::try_from(Map::Array(pinned_map(&dir, names::MAP_CONFIG)?))
            .map_err(|e| ebpf_err("config")(&e))?;
    let cfg = cfg_map.get(&0, 0).unwrap_or_default();
    Ok(ScopeStatus {
        scope: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        pin_dir: dir.clone(),
        programs,
        counters,
        sidecar_uid: cfg.sidecar_uid,
        redirect: format!(
            "{}:{}",
            Ipv4Addr::from(cfg.redirect_ip4.to_ne_bytes()),
            cfg.redirect_port
        ),
        ports: cfg.ports[..usize::from(cfg.nports).min(MAX_CAPTURE_PORTS)].to_vec(),
    })
}

/// The sidecar's view of the redirected connections' records.
pub struct PeerTable {
    map: HashMap<MapData, PeerKey, ConnRecord>,
}

impl PeerTable {
    pub fn open(cgroup: &Path) -> Result<Self, InterceptError> {
        let dir = pin_dir(cgroup)?;
        let map = HashMap::try_from(Map::LruHashMap(pinned_map(&dir, names::MAP_BY_PEER)?))
            .map_err(|e| ebpf_err("BY_PEER map")(&e))?;
        Ok(Self { map })
    }

    /// The record of the connection whose client end is `peer`.
    pub fn lookup(&self, peer: std::net::SocketAddr) -> Option<ConnRecord> {
        let ip4 = match peer.ip() {
            std::net::IpAddr::V4(v4) => v4,
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped()?,
        };
        let key = PeerKey {
            ip4: u32::from_ne_bytes(ip4.octets()),
            port: u32::from(peer.port()),
        };
        self.map.get(&key, 0).ok()
    }
}
