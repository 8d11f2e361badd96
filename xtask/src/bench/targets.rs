//! The performance targets, judged from one bench's runs.
//!
//! Each target compares agentgate with pgbouncer (or the direct connection)
//! within one round, so drift between rounds cancels. The table gives the
//! per-round figures, their median, and in how many rounds the target held:
//! on a noisy machine "met in 1 of 3 rounds" reads differently from "0 of 3".

use super::{
    median, Run, AGENTGATE, AGENTGATE_DEFAULT, AGENTGATE_MASKED, BULK_COPY, BULK_SELECT, DIRECT,
    ONE_CLIENT, PGBOUNCER, SELECT_8, TPCB,
};

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    AtLeast(f64),
    AtMost(f64),
}

impl Bound {
    fn holds(self, v: f64) -> bool {
        match self {
            Bound::AtLeast(b) => v >= b,
            Bound::AtMost(b) => v <= b,
        }
    }
}

#[derive(Debug, serde::Serialize)]
pub struct Verdict {
    pub target: String,
    pub config: &'static str,
    pub per_round: Vec<f64>,
    pub median: f64,
    pub bound: Bound,
    /// Decimal places the figures are shown with.
    #[serde(skip)]
    digits: usize,
    /// The median meets the bound.
    pub met: bool,
    pub rounds_met: usize,
}

/// The figure of `config` against `base` in each round both ran.
fn per_round(
    runs: &[Run],
    workload: &str,
    config: &str,
    base: &str,
    figure: impl Fn(&Run, &Run) -> Option<f64>,
) -> Vec<f64> {
    let of = |c: &str, round: usize| {
        runs.iter()
            .find(|r| r.workload == workload && r.config == c && r.round == round)
    };
    let rounds = runs.iter().map(|r| r.round + 1).max().unwrap_or(0);
    (0..rounds)
        .filter_map(|round| figure(of(config, round)?, of(base, round)?))
        .filter(|v| v.is_finite())
        .collect()
}

fn verdict(
    target: String,
    config: &'static str,
    per_round: Vec<f64>,
    bound: Bound,
    digits: usize,
) -> Option<Verdict> {
    let median = median(per_round.clone())?;
    Some(Verdict {
        rounds_met: per_round.iter().filter(|v| bound.holds(**v)).count(),
        met: bound.holds(median),
        target,
        config,
        per_round,
        median,
        bound,
        digits,
    })
}

fn rate_ratio(a: &Run, b: &Run) -> Option<f64> {
    (b.rate > 0.0).then(|| a.rate / b.rate)
}

