//! The CPU scheduling policy the gateway's threads run under.
//!
//! On a machine where the agent and the database compete with the gateway
//! for CPU, every message the gateway relays wakes it. Under the kernel's
//! default policy the woken gateway may preempt whatever runs on its CPU;
//! under SCHED_BATCH it does not. Measured side by side (two cores shared
//! with pgbench and PostgreSQL): about a microsecond less system time per
//! select-only transaction, 9-22% more throughput, a shorter tail with 64
//! clients, and lower latency for one client beside CPU-bound work (see
//! the README's benchmark section). SCHED_BATCH needs no privilege and
//! leaves the gateway's share of CPU as it was (same nice level, weight).

use crate::config::SchedPolicy;

/// What `apply` did, for the log.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Batch,
    /// The policy the process was started with, kept: asked for, or not
    /// the kernel's default (an operator's `chrt` choice is not overridden).
    Kept(i32),
}

/// The kernel's name for a policy number, for the log.
pub fn policy_name(policy: i32) -> &'static str {
    match policy & !libc::SCHED_RESET_ON_FORK {
        libc::SCHED_OTHER => "SCHED_OTHER",
        libc::SCHED_FIFO => "SCHED_FIFO",
        libc::SCHED_RR => "SCHED_RR",
        libc::SCHED_BATCH => "SCHED_BATCH",
        libc::SCHED_IDLE => "SCHED_IDLE",
        libc::SCHED_DEADLINE => "SCHED_DEADLINE",
        _ => "unknown",
    }
}

/// Sets the calling thread's policy. Threads inherit it, so this runs on
/// the main thread before the runtime or any other thread is started.
pub fn apply(policy: SchedPolicy) -> std::io::Result<Applied> {
    // SAFETY: sched_getscheduler only reads the policy of the calling
    // thread (pid 0); it takes no pointers.
    let current = unsafe { libc::sched_getscheduler(0) };
    if current < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if policy == SchedPolicy::Inherit || current != libc::SCHED_OTHER {
        return Ok(Applied::Kept(current));
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call, which
    // only reads it; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Applied::Batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_are_named_as_the_kernel_names_them() {
        assert_eq!(policy_name(libc::SCHED_BATCH), "SCHED_BATCH");
        assert_eq!(
            policy_name(libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK),
            "SCHED_FIFO"
        );
        assert_eq!(policy_name(42), "unknown");
    }
}
