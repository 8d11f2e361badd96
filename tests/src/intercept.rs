//! Privileged test fixtures: a child cgroup, processes started inside it
//! (optionally as another uid), and the probes detached afterwards.

use std::path::PathBuf;
use std::process::Command;

/// Whether privileged tests can run here. In CI (`CI=true`) they must: a
/// missing privilege fails the test instead of skipping it.
pub fn privileged() -> bool {
    if crate::is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("privileged tests must run as root when CI=true");
    }
    eprintln!("skipping a privileged test: not root");
    false
}

/// The cgroup v2 mount, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    info.lines()
        .find_map(|l| {
            let (before, after) = l.split_once(" - ")?;
            (after.split_whitespace().next()? == "cgroup2")
                .then(|| before.split_whitespace().nth(4))?
        })
        .map(PathBuf::from)
        .expect("a cgroup v2 mount")
}

pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(name: &str) -> TestCgroup {
        let mount = cgroup2_mount();
        let path = mount.join(format!("agentgate-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create the test cgroup");
        TestCgroup { path }
    }

    /// A command prefix that moves the process into this cgroup, then
    /// (with `uid`) drops to that uid and gid, then runs what follows.
    pub fn wrapper(&self, uid: Option<u32>) -> Vec<String> {
        let mut w = vec![
            "sh".to_string(),
            "-c".into(),
            format!(
                "echo $$ > {}/cgroup.procs && exec \"$@\"",
                self.path.display()
            ),
            "sh".into(),
        ];
        if let Some(uid) = uid {
            w.extend([
                "setpriv".into(),
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
            ]);
        }
        w
    }

    /// `program args...` inside the cgroup, as `uid` when given.
    pub fn command(&self, uid: Option<u32>, program: &str) -> Command {
        let w = self.wrapper(uid);
        let mut c = Command::new(&w[0]);
        c.args(&w[1..]).arg(program);
        c
    }

    pub fn attach(&self, extra: &[&str]) -> std::process::Output {
        Command::new(crate::gateway::binary())
            .args(["probes", "attach", "--cgroup"])
            .arg(&self.path)
            .args(extra)
            .output()
            .expect("run agentgate probes attach")
    }

    pub fn detach(&self) -> std::process::Output {
        self.detach_with(&crate::gateway::binary())
            .expect("run agentgate probes detach")
    }

    fn detach_with(&self, binary: &std::path::Path) -> std::io::Result<std::process::Output> {
        Command::new(binary)
            .args(["probes", "detach", "--cgroup"])
            .arg(&self.path)
            .output()
    }

    /// The directory the probes pin into for this cgroup: the documented
    /// layout, /sys/fs/bpf/agentgate/<path below the cgroup2 mount, / as _>.
    pub fn pin_dir(&self) -> PathBuf {
        let mount = cgroup2_mount();
        let rel = self.path.strip_prefix(&mount).unwrap_or(&self.path);
        let scope: String = rel
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
        PathBuf::from("/sys/fs/bpf/agentgate").join(scope)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Not `detach()`: a drop must not panic, even where no debug binary
        // was built (the bench's cgroups).
        if let Some(bin) = crate::gateway::any_binary() {
            let _ = self.detach_with(&bin);
        }
        if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// A network namespace whose loopback also answers on a TEST-NET address,
/// so a database can live "elsewhere" without leaving the machine.
pub struct TestNetns {
    pub name: String,
}

pub const ELSEWHERE: &str = "192.0.2.10";

impl TestNetns {
    pub fn new(name: &str) -> TestNetns {
        let name = format!("agtest-{name}-{}", std::process::id());
        let run = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("run ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&["netns", "add", &name]);
        let ns = TestNetns { name };
        // `ip netns exec` would remount /sys and hide the cgroup and bpf
        // filesystems; nsenter only switches the network namespace.
        for args in [
            vec!["ip", "link", "set", "lo", "up"],
            vec!["ip", "addr", "add", &format!("{ELSEWHERE}/32"), "dev", "lo"],
        ] {
            let out = Command::new("nsenter")
                .arg(ns.nsenter_arg())
                .args(&args)
                .output()
                .expect("nsenter");
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        ns
    }

    pub fn nsenter_arg(&self) -> String {
        format!("--net=/var/run/netns/{}", self.name)
    }

    /// Prefixes a command (prefix) with entering this namespace.
    pub fn wrap(&self, inner: Vec<String>) -> Vec<String> {
        let mut w = vec!["nsenter".to_string(), self.nsenter_arg()];
        w.extend(inner);
        w
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
