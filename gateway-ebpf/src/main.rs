//! agentgate's probes: redirect the agent's PostgreSQL connections into the
//! sidecar and remember who made them.
//!
//! connect4/connect6  record {original destination, caller} by socket cookie
//!                    and rewrite the destination to the sidecar's listener;
//! sockops            once the client's source port exists, re-key the record
//!                    by the client address the sidecar will see as its peer;
//! getsockopt         answer the sidecar's getsockopt(SO_ORIGINAL_DST) from it;
//! bind4/bind6        nobody but the sidecar binds the sidecar's port;
//! rekey_accel        `rekey`, and both ends of each intercepted connection
//!                    into a sockmap, where
//! accel_msg          hands each write straight to the other end's receive
//!                    queue, skipping loopback TCP, while that queue's
//!                    unread bytes stay under a limit.
//!
//! Loop avoidance is by the caller's identity (the sidecar's uid, or its
//! cgroup), never by the destination, so a database behind a local proxy on
//! 127.0.0.1:5432 is still intercepted.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{bpf_sock_addr, bpf_sockopt},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_get_socket_cookie,
        bpf_probe_read_kernel,
    },
    macros::{cgroup_sock_addr, cgroup_sockopt, map, sk_msg, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkMsgContext, SockAddrContext, SockOpsContext, SockoptContext},
};
use gateway_common::{
    counter, AccelConfig, ConnRecord, PeerKey, ProbeConfig, SockKey, IP6T_SO_ORIGINAL_DST,
    MAX_CAPTURE_PORTS, SOL_IP, SOL_IPV6, SO_ORIGINAL_DST,
};

#[map(name = "CONFIG")]
static CONFIG: Array<ProbeConfig> = Array::with_max_entries(1, 0);

#[map(name = "BY_COOKIE")]
static BY_COOKIE: LruHashMap<u64, ConnRecord> = LruHashMap::with_max_entries(65536, 0);

