//! Stopping a bench cleanly. A bench killed outright leaves its PostgreSQL
//! cluster, pgbouncer and gateways running and gigabytes of audit trail in
//! its temporary directory. On SIGINT, SIGTERM or SIGHUP the pgbench running
//! now is stopped and the bench returns an error at the next run, so every
//! process and directory it made is removed on the way out. A second signal
//! exits at once.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use anyhow::{bail, Result};
use tokio::signal::unix::{signal, SignalKind};

static STOP: AtomicBool = AtomicBool::new(false);
/// The pgbench running now (0: none).
static RUNNING: AtomicU32 = AtomicU32::new(0);

/// Starts listening for the signals; before it returns they are caught.
pub fn install() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut signals = {
        let _in_runtime = rt.enter();
        [
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::hangup())?,
        ]
    };
    std::thread::Builder::new()
        .name("bench-signals".into())
        .spawn(move || {
            rt.block_on(async move {
                let [int, term, hup] = &mut signals;
                for first in [true, false] {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                        _ = hup.recv() => {}
                    }
                    if !first {
                        std::process::exit(130);
                    }
                    STOP.store(true, Ordering::SeqCst);
                    eprintln!(
                        "bench: interrupted; stopping pgbench, then the cluster, pgbouncer and \
                         gateways (a second signal exits at once and leaves them)"
                    );
                    let pid = RUNNING.load(Ordering::SeqCst);
                    if pid != 0 {
                        let _ = Command::new("kill")
                            .args(["-TERM", &pid.to_string()])
                            .status();
                    }
                }
            })
        })?;
    Ok(())
}

/// Fails once a signal asked the bench to stop.
pub fn check() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("bench interrupted");
    }
    Ok(())
}

/// Marks `pid` as the pgbench to stop on a signal, until the guard drops.
pub fn running(pid: u32) -> Running {
    RUNNING.store(pid, Ordering::SeqCst);
    Running
}

pub struct Running;

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.store(0, Ordering::SeqCst);
    }
}
