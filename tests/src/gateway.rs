//! The real `agentgate` binary, started for one test.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::cluster::{Cluster, GW_PASSWORD, GW_USER};

fn target_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"))
}

/// A built binary, debug or else release, for clean-up that must not panic
/// (the bench builds only the release one).
pub fn any_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("AGENTGATE_BIN") {
        return Some(PathBuf::from(p));
    }
    ["debug", "release"]
        .iter()
        .map(|profile| target_dir().join(profile).join("agentgate"))
        .find(|p| p.exists())
}

/// Path of the built binary: AGENTGATE_BIN, or the workspace's target dir.
pub fn binary() -> PathBuf {
    if let Ok(p) = std::env::var("AGENTGATE_BIN") {
        return PathBuf::from(p);
    }
    let p = target_dir().join("debug/agentgate");
    assert!(
        p.exists(),
        "{} not built: run `cargo build -p gateway-user` first (`cargo xtask test` does)",
        p.display()
    );
    p
}

pub struct Gateway {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Gateway {
    /// A gateway in front of `cluster`, logging in as the SCRAM role.
    pub fn start(cluster: &Cluster, extra: &[&str]) -> Gateway {
        Self::start_under(&[], cluster, extra)
    }

    /// As `start`, run through `wrapper` (a command prefix such as `chrt`).
    pub fn start_under(wrapper: &[&str], cluster: &Cluster, extra: &[&str]) -> Gateway {
        let dir = tempfile::tempdir().expect("temp dir");
        let pw = dir.path().join("upstream-password");
        std::fs::write(&pw, format!("{GW_PASSWORD}\n")).expect("write password file");
        let mut args: Vec<String> = vec![
            "--upstream".into(),
            cluster.addr(),
            "--upstream-user".into(),
            GW_USER.into(),
            "--upstream-password-file".into(),
            pw.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let wrapper: Vec<String> = wrapper.iter().map(|s| s.to_string()).collect();
        Self::start_wrapped(dir, &wrapper, &args)
    }

    /// A gateway with exactly these `run` flags (plus --listen and --audit).
    pub fn start_raw(dir: tempfile::TempDir, args: &[String]) -> Gateway {
        Self::start_wrapped(dir, &[], args)
    }

    /// As `start_raw`, run through `wrapper` (a command prefix, e.g. one
    /// that moves the process into a cgroup first).
    pub fn start_wrapped(dir: tempfile::TempDir, wrapper: &[String], args: &[String]) -> Gateway {
        let port = crate::free_port();
        let audit = dir.path().join("audit.jsonl");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("stderr log");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(binary());
                c
            }
            None => Command::new(binary()),
        };
        let child = cmd
            .arg("run")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--audit")
            .arg(&audit)
            .args(args)
            .env("AGENTGATE_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start agentgate");
        let mut g = Gateway { port, dir, child };
        // Ready when it says so: the listener may sit in another network
        // namespace, out of this process's reach.
        let ready = crate::wait_for(std::time::Duration::from_secs(30), || {
            g.stderr()
                .contains("accepting PostgreSQL clients")
                .then_some(())
        });
        if ready.is_none() || !g.is_running() {
            let _ = g.child.kill();
            panic!("agentgate did not start listening:\n{}", g.stderr());
        }
        g
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn dsn(&self, user: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} dbname=postgres sslmode=disable",
            self.port
        )
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Every audit line so far, each parsed (a line that does not parse
    /// fails the test).
    pub fn audit(&self) -> Vec<serde_json::Value> {
        let path = self.dir.path().join("audit.jsonl");
        let Ok(f) = std::fs::File::open(&path) else {
            return vec![];
        };
        std::io::BufReader::new(f)
            .lines()
            .map(|l| {
                let l = l.expect("read audit");
                serde_json::from_str(&l)
                    .unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// Waits until the audit holds at least `n` records matching `pred`.
    pub fn wait_audit(
        &self,
        n: usize,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        crate::wait_for(Duration::from_secs(10), || {
            let v: Vec<_> = self.audit().into_iter().filter(|r| pred(r)).collect();
            (v.len() >= n).then_some(v)
        })
        .unwrap_or_else(|| {
            let got: Vec<_> = self.audit().into_iter().filter(|r| pred(r)).collect();
            panic!("expected {n} audit records, found {}: {got:#?}", got.len())
        })
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        self.wait()
    }

    /// Waits for the process to exit (after a signal sent elsewhere); the
    /// audit file can still be read afterwards.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("wait for agentgate")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Files of a throwaway CA and a leaf certificate for localhost/127.0.0.1.
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn make_tls(dir: &Path, name: &str) -> TlsFiles {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} test CA"));
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let ca = ca_params.self_signed(&ca_key).expect("ca cert");
    let leaf_params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("leaf params");
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let leaf = leaf_params
        .signed_by(&leaf_key, &ca, &ca_key)
        .expect("leaf cert");
    let files = TlsFiles {
        ca: dir.join(format!("{name}-ca.pem")),
        cert: dir.join(format!("{name}-cert.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    std::fs::write(&files.ca, ca.pem()).expect("write ca");
    std::fs::write(&files.cert, leaf.pem()).expect("write cert");
    std::fs::write(&files.key, leaf_key.serialize_pem()).expect("write key");
    files
}