#[map(name = "BY_PEER")]
static BY_PEER: LruHashMap<PeerKey, ConnRecord> = LruHashMap::with_max_entries(65536, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Set by the running sidecar; all zero: no fast path.
#[map(name = "ACCEL")]
static ACCEL: Array<AccelConfig> = Array::with_max_entries(1, 0);

/// Both ends of each accelerated connection, by their own view of it.
#[map(name = "SOCKETS")]
static SOCKETS: SockHash<SockKey> = SockHash::with_max_entries(65536, 0);

/// Each accelerated socket's kernel address, to read how much its receive
/// queue holds unread. An entry lost to the LRU only sends its connection
/// back to TCP.
#[map(name = "SOCK_ADDR")]
static SOCK_ADDR: LruHashMap<SockKey, u64> = LruHashMap::with_max_entries(65536, 0);

/// Receivers that get their bytes over TCP for good. Never evicted (a
/// plain hash): once bytes went by TCP, redirected bytes would be read
/// before them, so a direction must not go back to the fast path.
#[map(name = "TCP_ONLY")]
static TCP_ONLY: HashMap<SockKey, u8> = HashMap::with_max_entries(65536, 0);

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const IPPROTO_TCP: u32 = 6;
const AF_INET: u16 = 2;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: u32 = 5;
const BPF_NOEXIST: u64 = 1;
const BPF_F_INGRESS: u64 = 1;
const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;
/// `sk_user_data` carries flags in its low bits (SK_USER_DATA_PTRMASK).
const SK_USER_DATA_PTRMASK: u64 = !7;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_SOCK_OPS_STATE_CB_FLAG: i32 = 4;
const BPF_TCP_CLOSE: u32 = 7;
/// The kernel hands BPF at most one page of a getsockopt buffer.
const MAX_OPTLEN: i32 = 4096;

#[inline(always)]
fn count(index: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot of this CPU; no other writer runs concurrently.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn config() -> Option<&'static ProbeConfig> {
    CONFIG.get(0)
}

#[inline(always)]
fn captured(cfg: &ProbeConfig, port: u16) -> bool {
    let n = cfg.nports as usize;
    let mut i = 0;
    while i < MAX_CAPTURE_PORTS {
        if i < n && cfg.ports[i] == port {
            return true;
        }
        i += 1;
    }
    false
}

/// True when the caller is the sidecar itself: its connections go where
/// they were meant to.
#[inline(always)]
fn is_sidecar(cfg: &ProbeConfig) -> bool {
    let uid = bpf_get_current_uid_gid() as u32;
    // SAFETY: helper without preconditions.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    uid == cfg.sidecar_uid || (cfg.sidecar_cgroup != 0 && cgroup == cfg.sidecar_cgroup)
}

#[inline(always)]
fn caller(orig_ip4: u32, orig_port: u16, family: u16) -> ConnRecord {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    ConnRecord {
        orig_ip4,
        orig_port,
        family,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        // SAFETY: helper without preconditions.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    }
}

/// Records the caller and rewrites the destination; `ip4`/`port` are the
/// requested destination (network order IPv4, host order port).
#[inline(always)]
fn redirect(sa: *mut bpf_sock_addr, ip4: u32, port: u16, family: u16, v6: bool) -> i32 {
    let Some(cfg) = config() else {
        return ALLOW;
    };
    if !captured(cfg, port) || is_sidecar(cfg) {
        count(counter::SKIPPED);
        return ALLOW;
    }
    // SAFETY: `sa` is the context pointer the kernel gave this program.
    let cookie = unsafe { bpf_get_socket_cookie(sa as *mut c_void) };
    let record = caller(ip4, port, family);
    if BY_COOKIE.insert(&cookie, &record, 0).is_err() {
        // Without a record the sidecar could not tell who is asking: refuse
        // rather than let the connection go anywhere unchecked.
        return DENY;
    }
    // SAFETY: writes to the context fields the verifier allows for this
    // attach type.
    unsafe {
        if v6 {
            // ::ffff:a.b.c.d, the IPv4-mapped form of the listener address.
            (*sa).user_ip6 = [0, 0, 0xffff_u32.to_be(), cfg.redirect_ip4];
        } else {
            (*sa).user_ip4 = cfg.redirect_ip4;
        }
        (*sa).user_port = u32::from(cfg.redirect_port.to_be());
    }
    count(counter::REDIRECTED);
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: reads of context fields.
    let (protocol, ip4, port) = unsafe { ((*sa).protocol, (*sa).user_ip4, (*sa).user_port) };
    if protocol != IPPROTO_TCP {
        return ALLOW;
    }
    redirect(sa, ip4, u16::from_be(port as u16), 4, false)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: reads of context fields.
    let (protocol, ip6, port) = unsafe { ((*sa).protocol, (*sa).user_ip6, (*sa).user_port) };
    if protocol != IPPROTO_TCP {
        return ALLOW;
    }
    let port = u16::from_be(port as u16);
    let v4_mapped = ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0xffff_u32.to_be();
    if v4_mapped {
        return redirect(sa, ip6[3], port, 6, true);
    }
    let Some(cfg) = config() else {
        return ALLOW;
    };
    if captured(cfg, port) && !is_sidecar(cfg) {
        // The listener is IPv4: a native IPv6 connection to a captured port
        // cannot be redirected, so it is refused rather than let through.
        count(counter::IPV6_REFUSED);
        return DENY;
    }
    ALLOW
}

#[sock_ops]
pub fn rekey(ctx: SockOpsContext) -> u32 {
    rekey_and_maybe_accelerate(&ctx, false)
}

/// `rekey` plus the fast path. A program apart because it stores a socket's
/// address, which the verifier allows only with CAP_PERFMON: where it is
/// refused, the sidecar attaches plain `rekey` and interception works
/// without the fast path.
#[sock_ops]
pub fn rekey_accel(ctx: SockOpsContext) -> u32 {
    rekey_and_maybe_accelerate(&ctx, true)
}

#[inline(always)]
fn rekey_and_maybe_accelerate(ctx: &SockOpsContext, accel: bool) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // SAFETY: the context pointer the kernel gave this program.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
        // SAFETY: map values are plain data.
        if let Some(record) = unsafe { BY_COOKIE.get(&cookie) } {
            let record = *record;
            let key = PeerKey {
                ip4: local_ip4(ctx),
                port: ctx.local_port(),
            };
            let _ = BY_PEER.insert(&key, &record, 0);
            let _ = BY_COOKIE.remove(&cookie);
            // Be told when the connection closes, to drop the record.
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG);
            if accel {
                accelerate(ctx);
            }
        }
    } else if accel && op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        // The sidecar's end of a connection the probes redirected (its
        // client end has a record): on loopback this runs before the
        // client's connect() returns, so both ends are in the sockmap
        // before either writes.
        let intercepted = config().is_some_and(|c| ctx.local_port() == u32::from(c.redirect_port))
            && BY_PEER
                .get_ptr(&PeerKey {
                    ip4: remote_ip4(ctx),
                    port: u32::from_be(ctx.remote_port()),
                })
                .is_some();
        if intercepted {
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG);
            accelerate(ctx);
        }
    } else if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE {
        let key = PeerKey {
            ip4: local_ip4(ctx),
            port: ctx.local_port(),
        };
        let _ = BY_PEER.remove(&key);
        if accel {
            // The sockmap drops a closed socket by itself. Both directions'
            // TCP_ONLY entries go: one written after its receiver closed
            // goes when the writer closes, so none outlives its connection.
            let own = sock_key(ctx);
            let _ = SOCK_ADDR.remove(&own);
            let _ = TCP_ONLY.remove(&own);
            let _ = TCP_ONLY.remove(&own.peer());
        }
    }
    0
}

