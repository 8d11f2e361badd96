//! The socket-level fast path between an agent and the sidecar.
//!
//! Both ends of an intercepted connection live on one host, so once the
//! probes have put them into a sockmap, a write on one end can go straight
//! into the other end's receive queue without the loopback TCP path
//! (merbridge and Cilium do the same for service-mesh sidecars). The
//! kernel does not bound that queue by the receiver's buffer, so the probe
//! checks how much of it is unread before each redirect and sends the
//! connection's direction back to TCP for good once the receiver falls
//! behind. It reads that figure from kernel structures at offsets found
//! here, in the running kernel's BTF: no BTF, or no such fields, and the
//! fast path stays off while interception works as before.

use std::path::Path;

use btf_rs::{Btf, Type};
use gateway_common::AccelConfig;

/// Where the kernel describes its own types.
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Unread bytes a receiver may hold from the fast path; about what a TCP
/// socket buffers by default, so a slow reader costs the kernel no more
/// memory than over TCP.
pub const UNREAD_LIMIT: u32 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    #[error("kernel BTF {path}: {message}")]
    Btf { path: String, message: String },
    #[error("the kernel has no {0}: its sockmap differs from the one the fast path knows")]
    NoField(&'static str),
}

/// The probe's settings for this kernel, from its BTF.
pub fn config_for_kernel(btf_path: &Path) -> Result<AccelConfig, FastPathError> {
    let btf = Btf::from_file(btf_path).map_err(|e| FastPathError::Btf {
        path: btf_path.display().to_string(),
        message: e.to_string(),
    })?;
    Ok(AccelConfig {
        sk_user_data: field_offset(&btf, "sock", "sk_user_data")
            .ok_or(FastPathError::NoField("struct sock.sk_user_data"))?,
        psock_msg_tot_len: field_offset(&btf, "sk_psock", "msg_tot_len")
            .ok_or(FastPathError::NoField("struct sk_psock.msg_tot_len"))?,
        unread_limit: UNREAD_LIMIT,
        _pad: 0,
    })
}

/// Byte offset of a named member of a named struct (not a bitfield).
fn field_offset(btf: &Btf, st: &str, field: &str) -> Option<u32> {
    btf.resolve_types_by_name(st)
        .ok()?
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) => s.members.iter().find_map(|m| {
                let name = btf.resolve_name(m).ok()?;
                // A struct with bitfields gives every member a size, 0
                // for the plain ones.
                let plain = m.bitfield_size().unwrap_or(0) == 0 && m.bit_offset() % 8 == 0;
                (name == field && plain).then(|| m.bit_offset() / 8)
            }),
            _ => None,
        })
        // Zero is where `sk_common` sits, never these fields: treat it as
        // not found rather than read the wrong word.
        .filter(|off| *off != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_come_from_this_kernels_btf() {
        let path = Path::new(KERNEL_BTF);
        if !path.exists() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI machines have kernel BTF"
            );
            return;
        }
        let cfg = config_for_kernel(path).expect("offsets");
        // struct sock is several hundred bytes; sk_psock a few hundred.
        assert!((64..2048).contains(&cfg.sk_user_data), "{cfg:?}");
        assert!((8..2048).contains(&cfg.psock_msg_tot_len), "{cfg:?}");
        assert_eq!(cfg.unread_limit, UNREAD_LIMIT);
    }

    #[test]
    fn a_missing_btf_file_is_a_clear_error() {
        let err = config_for_kernel(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }
}
