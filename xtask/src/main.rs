//! `cargo xtask`: set up a machine, run the tests, run the demo.

mod bench;
mod demo;
mod setup;

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "agentgate project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks (Debian packages, nightly rust-src,
    /// Python test clients). Safe to run again.
    Setup,
    /// Set up, then run formatting and lint checks and every test.
    Test {
        /// Skip the setup step.
        #[arg(long)]
        no_setup: bool,
        /// Seconds to fuzz the frame splitter and decoders [default: 60 in CI, else 0].
        #[arg(long)]
        fuzz_seconds: Option<u64>,
    },
    /// Build the eBPF probes (nightly, bpfel-unknown-none, bpf-linker) and
    /// place them next to the agentgate binaries.
    BuildEbpf,
    /// Build everything: the probes and the workspace.
    Build,
    /// Attach the probes to a cgroup with the built binary.
    Load {
        /// Cgroup path or `auto`.
        #[arg(long)]
        cgroup: String,
        /// Extra `agentgate probes attach` flags.
        #[arg(last = true)]
        rest: Vec<String>,
    },
    /// Detach the probes (one cgroup, or all).
    Unload {
        #[arg(long)]
        cgroup: Option<String>,
    },
    /// Set up, then run the built-in demo: a throwaway PostgreSQL with sample
    /// customers, the gateway in front, a scripted agent, audit JSON on stdout.
    Demo {
        #[arg(long)]
        no_setup: bool,
    },
    /// Set up, then measure agentgate beside a direct connection and
    /// pgbouncer (pgbench workloads, bulk SELECT/COPY, CPU, memory).
    Bench {
        #[arg(long)]
        no_setup: bool,
        #[command(flatten)]
        args: bench::BenchArgs,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Test {
            no_setup,
            fuzz_seconds,
        } => {
            if !no_setup {
                setup::run()?;
            }
            test(fuzz_seconds)
        }
        Task::BuildEbpf => build_ebpf().map(|_| ()),
        Task::Build => {
            build_ebpf()?;
            exec(cargo().args(["build", "--workspace"]))
        }
        Task::Load { cgroup, rest } => {
            build_ebpf()?;
            exec(cargo().args(["build", "-p", "gateway-user"]))?;
            exec(
                Command::new(root().join("target/debug/agentgate"))
                    .args(["probes", "attach", "--cgroup", &cgroup])
                    .args(rest),
            )
        }
        Task::Unload { cgroup } => {
            exec(cargo().args(["build", "-p", "gateway-user"]))?;
            let mut cmd = Command::new(root().join("target/debug/agentgate"));
            cmd.args(["probes", "detach"]);
            if let Some(c) = cgroup {
                cmd.args(["--cgroup", &c]);
            }
            exec(&mut cmd)
        }
        Task::Bench { no_setup, args } => {
            if !no_setup {
                setup::run()?;
            }
            bench::run(args)
        }
        Task::Demo { no_setup } => {
            if !no_setup {
                setup::run()?;
            }
            demo::run()
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_else(|| ".".into())
}

/// Runs a command (in the workspace root unless it names its own
/// directory), failing with its name.
pub fn exec(cmd: &mut Command) -> Result<()> {
    if cmd.get_current_dir().is_none() {
        cmd.current_dir(root());
    }
    let shown = format!("{cmd:?}");
    eprintln!("xtask: {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Builds the probes with the nightly toolchain and copies the object next
/// to the debug and release binaries, where `agentgate` looks for it.
pub fn build_ebpf() -> Result<std::path::PathBuf> {
    let dir = root().join("gateway-ebpf");
    exec(
        Command::new("cargo")
            .arg(format!("+{}", setup::NIGHTLY))
            .args(["build", "--release"])
            .current_dir(&dir)
            // The workspace's stable settings must not leak into the probe build.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO"),
    )?;
    let object = dir.join("target/bpfel-unknown-none/release/agentgate-probes");
    for profile in ["debug", "release"] {
        let out = root().join("target").join(profile);
        std::fs::create_dir_all(&out)?;
        std::fs::copy(&object, out.join("agentgate-probes"))
            .with_context(|| format!("copying {}", object.display()))?;
    }
    Ok(object)
}

fn test(fuzz_seconds: Option<u64>) -> Result<()> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let probes = build_ebpf()?;
    exec(cargo().args(["fmt", "--all", "--", "--check"]))?;
    exec(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    exec(cargo().args(["build", "-p", "gateway-user"]))?;
    exec(
        cargo()
            .args(["test", "--workspace", "--", "--test-threads", "2"])
            .env("AGENTGATE_PROBES", &probes),
    )?;
    let fuzz = fuzz_seconds.unwrap_or(if ci { 60 } else { 0 });
    if fuzz > 0 {
        setup::fuzz_tools()?;
        let targets = ["frames", "frontend_messages", "masking"];
        for target in targets {
            exec(
                Command::new("cargo")
                    .arg(format!("+{}", setup::NIGHTLY))
                    .args(["fuzz", "run", target, "--"])
                    .arg(format!("-max_total_time={}", fuzz / targets.len() as u64))
                    .current_dir(root().join("fuzz")),
            )?;
        }
    }
    eprintln!("xtask: all tests passed");
    Ok(())
}