#[inline(always)]
fn accel_config() -> Option<&'static AccelConfig> {
    ACCEL
        .get(0)
        .filter(|a| a.sk_user_data != 0 && a.unread_limit != 0)
}

/// This socket's own view of its connection.
#[inline(always)]
fn sock_key(ctx: &SockOpsContext) -> SockKey {
    SockKey {
        // SAFETY: the context pointer the kernel gave this program.
        netns: unsafe { bpf_get_netns_cookie(ctx.ops as *mut c_void) },
        local_ip4: local_ip4(ctx),
        remote_ip4: remote_ip4(ctx),
        local_port: ctx.local_port(),
        remote_port: u32::from_be(ctx.remote_port()),
    }
}

/// Puts this end of the connection into the sockmap, with its address.
#[inline(always)]
fn accelerate(ctx: &SockOpsContext) {
    if accel_config().is_none() {
        return;
    }
    // SAFETY: a read of a context field.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    let mut key = sock_key(ctx);
    let addr = sk as u64;
    if SOCK_ADDR.insert(&key, &addr, 0).is_err() {
        return;
    }
    // SAFETY: the context pointer the kernel gave this program.
    let ops = unsafe { &mut *ctx.ops };
    if SOCKETS.update(&mut key, ops, BPF_NOEXIST).is_ok() {
        count(counter::ACCELERATED);
    } else {
        let _ = SOCK_ADDR.remove(&key);
    }
}

/// Every write on an accelerated socket: straight into the other end's
/// receive queue while that holds less than the limit unread, else (and
/// from then on, for this direction) over TCP as usual.
#[sk_msg]
pub fn accel_msg(ctx: SkMsgContext) -> u32 {
    let md = ctx.msg;
    // SAFETY: reads of context fields; the verifier checks each offset.
    let own = unsafe {
        SockKey {
            netns: bpf_get_netns_cookie(md as *mut c_void),
            local_ip4: ip4_of((*md).family, (*md).local_ip4, (*md).local_ip6[3]),
            remote_ip4: ip4_of((*md).family, (*md).remote_ip4, (*md).remote_ip6[3]),
            local_port: (*md).local_port,
            remote_port: u32::from_be((*md).remote_port),
        }
    };
    let mut peer = own.peer();
    // SAFETY: map values are plain data.
    if unsafe { TCP_ONLY.get(&peer) }.is_some() {
        return SK_PASS;
    }
    if room_for(&peer, ctx.size())
        && SOCKETS.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS) == i64::from(SK_PASS)
    {
        return SK_PASS;
    }
    if TCP_ONLY.insert(&peer, &1, 0).is_err() {
        // Unrecorded, a later write could take the fast path past this
        // one's bytes: fail the write rather than reorder the stream.
        return SK_DROP;
    }
    count(counter::ACCEL_TO_TCP);
    SK_PASS
}

/// Whether the receiver `peer` has room for `size` more redirected bytes.
#[inline(always)]
fn room_for(peer: &SockKey, size: u32) -> bool {
    let Some(cfg) = accel_config() else {
        return false;
    };
    // SAFETY: map values are plain data.
    let Some(addr) = (unsafe { SOCK_ADDR.get(peer) }) else {
        return false;
    };
    // SAFETY: bpf_probe_read_kernel faults safely; a socket closing
    // meanwhile reads as a stale or zero value, and the redirect itself
    // goes only to a socket the sockmap still holds.
    let psock =
        match unsafe { bpf_probe_read_kernel((*addr + u64::from(cfg.sk_user_data)) as *const u64) }
        {
            Ok(ud) => ud & SK_USER_DATA_PTRMASK,
            Err(_) => return false,
        };
    if psock == 0 {
        return false;
    }
    // SAFETY: as above.
    let unread = match unsafe {
        bpf_probe_read_kernel((psock + u64::from(cfg.psock_msg_tot_len)) as *const u32)
    } {
        Ok(n) => n,
        Err(_) => return false,
    };
    u64::from(unread) + u64::from(size) <= u64::from(cfg.unread_limit)
}

