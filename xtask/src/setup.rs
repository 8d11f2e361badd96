//! Installing what the build and the tests need, idempotently: each step
//! checks first and does nothing when the piece is there.

use std::process::Command;

use anyhow::{bail, Result};

use crate::exec;

/// Debian packages: libclang for pg_query's bindgen, the PostgreSQL 15
/// server and clients the tests start, pgbouncer and valgrind for the
/// benchmark.
const DEBIAN_PACKAGES: &[&str] = &[
    "libclang-dev",
    // bpf-linker links the probes against LLVM 22.
    "llvm-22-dev",
    "libpolly-22-dev",
    "clang",
    "postgresql-15",
    "postgresql-client-15",
    "pgbouncer",
    // The benchmark counts the proxies' instructions with callgrind.
    "valgrind",
    "iproute2",
    "bpftool",
    "util-linux",
];

/// Python test clients, pinned.
const PYTHON_PACKAGES: &[&str] = &["psycopg[binary]==3.3.9", "pytest==9.2.0"];

pub fn run() -> Result<()> {
    debian()?;
    nightly()?;
    bpf_linker()?;
    python()?;
    eprintln!("xtask: setup complete");
    Ok(())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn is_root() -> bool {
    agentgate_tests::is_root()
}

fn apt(args: &[&str]) -> Result<()> {
    let mut cmd = if is_root() {
        Command::new("apt-get")
    } else {
        let mut c = Command::new("sudo");
        c.arg("apt-get");
        c
    };
    cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    exec(&mut cmd)
}

fn debian() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args)?;
    // The Debian package starts its own cluster on 5432; the tests start
    // their own and nothing should listen on the port the probes capture.
    let _ = Command::new("service")
        .args(["postgresql", "stop"])
        .status();
    Ok(())
}

/// The nightly the probes and fuzzers build with, pinned: its LLVM (22)
/// must be the one bpf-linker is built against, and a plain `nightly` moves
/// on (seen: a fresh machine fetched a nightly on LLVM 23, whose bitcode
/// bpf-linker rejects with "Invalid record").
pub const NIGHTLY: &str = "nightly-2026-05-15";

fn nightly() -> Result<()> {
    let has_src = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", NIGHTLY])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("rust-src"))
        .unwrap_or(false);
    if !has_src {
        exec(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    Ok(())
}

/// bpf-linker, pinned, built against the system's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

fn bpf_linker() -> Result<()> {
    let have = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if have {
        return Ok(());
    }
    exec(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )
}

fn python() -> Result<()> {
    let ok = Command::new("python3")
        .args([
            "-c",
            "import psycopg, pytest; assert psycopg.__version__ == '3.3.9'",
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        return Ok(());
    }
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
        .args(PYTHON_PACKAGES);
    exec(&mut cmd)
}

/// cargo-fuzz, for the bounded fuzz run in CI.
pub fn fuzz_tools() -> Result<()> {
    let have = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have {
        exec(Command::new("cargo").args(["install", "--locked", "cargo-fuzz@0.13.2"]))?;
    }
    let ok = Command::new("cargo")
        .args(["fuzz", "--version"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        bail!("cargo-fuzz is not usable after installing it");
    }
    Ok(())
}
