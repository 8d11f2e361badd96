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
    Run(RunArgs),
    /// Check policy files and explain decisions.
    #[command(subcommand)]
    Policy(PolicyCommand),
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
        Command::Run(args) => {
            let result = Settings::resolve(args, std::env::var(UPSTREAM_PASSWORD_ENV).ok())
                .map_err(anyhow::Error::from)
                .and_then(|settings| {
                    tokio::runtime::Builder::new_multi_thread()
                        .enable_all()
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
