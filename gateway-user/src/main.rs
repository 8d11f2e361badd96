//! The `agentgate` command.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use agentgate::config::{RunArgs, Settings, UPSTREAM_PASSWORD_ENV};

/// A PostgreSQL gateway for autonomous agents: it terminates the protocol,
/// knows who is asking, judges every statement, and writes an audit record
/// for each as a JSON line on stdout.
#[derive(Parser)]
#[command(name = "agentgate", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Accept PostgreSQL clients and relay them to the database.
    ///
    /// Audit records go to stdout (or --audit PATH), diagnostics to stderr
    /// (level from AGENTGATE_LOG, e.g. `debug`).
    Run(Box<RunArgs>),
    /// Check policy files and explain decisions.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Attach, detach and inspect the eBPF probes (needs root or CAP_BPF).
    #[command(subcommand)]
    Probes(ProbesCommand),
}

#[derive(Subcommand)]
enum ProbesCommand {
    /// Attach the probes to a cgroup and pin them under /sys/fs/bpf/agentgate
    /// (attaching twice only refreshes the settings).
    Attach {
        /// The cgroup (path, or `auto`: this pod's cgroup).
        #[arg(long, value_name = "PATH|auto")]
        cgroup: String,
        /// The compiled probes [default: $AGENTGATE_PROBES, else agentgate-probes next to this binary].
        #[arg(long, value_name = "PATH")]
        probes: Option<PathBuf>,
        /// The sidecar's uid, whose connections are never redirected [default: this process's].
        #[arg(long, value_name = "UID")]
        sidecar_uid: Option<u32>,
        /// The sidecar's gid [default: this process's].
        #[arg(long, value_name = "GID")]
        sidecar_gid: Option<u32>,
        /// Where redirected connections go: the sidecar's listener.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15432")]
        redirect: std::net::SocketAddrV4,
        /// Destination port to capture (repeat for several) [default: 5432].
        #[arg(long = "capture-port", value_name = "PORT")]
        capture_ports: Vec<u16>,
    },
    /// Detach and unpin the probes of one cgroup, or of every cgroup.
    Detach {
        #[arg(long, value_name = "PATH|auto")]
        cgroup: Option<String>,
    },
    /// What is attached where, with the counters, as JSON.
    Status,
}

fn probes_command(cmd: ProbesCommand) -> anyhow::Result<()> {
    use agentgate::intercept;
    let mut out = std::io::stdout().lock();
    match cmd {
        ProbesCommand::Attach {
            cgroup,
            probes,
            sidecar_uid,
            sidecar_gid,
            redirect,
            mut capture_ports,
        } => {
            if capture_ports.is_empty() {
                capture_ports.push(gateway_common::POSTGRES_PORT);
            }
            let cgroup = intercept::cgroup::resolve(&cgroup)?;
            let opts = intercept::AttachOptions {
                cgroup: cgroup.clone(),
                object: intercept::probe_object(probes.as_deref()),
                sidecar_uid: sidecar_uid.unwrap_or_else(|| nix::unistd::geteuid().as_raw()),
                sidecar_gid: sidecar_gid.unwrap_or_else(|| nix::unistd::getegid().as_raw()),
                sidecar_cgroup: 0,
                redirect: (*redirect.ip(), redirect.port()),
                ports: capture_ports,
            };
            let (what, dir) = match intercept::attach(&opts)? {
                intercept::Attached::New(d) => ("attached", d),
                intercept::Attached::Existing(d) => ("already attached (settings refreshed)", d),
            };
            writeln!(
                out,
                "{what}: {} (pins in {})",
                cgroup.display(),
                dir.display()
            )?;
        }
        ProbesCommand::Detach { cgroup } => match cgroup {
            Some(c) => {
                let path = intercept::cgroup::resolve(&c)?;
                let done = intercept::detach(&path)?;
                writeln!(
                    out,
                    "{}: {}",
                    path.display(),
                    if done { "detached" } else { "nothing attached" }
                )?;
            }
            None => {
                let n = intercept::detach_all()?;
                writeln!(out, "detached {n} cgroup(s)")?;
            }
        },
        ProbesCommand::Status => {
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&intercept::status()?)?
            )?;
        }
    }
    Ok(())
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy file or directory; lists every problem with its
    /// file and line and exits non-zero if there is any.
    Check {
        /// Policy file or directory.
        path: PathBuf,
    },
    /// Print the facts of SQL and the decision, with the rule that made it.
    Explain {
        /// Policy file or directory.
        #[arg(long, value_name = "PATH")]
        policy: PathBuf,
        /// Who is asking, as key=value (agent, user, database, addr, uid,
        /// gid, comm, cgroup); repeat for several.
        #[arg(long, value_name = "KEY=VALUE")]
        identity: Vec<String>,
        /// The SQL text (one or several statements).
        sql: String,
    },
}