/// The local IPv4 address of a socket, from an AF_INET6 socket's mapped
/// address too.
#[inline(always)]
fn local_ip4(ctx: &SockOpsContext) -> u32 {
    ip4_of(ctx.family(), ctx.local_ip4(), ctx.local_ip6()[3])
}

/// The remote IPv4 address, as `local_ip4`.
#[inline(always)]
fn remote_ip4(ctx: &SockOpsContext) -> u32 {
    ip4_of(ctx.family(), ctx.remote_ip4(), ctx.remote_ip6()[3])
}

/// The IPv4 address of a socket of `family`: its IPv4 field, or the last
/// word of its (v4-mapped) IPv6 one.
#[inline(always)]
fn ip4_of(family: u32, v4: u32, v6_last: u32) -> u32 {
    // Both fields are read every time: the verifier refuses a context
    // pointer offset chosen at run time, which a branch would compile to.
    let v4 = core::hint::black_box(v4);
    let v6 = core::hint::black_box(v6_last);
    if family == u32::from(AF_INET) {
        v4
    } else {
        v6
    }
}

#[cgroup_sockopt(getsockopt)]
pub fn getsockopt(ctx: SockoptContext) -> i32 {
    let so: *mut bpf_sockopt = ctx.sockopt;
    // SAFETY: reads and writes of context fields allowed for this attach
    // type; the buffer is bounds-checked against optval_end below.
    unsafe {
        if (*so).optlen > MAX_OPTLEN {
            // Only a page is visible to BPF; leave other options intact.
            core::ptr::write_volatile(&raw mut (*so).optlen, MAX_OPTLEN);
        }
        let level = (*so).level;
        let name = (*so).optname;
        let original_dst = (level == SOL_IP && name == SO_ORIGINAL_DST)
            || (level == SOL_IPV6 && name == IP6T_SO_ORIGINAL_DST);
        if !original_dst {
            return ALLOW;
        }
        let sk = (*so).__bindgen_anon_1.sk;
        if sk.is_null() {
            return ALLOW;
        }
        // The accepted socket's peer is the client end of the connection.
        let key = PeerKey {
            ip4: (*sk).dst_ip4,
            port: u32::from(u16::from_be((*sk).dst_port)),
        };
        let Some(record) = BY_PEER.get(&key) else {
            count(counter::LOOKUP_MISS);
            return ALLOW;
        };
        count(counter::LOOKUP_HIT);
        let start = (*so).__bindgen_anon_2.optval as *mut u8;
        let end = (*so).__bindgen_anon_3.optval_end as *mut u8;
        if start.add(16) > end {
            return ALLOW;
        }
        // struct sockaddr_in: family, port (network order), address, zero.
        let fam = AF_INET.to_ne_bytes();
        let port = record.orig_port.to_be_bytes();
        let addr = record.orig_ip4.to_ne_bytes();
        *start = fam[0];
        *start.add(1) = fam[1];
        *start.add(2) = port[0];
        *start.add(3) = port[1];
        *start.add(4) = addr[0];
        *start.add(5) = addr[1];
        *start.add(6) = addr[2];
        *start.add(7) = addr[3];
        let mut i = 8;
        while i < 16 {
            *start.add(i) = 0;
            i += 1;
        }
        // Two separate 4-byte stores: the verifier refuses the one 8-byte
        // store the compiler would otherwise merge them into.
        core::ptr::write_volatile(&raw mut (*so).optlen, 16);
        core::ptr::write_volatile(&raw mut (*so).retval, 0);
    }
    ALLOW
}

#[inline(always)]
fn guard_bind(port: u16) -> i32 {
    let Some(cfg) = config() else {
        return ALLOW;
    };
    if port == cfg.redirect_port && !is_sidecar(cfg) {
        count(counter::BIND_DENIED);
        return DENY;
    }
    ALLOW
}

#[cgroup_sock_addr(bind4)]
pub fn bind4(ctx: SockAddrContext) -> i32 {
    // SAFETY: read of a context field.
    let port = unsafe { (*ctx.sock_addr).user_port };
    guard_bind(u16::from_be(port as u16))
}

#[cgroup_sock_addr(bind6)]
pub fn bind6(ctx: SockAddrContext) -> i32 {
    // SAFETY: read of a context field.
    let port = unsafe { (*ctx.sock_addr).user_port };
    guard_bind(u16::from_be(port as u16))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