/// Every target the runs (and the idle-memory figure) can judge; targets
/// whose workloads were not run (`--only`) are left out.
pub fn judge(runs: &[Run], kib_per_idle: Option<f64>) -> Vec<Verdict> {
    let mut out = Vec::new();
    for (mode, workload) in SELECT_8 {
        let tps = per_round(runs, workload, AGENTGATE_DEFAULT, PGBOUNCER, rate_ratio);
        out.extend(verdict(
            format!("select-only {mode}, 8 clients: TPS / pgbouncer's"),
            AGENTGATE_DEFAULT,
            tps,
            Bound::AtLeast(1.0),
            3,
        ));
        let cpu = per_round(runs, workload, AGENTGATE_DEFAULT, PGBOUNCER, |a, b| {
            Some(a.proxy_cpu_per_1000? / b.proxy_cpu_per_1000.filter(|c| *c > 0.0)?)
        });
        out.extend(verdict(
            format!("select-only {mode}, 8 clients: proxy CPU / pgbouncer's"),
            AGENTGATE_DEFAULT,
            cpu,
            Bound::AtMost(1.0),
            3,
        ));
    }
    // The default policy refuses TPC-B's writes: allow-all is judged.
    out.extend(verdict(
        "tpcb-like, 8 clients: TPS / pgbouncer's".into(),
        AGENTGATE,
        per_round(runs, TPCB, AGENTGATE, PGBOUNCER, rate_ratio),
        Bound::AtLeast(0.95),
        3,
    ));
    // Added latency over direct, minus pgbouncer's: direct's own latency
    // cancels out, leaving the difference of the two means.
    for config in [AGENTGATE, AGENTGATE_DEFAULT] {
        let extra = per_round(runs, ONE_CLIENT, config, PGBOUNCER, |a, b| {
            Some((a.mean_latency_ms? - b.mean_latency_ms?) * 1000.0)
        });
        out.extend(verdict(
            "1 client: added mean latency - pgbouncer's (µs)".into(),
            config,
            extra,
            Bound::AtMost(0.0),
            1,
        ));
    }
    for workload in [BULK_SELECT, BULK_COPY] {
        for (config, bound) in [(AGENTGATE, 0.95), (AGENTGATE_MASKED, 0.80)] {
            out.extend(verdict(
                format!("{workload}: rows/s / direct's"),
                config,
                per_round(runs, workload, config, DIRECT, rate_ratio),
                Bound::AtLeast(bound),
                3,
            ));
        }
    }
    for config in [AGENTGATE, AGENTGATE_DEFAULT] {
        let (audited, gaps, held_back) = audit_per_round(runs, config);
        out.extend(verdict(
            "audit: statement lines / statements pgbench completed".into(),
            config,
            audited,
            Bound::AtLeast(1.0),
            4,
        ));
        out.extend(verdict(
            "audit: gaps in the sequence numbers".into(),
            config,
            gaps,
            Bound::AtMost(0.0),
            0,
        ));
        out.extend(verdict(
            "audit: warnings that statements waited for the audit sink".into(),
            config,
            held_back,
            Bound::AtMost(0.0),
            0,
        ));
    }
    if let Some(kib) = kib_per_idle {
        out.extend(verdict(
            "idle client connection: KiB of RSS each".into(),
            AGENTGATE,
            vec![kib],
            Bound::AtMost(64.0),
            1,
        ));
    }
    out
}

/// Over each round's pgbench runs through `config`: the statement lines its
/// audit trail gained per statement pgbench completed (at least 1: pgbench's
/// own set-up queries and a statement cut off by the run's end add lines,
/// a lost record takes one away), the gaps in the lines' numbering, and
/// the gateway's warnings that the audit held statements back.
fn audit_per_round(runs: &[Run], config: &str) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut rounds: std::collections::BTreeMap<usize, [u64; 4]> = Default::default();
    for r in runs.iter().filter(|r| r.config == config) {
        if let (Some(a), Some(done)) = (r.audit, r.statements_completed) {
            let e = rounds.entry(r.round).or_default();
            e[0] += a.statement_lines;
            e[1] += done;
            e[2] += a.seq_gaps;
            e[3] += a.held_back_warnings;
        }
    }
    let (mut audited, mut gaps, mut held_back) = (Vec::new(), Vec::new(), Vec::new());
    for [lines, done, gap, held] in rounds.into_values().filter(|r| r[1] > 0) {
        audited.push(lines as f64 / done as f64);
        gaps.push(gap as f64);
        held_back.push(held as f64);
    }
    (audited, gaps, held_back)
}