fn policy_command(cmd: PolicyCommand) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match cmd {
        PolicyCommand::Check { path } => match agentgate::policy::load_policy(&path) {
            Ok(p) => {
                let _ = writeln!(
                    out,
                    "{}: ok ({} identities, {} rules)",
                    p.label,
                    p.identities.len(),
                    p.rules.len()
                );
                ExitCode::SUCCESS
            }
            Err(problems) => {
                for p in &problems {
                    eprintln!("{p}");
                }
                eprintln!(
                    "agentgate: {} problem(s) in {}",
                    problems.len(),
                    path.display()
                );
                ExitCode::FAILURE
            }
        },
        PolicyCommand::Explain {
            policy,
            identity,
            sql,
        } => {
            let who = match agentgate::policy::explain::who_from_pairs(&identity) {
                Ok(w) => w,
                Err(e) => {
                    eprintln!("agentgate: {e}");
                    return ExitCode::from(2);
                }
            };
            match agentgate::policy::explain::explain(&policy, &who, &sql) {
                Ok(v) => {
                    let _ = writeln!(
                        out,
                        "{}",
                        serde_json::to_string_pretty(&v).unwrap_or_default()
                    );
                    ExitCode::SUCCESS
                }
                Err(problems) => {
                    for p in &problems {
                        eprintln!("{p}");
                    }
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AGENTGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            // One line: the error itself, without clap's usage block.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!(
                "agentgate: {} (see agentgate --help)",
                first.trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    init_tracing();
    match cli.command {
        Command::Policy(cmd) => policy_command(cmd),
        Command::Probes(cmd) => match probes_command(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("agentgate: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => {
            let result = Settings::resolve(*args, std::env::var(UPSTREAM_PASSWORD_ENV).ok())
                .map_err(anyhow::Error::from)
                .and_then(|settings| {
                    // Before any thread starts, so that all inherit it.
                    match agentgate::sched::apply(settings.sched_policy) {
                        Ok(agentgate::sched::Applied::Batch) => {
                            tracing::info!("threads run under SCHED_BATCH")
                        }
                        Ok(agentgate::sched::Applied::Kept(policy)) => tracing::info!(
                            policy = agentgate::sched::policy_name(policy),
                            "threads keep the scheduling policy they started with"
                        ),
                        Err(error) => tracing::warn!(
                            %error,
                            "cannot set SCHED_BATCH; threads keep the scheduling policy they started with"
                        ),
                    }
                    // One thread (the default) relays without waking tasks
                    // across threads, as pgbouncer does; measured faster on
                    // two cores shared with the agent and the database.
                    let mut rt = match settings.worker_threads {
                        1 => tokio::runtime::Builder::new_current_thread(),
                        n => {
                            let mut b = tokio::runtime::Builder::new_multi_thread();
                            if n > 0 {
                                b.worker_threads(n);
                            }
                            b
                        }
                    };
                    rt.enable_all()
                        .build()
                        .map_err(anyhow::Error::from)?
                        .block_on(agentgate::gateway::run(settings))
                });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("agentgate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
