//! Finding the cgroup v2 hierarchy and naming cgroups.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 filesystem is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not inside the cgroup v2 mount at {mount}")]
    Outside { path: PathBuf, mount: PathBuf },
    #[error(
        "refusing to attach to {0}: it is the root cgroup, which would intercept the whole host"
    )]
    Root(PathBuf),
    #[error("`auto` found {0}, which does not look like a pod's cgroup (expected a kubepods slice or a pod cgroup); give --cgroup PATH")]
    NotPod(PathBuf),
}

/// Mount points of a filesystem type in a mountinfo text (field 5 is the
/// mount point; the type follows the ` - ` separator).
pub fn mounts_of_type(mountinfo: &str, fstype: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let ty = after.split_whitespace().next()?;
            (ty == fstype).then(|| before.split_whitespace().nth(4).map(unescape))?
        })
        .collect()
}

/// mountinfo escapes spaces and a few other bytes as octal `\NNN`.
fn unescape(s: &str) -> PathBuf {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

/// The cgroup v2 mount of this process (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| CgroupError::Io {
            path: "/proc/self/mountinfo".into(),
            source,
        })?;
    mounts_of_type(&text, "cgroup2")
        .into_iter()
        .next()
        .ok_or(CgroupError::NoCgroup2)
}

/// This process's cgroup v2 path relative to the hierarchy root, from the
/// `0::` line of /proc/self/cgroup.
pub fn own_cgroup(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// Whether a cgroup path looks like a Kubernetes pod's (systemd or cgroupfs
/// driver).
pub fn looks_like_pod(rel: &str) -> bool {
    let last = rel.rsplit('/').next().unwrap_or("");
    (rel.contains("kubepods") && (last.starts_with("pod") || last.contains("-pod")))
        || last.starts_with("pod")
}

/// Resolves `--cgroup`: a path (absolute, or relative to the cgroup2 mount)
/// or `auto`, the parent of this container's cgroup. Refuses the root.
pub fn resolve(spec: &str) -> Result<PathBuf, CgroupError> {
    let mount = cgroup2_mount()?;
    let path = if spec == "auto" {
        let text =
            std::fs::read_to_string("/proc/self/cgroup").map_err(|source| CgroupError::Io {
                path: "/proc/self/cgroup".into(),
                source,
            })?;
        let own = own_cgroup(&text).unwrap_or_default();
        let parent = Path::new(&own)
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !looks_like_pod(&parent) {
            return Err(CgroupError::NotPod(PathBuf::from(parent)));
        }
        mount.join(parent.trim_start_matches('/'))
    } else if Path::new(spec).is_absolute() {
        PathBuf::from(spec)
    } else {
        mount.join(spec)
    };
    let canonical = path.canonicalize().map_err(|source| CgroupError::Io {
        path: path.clone(),
        source,
    })?;
    if !canonical.starts_with(&mount) {
        return Err(CgroupError::Outside {
            path: canonical,
            mount,
        });
    }
    if canonical == mount {
        return Err(CgroupError::Root(canonical));
    }
    Ok(canonical)
}

/// A name for the pins of one cgroup: its path below the mount, `/` as `_`.
pub fn scope_name(mount: &Path, cgroup: &Path) -> String {
    let rel = cgroup.strip_prefix(mount).unwrap_or(cgroup);
    let s: String = rel
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "root".into()
    } else {
        s
    }
}

/// The cgroup id the kernel reports (bpf_get_current_cgroup_id) is the
/// inode number of the cgroup's directory.
pub fn cgroup_id(path: &Path) -> std::io::Result<u64> {
    Ok(std::fs::metadata(path)?.ino())
}

/// Finds the directory of a cgroup id below `root` (depth-limited walk).
pub fn path_of_id(root: &Path, id: u64) -> Option<PathBuf> {
    fn walk(dir: &Path, id: u64, depth: usize) -> Option<PathBuf> {
        if std::fs::metadata(dir).ok()?.ino() == id {
            return Some(dir.to_owned());
        }
        if depth == 0 {
            return None;
        }
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            if e.file_type().ok()?.is_dir() {
                if let Some(p) = walk(&e.path(), id, depth - 1) {
                    return Some(p);
                }
            }
        }
        None
    }
    walk(root, id, 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
32 25 0:27 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
33 32 0:28 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
34 32 0:29 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
40 25 0:35 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:16 - bpf bpf rw,mode=700
";
    const UNIFIED: &str = "\
29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
    const SPACED: &str = "36 25 0:31 / /mnt/cg\\040two rw - cgroup2 cgroup2 rw\n";

    #[test]
    fn finds_cgroup2_on_hybrid_and_unified_hosts() {
        assert_eq!(
            mounts_of_type(HYBRID, "cgroup2"),
            [PathBuf::from("/sys/fs/cgroup/unified")]
        );
        assert_eq!(
            mounts_of_type(UNIFIED, "cgroup2"),
            [PathBuf::from("/sys/fs/cgroup")]
        );
        assert_eq!(
            mounts_of_type(HYBRID, "bpf"),
            [PathBuf::from("/sys/fs/bpf")]
        );
        assert_eq!(
            mounts_of_type(SPACED, "cgroup2"),
            [PathBuf::from("/mnt/cg two")]
        );
        assert!(mounts_of_type("", "cgroup2").is_empty());
    }

    #[test]
    fn own_cgroup_and_pod_shapes() {
        let systemd = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/cri-containerd-abc.scope\n";
        let own = own_cgroup(systemd).unwrap();
        let parent = Path::new(&own)
            .parent()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(looks_like_pod(&parent), "{parent}");
        let cgroupfs =
            "12:pids:/kubepods/burstable/pod5678/abc\n0::/kubepods/burstable/pod5678/abc\n";
        let own = own_cgroup(cgroupfs).unwrap();
        assert!(looks_like_pod(
            Path::new(&own).parent().unwrap().to_str().unwrap()
        ));
        assert!(!looks_like_pod("/user.slice/user-0.slice"));
        assert!(!looks_like_pod(""));
    }

    #[test]
    fn scope_names() {
        let m = Path::new("/sys/fs/cgroup/unified");
        assert_eq!(
            scope_name(m, Path::new("/sys/fs/cgroup/unified/a/b")),
            "a_b"
        );
        assert_eq!(scope_name(m, m), "root");
    }
}