pub fn print(verdicts: &[Verdict]) {
    use std::io::Write;
    if verdicts.is_empty() {
        return;
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "\n| target | config | per round | median | bound | verdict |"
    );
    let _ = writeln!(out, "|---|---|---|---:|---|---|");
    for v in verdicts {
        let d = v.digits;
        let rounds: Vec<String> = v.per_round.iter().map(|x| format!("{x:.d$}")).collect();
        let bound = match v.bound {
            Bound::AtLeast(b) => format!(">= {b:.d$}"),
            Bound::AtMost(b) => format!("<= {b:.d$}"),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.d$} | {bound} | {} ({} of {} rounds) |",
            v.target,
            v.config,
            rounds.join(" / "),
            v.median,
            if v.met { "met" } else { "not met" },
            v.rounds_met,
            v.per_round.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(workload: &str, config: &str, round: usize, rate: f64, cpu: f64, mean: f64) -> Run {
        Run {
            workload: workload.into(),
            config: config.into(),
            round,
            rate,
            mean_latency_ms: Some(mean),
            p99_latency_ms: None,
            proxy_cpu_per_1000: Some(cpu),
            audit_cpu_per_1000: None,
            ratio_to_direct: None,
            failed: 0,
            statements_completed: None,
            audit: None,
        }
    }

    #[test]
    fn targets_are_judged_round_by_round_against_the_same_rounds_base() {
        let w = SELECT_8[2].1;
        let runs = vec![
            // Round 0: the gateway is faster; round 1 and 2: slower.
            run(w, PGBOUNCER, 0, 1000.0, 0.010, 0.1),
            run(w, AGENTGATE_DEFAULT, 0, 1100.0, 0.012, 0.1),
            run(w, PGBOUNCER, 1, 2000.0, 0.010, 0.1),
            run(w, AGENTGATE_DEFAULT, 1, 1800.0, 0.009, 0.1),
            run(w, PGBOUNCER, 2, 1000.0, 0.010, 0.1),
            run(w, AGENTGATE_DEFAULT, 2, 950.0, 0.011, 0.1),
        ];
        let v = judge(&runs, Some(30.0));
        let tps = &v[0];
        assert_eq!(tps.per_round, [1.1, 0.9, 0.95]);
        assert_eq!((tps.median, tps.met, tps.rounds_met), (0.95, false, 1));
        let cpu = &v[1];
        assert_eq!(cpu.config, AGENTGATE_DEFAULT);
        assert!((cpu.median - 1.1).abs() < 1e-9, "{cpu:?}");
        assert_eq!((cpu.met, cpu.rounds_met), (false, 1));
        // Only the workloads that ran, and the idle figure, are judged.
        assert_eq!(v.len(), 3);
        assert!(v[2].met && v[2].target.starts_with("idle"));
    }

    #[test]
    fn latency_target_compares_the_two_proxies_means() {
        let runs = vec![
            run(ONE_CLIENT, PGBOUNCER, 0, 1.0, 0.01, 0.100),
            run(ONE_CLIENT, AGENTGATE, 0, 1.0, 0.01, 0.098),
            run(ONE_CLIENT, AGENTGATE_DEFAULT, 0, 1.0, 0.01, 0.105),
        ];
        let v = judge(&runs, None);
        assert_eq!(v.len(), 2);
        assert!(v[0].met && (v[0].median + 2.0).abs() < 1e-6, "{:?}", v[0]);
        assert!(!v[1].met && (v[1].median - 5.0).abs() < 1e-6, "{:?}", v[1]);
    }

    #[test]
    fn audit_is_judged_per_round_over_every_workload() {
        let audited = |workload: &str, round, done, lines, gaps| Run {
            statements_completed: Some(done),
            audit: Some(crate::bench::audit_trail::Appended {
                lines: lines + 16,
                statement_lines: lines,
                seq_gaps: gaps,
                held_back_warnings: gaps,
            }),
            ..run(workload, AGENTGATE, round, 1.0, 0.01, 0.1)
        };
        let runs = vec![
            // Round 0: two set-up queries more than pgbench completed.
            audited(SELECT_8[0].1, 0, 1000, 1002, 0),
            audited(TPCB, 0, 7000, 7000, 0),
            // Round 1: one record lost, and a gap.
            audited(SELECT_8[0].1, 1, 1000, 1000, 0),
            audited(TPCB, 1, 7000, 6999, 1),
        ];
        let v = judge(&runs, None);
        let lines = v
            .iter()
            .find(|v| v.target.contains("statement lines"))
            .unwrap();
        assert_eq!(lines.per_round, [8002.0 / 8000.0, 7999.0 / 8000.0]);
        assert_eq!((lines.rounds_met, lines.config), (1, AGENTGATE));
        let gaps = v.iter().find(|v| v.target.contains("gaps")).unwrap();
        assert_eq!(gaps.per_round, [0.0, 1.0]);
        assert_eq!(gaps.rounds_met, 1);
        let held = v.iter().find(|v| v.target.contains("waited")).unwrap();
        assert_eq!(held.per_round, [0.0, 1.0]);
        // Nothing judged for a configuration without audit figures.
        assert!(v.iter().all(|v| v.config == AGENTGATE));
    }
}
