//! A throwaway PostgreSQL 15 cluster: initdb in a temp dir, a free port on
//! 127.0.0.1, SCRAM and MD5 roles for the gateway, sample data.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The role the gateway logs in as with SCRAM-SHA-256.
pub const GW_USER: &str = "gw_scram";
pub const GW_PASSWORD: &str = "gw-scram-secret";
/// The role the gateway logs in as with MD5.
pub const GW_MD5_USER: &str = "gw_md5";
pub const GW_MD5_PASSWORD: &str = "gw-md5-secret";
/// The database superuser, reachable by trust on the Unix socket only.
pub const SUPERUSER: &str = "postgres";

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub host: String,
    pub netns: Option<String>,
    /// TLS files when the cluster was started with TLS.
    pub tls: Option<ClusterTls>,
}

#[derive(Clone)]
pub struct ClusterTls {
    pub ca: PathBuf,
}

#[derive(Default)]
pub struct Options {
    pub tls: bool,
    pub extra_conf: Vec<String>,
    /// Run the server inside this network namespace (a name under
    /// /var/run/netns), listening on `listen` instead of 127.0.0.1.
    pub netns: Option<String>,
    pub listen: Option<(String, u16)>,
}

const NOBODY: u32 = 65534;

fn as_db_owner(cmd: &mut Command) -> &mut Command {
    if crate::is_root() {
        cmd.uid(NOBODY).gid(NOBODY);
    }
    cmd
}

fn chown_for_db(path: &Path) {
    if crate::is_root() {
        std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).expect("chown for the cluster");
    }
}

impl Cluster {
    pub fn start() -> Cluster {
        Self::start_with(Options::default())
    }

    pub fn start_with(opts: Options) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("agentgate-pg-")
            .tempdir()
            .expect("temp dir");
        chown_for_db(dir.path());
        let data = dir.path().join("data");
        let status = as_db_owner(
            Command::new(format!("{PG_BIN}/initdb"))
                .args(["-D"])
                .arg(&data)
                .args([
                    "-U",
                    SUPERUSER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        )
        .output()
        .expect("run initdb (is postgresql-15 installed? cargo xtask setup installs it)");
        assert!(
            status.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        let (host, port) = opts
            .listen
            .clone()
            .unwrap_or_else(|| ("127.0.0.1".to_string(), crate::free_port()));
        let mut conf = format!(
            "port = {port}\nlisten_addresses = '{host}'\nunix_socket_directories = '{}'\n\
             shared_preload_libraries = 'pg_stat_statements'\nmax_connections = 300\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             password_encryption = 'scram-sha-256'\n",
            dir.path().display()
        );
        let mut tls = None;
        if opts.tls {
            let t = crate::gateway::make_tls(dir.path(), "db");
            for p in [&t.cert, &t.key] {
                chown_for_db(p);
                std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                    .expect("chmod");
            }
            conf.push_str(&format!(
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                t.cert.display(),
                t.key.display()
            ));
            tls = Some(ClusterTls { ca: t.ca });
        }
        for line in &opts.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        let append = |file: &str, text: &str| {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(data.join(file))
                .expect("open conf");
            f.write_all(text.as_bytes()).expect("write conf");
        };
        append("postgresql.conf", &conf);
        std::fs::write(
            data.join("pg_hba.conf"),
            format!(
                "local all all trust\n\
                 host all {SUPERUSER} 127.0.0.1/32 trust\n\
                 host all {GW_MD5_USER} 127.0.0.1/32 md5\n\
                 host all all 127.0.0.1/32 scram-sha-256\n\
                 host all all 0.0.0.0/0 scram-sha-256\n"
            ),
        )
        .expect("write pg_hba.conf");
        let mut c = Cluster {
            dir,
            port,
            host,
            netns: opts.netns.clone(),
            tls,
        };
        // A port found free can be taken before the server binds it (by
        // another test's client connection, say): then start on another.
        let mut attempts = if opts.listen.is_none() { 5 } else { 1 };
        loop {
            attempts -= 1;
            if c.try_pg_ctl("start") {
                break;
            }
            let log = std::fs::read_to_string(c.dir.path().join("server.log")).unwrap_or_default();
            assert!(
                attempts > 0 && log.contains("could not bind"),
                "pg_ctl start failed:\n{log}"
            );
            c.port = crate::free_port();
            append("postgresql.conf", &format!("port = {}\n", c.port));
        }
        c.psql_super(&format!(
            "CREATE EXTENSION pg_stat_statements;
             CREATE ROLE {GW_USER} LOGIN SUPERUSER PASSWORD '{GW_PASSWORD}';
             SET password_encryption = 'md5';
             CREATE ROLE {GW_MD5_USER} LOGIN SUPERUSER PASSWORD '{GW_MD5_PASSWORD}';"
        ));
        c
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn pg_ctl(&self, action: &str) {
        assert!(
            self.try_pg_ctl(action),
            "pg_ctl {action} failed; see {}",
            self.dir.path().join("server.log").display()
        );
    }

    fn try_pg_ctl(&self, action: &str) -> bool {
        // nsenter needs root; the server must not run as root: enter the
        // namespace first, then drop to the owner with setpriv.
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}"));
                if crate::is_root() {
                    c.args([
                        "setpriv",
                        "--reuid=65534",
                        "--regid=65534",
                        "--clear-groups",
                    ]);
                }
                c.arg(format!("{PG_BIN}/pg_ctl"));
                c
            }
            None => {
                let mut c = Command::new(format!("{PG_BIN}/pg_ctl"));
                as_db_owner(&mut c);
                c
            }
        };
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-w", "-t", "60", "-l"])
            .arg(self.dir.path().join("server.log"))
            .arg(action)
            .stdout(Stdio::null());
        if action == "stop" {
            cmd.args(["-m", "fast"]);
        }
        cmd.status().expect("run pg_ctl").success()
    }

    /// Runs SQL as the superuser over the Unix socket and returns stdout
    /// (unaligned, tuples only).
    pub fn psql_super(&self, sql: &str) -> String {
        self.psql_as(SUPERUSER, sql)
    }

    /// Runs SQL as `user` over the Unix socket (trusted there).
    pub fn psql_as(&self, user: &str, sql: &str) -> String {
        let out = Command::new(format!("{PG_BIN}/psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                user,
                "-d",
                "postgres",
                "-c",
                sql,
            ])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql failed on {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Loads the demo's sample customer data.
    pub fn load_sample(&self) {
        let sql = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../xtask/demo/sample.sql"
        ))
        .expect("read xtask/demo/sample.sql");
        self.psql_super(&sql);
    }

    /// A libpq-style connection string for a direct connection.
    pub fn direct_dsn(&self, user: &str, password: &str) -> String {
        format!("host=127.0.0.1 port={} user={user} password={password} dbname=postgres sslmode=disable", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut cmd = Command::new(format!("{PG_BIN}/pg_ctl"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = as_db_owner(&mut cmd).status();
    }
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_port(port: u16) -> bool {
    crate::wait_for(Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| ())
    })
    .is_some()
}
