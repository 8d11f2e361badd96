//! Decisions: what may pass.
//!
//! Every statement goes through here before it goes upstream. A statement
//! is broken into facts (its kinds, the objects it touches and how, the
//! functions it calls, its risky features); each fact is judged by the most
//! specific matching rule for the session's identities (deny beats approve
//! beats allow at the same specificity); a kind, object or function that no
//! rule allows is denied. The statement gets the verdict of its worst fact.
//! Below any policy sits a built-in floor: what does not parse, the
//! fast-path FunctionCall, replication, changes of the settings that change
//! how SQL is read, and anything while the audit cannot be written.

mod compile;
pub mod explain;
mod glob;
mod load;
pub mod masking;
pub mod model;
mod store;

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use serde::Serialize;

use crate::sql::{Analysis, Feature, StatementFacts};

pub use compile::{compile, Cidr, Policy, Problem, Rule, Target, KINDS};
pub use load::{read_policy_path, PolicyError};
pub use model::{Mode, RuleAction};
pub use store::{load as load_policy, PolicyStore, ReloadOutcome};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Deny,
    NeedsApproval,
}

/// The verdict on one statement, with the rule that gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub rule: Arc<str>,
    /// Why, in one sentence fit for the client; never a protected value.
    pub reason: String,
    pub mode: Mode,
    pub controls: Arc<[String]>,
    /// The policy's name and digest (`builtin` for the floor).
    pub policy: Arc<str>,
    /// The decision as the audit writes it, made once and shared by every
    /// clone (a cached decision is audited on every statement it covers).
    pub audit_form: AuditForm,
}

/// A decision's audit serialisation, filled on first use. A cache, not part
/// of the decision's value: it never makes two decisions differ.
#[derive(Debug, Clone, Default)]
pub struct AuditForm(Arc<OnceLock<Box<str>>>);

impl AuditForm {
    pub fn get_or_init(&self, make: impl FnOnce() -> String) -> &str {
        self.0.get_or_init(|| make().into_boxed_str())
    }
}

impl PartialEq for AuditForm {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for AuditForm {}

pub const RULE_UNPARSEABLE: &str = "builtin.unparseable";
pub const RULE_FUNCTION_CALL: &str = "builtin.function-call";
pub const RULE_REPLICATION: &str = "builtin.replication";
pub const RULE_AUDIT_UNAVAILABLE: &str = "builtin.audit-unavailable";
pub const RULE_UNKNOWN_STATEMENT: &str = "builtin.unknown-prepared-statement";
pub const RULE_PINNED_SETTING: &str = "builtin.pinned-setting";
pub const RULE_NO_POLICY: &str = "builtin.no-policy";
pub const RULE_DEFAULT_DENY: &str = "default-deny";

fn builtin_label() -> Arc<str> {
    Arc::from("builtin")
}

impl Decision {
    fn builtin(action: Action, rule: &str, reason: impl Into<String>) -> Self {
        Self {
            action,
            rule: Arc::from(rule),
            reason: reason.into(),
            mode: Mode::Enforce,
            controls: Arc::from(Vec::new()),
            policy: builtin_label(),
            audit_form: AuditForm::default(),
        }
    }

    /// Whether the statement goes upstream: allowed, or judged in observe mode.
    pub fn lets_through(&self) -> bool {
        self.action == Action::Allow || self.mode == Mode::Observe
    }

    /// The message of the ErrorResponse a refused client receives.
    pub fn client_message(&self) -> String {
        match self.action {
            Action::NeedsApproval => format!(
                "agentgate: approval required by rule {}: {} (no approver is configured, so it is denied)",
                self.rule, self.reason
            ),
            _ => format!("agentgate: denied by rule {}: {}", self.rule, self.reason),
        }
    }

    pub fn unparseable() -> Self {
        Self::builtin(
            Action::Deny,
            RULE_UNPARSEABLE,
            "the statement could not be parsed, and what the gateway cannot read does not pass",
        )
    }

    pub fn function_call() -> Self {
        Self::builtin(
            Action::Deny,
            RULE_FUNCTION_CALL,
            "the fast-path FunctionCall message is not allowed; call the function in a query",
        )
    }

    pub fn replication() -> Self {
        Self::builtin(
            Action::Deny,
            RULE_REPLICATION,
            "replication connections are not allowed",
        )
    }

    pub fn unknown_statement(what: &str) -> Self {
        Self::builtin(
            Action::Deny,
            RULE_UNKNOWN_STATEMENT,
            format!("{what} was not prepared through the gateway"),
        )
    }

    pub fn audit_unavailable() -> Self {
        Self::builtin(
            Action::Deny,
            RULE_AUDIT_UNAVAILABLE,
            "the audit trail cannot be written, so no statement may run",
        )
    }

    pub fn pinned_setting(what: &str) -> Self {
        Self::builtin(
            Action::Deny,
            RULE_PINNED_SETTING,
            format!(
                "{what} changes how the server reads SQL (standard_conforming_strings, \
                 backslash_quote, client_encoding are pinned)"
            ),
        )
    }

    /// A protected column would flow into a computed value, and its rule
    /// says such statements are refused.
    pub fn computed_from_protected(rule: &masking::MaskRule, policy: Arc<str>) -> Self {
        Self {
            action: Action::Deny,
            rule: Arc::clone(&rule.name),
            reason: "a protected column flows into a computed value".into(),
            mode: Mode::Enforce,
            controls: Arc::clone(&rule.controls),
            policy,
            audit_form: AuditForm::default(),
        }
    }

    fn no_policy() -> Self {
        Self::builtin(Action::Allow, RULE_NO_POLICY, "")
    }
}

/// What the gateway knows about who is asking, for identity matching.
#[derive(Debug, Clone, Default)]
pub struct Who {
    /// Verified by client SCRAM authentication.
    pub agent: Option<String>,
    pub client_addr: Option<IpAddr>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub comm: Option<String>,
    pub cgroup: Option<String>,
    pub startup_user: String,
    pub database: String,
}

/// One thing a statement does, judged on its own.
#[derive(Debug, Clone, Copy)]
enum Fact<'a> {
    Kind(&'a str),
    Object(&'a crate::sql::ObjectRef),
    Function(&'a str),
    Feature(Feature),
}

impl Fact<'_> {
    fn describe(&self) -> String {
        match self {
            Fact::Kind(k) => format!("statement kind {k}"),
            Fact::Object(o) => format!("{} access to {}", o.access.name(), o.name),
            Fact::Function(f) => format!("function {f}"),
            Fact::Feature(f) => format!("feature {}", f.name()),
        }
    }
}

fn function_matches(p: &glob::Pattern, f: &str) -> bool {
    if p.text.contains('.') {
        return p.matches(f);
    }
    // An unqualified pattern means the built-in function, however it is
    // written: `pg_read_file` and `pg_catalog.pg_read_file` alike.
    p.matches(f)
        || f.rsplit_once('.')
            .is_some_and(|(schema, name)| schema == "pg_catalog" && p.matches(name))
}

impl Policy {
    /// Indices of the identities `who` matches.
    pub fn identities_of(&self, who: &Who) -> Vec<usize> {
        self.identities
            .iter()
            .enumerate()
            .filter(|(_, id)| {
                let m = &id.matcher;
                let any = |ps: &Option<Vec<glob::Pattern>>, v: Option<&str>| match ps {
                    None => true,
                    Some(ps) => v.is_some_and(|v| ps.iter().any(|p| p.matches(v))),
                };
                any(&m.agent, who.agent.as_deref())
                    && any(&m.comm, who.comm.as_deref())
                    && any(&m.cgroup, who.cgroup.as_deref())
                    && any(&m.startup_user, Some(&who.startup_user))
                    && any(&m.database, Some(&who.database))
                    && m.uid
                        .as_ref()
                        .is_none_or(|l| who.uid.is_some_and(|u| l.contains(&u)))
                    && m.gid
                        .as_ref()
                        .is_none_or(|l| who.gid.is_some_and(|g| l.contains(&g)))
                    && m.client_addr.as_ref().is_none_or(|l| {
                        who.client_addr
                            .is_some_and(|a| l.iter().any(|c| c.contains(a)))
                    })
            })
            .map(|(i, _)| i)
            .collect()
    }

    fn rule_applies(rule: &Rule, identities: &[usize]) -> bool {
        rule.identities
            .as_ref()
            .is_none_or(|ids| ids.iter().any(|i| identities.contains(i)))
    }

    /// The rule that judges one fact: the most specific match, deny over
    /// approve over allow at equal specificity.
    fn judge(&self, fact: Fact<'_>, identities: &[usize]) -> Option<&Rule> {
        let mut best: Option<((u32, u8, u8), &Rule)> = None;
        for rule in &self.rules {
            if !Self::rule_applies(rule, identities) {
                continue;
            }
            let spec = match (&rule.target, fact) {
                (Target::Kinds(ps), Fact::Kind(k)) => ps
                    .iter()
                    .filter(|p| p.matches(k))
                    .map(|p| p.specificity)
                    .max(),
                (Target::Objects { patterns, access }, Fact::Object(o)) => {
                    if access.as_ref().is_some_and(|a| !a.contains(&o.access)) {
                        None
                    } else {
                        patterns
                            .iter()
                            .filter(|p| p.matches(&o.name))
                            .map(|p| p.specificity)
                            .max()
                    }
                }
                (Target::Functions(ps), Fact::Function(f)) => ps
                    .iter()
                    .filter(|p| function_matches(p, f))
                    .map(|p| p.specificity)
                    .max(),
                (Target::Features(fs), Fact::Feature(f)) => fs.contains(&f).then_some(u32::MAX),
                _ => None,
            };
            let Some(spec) = spec else { continue };
            let key = (
                spec,
                u8::from(rule.identities.is_some()),
                compile::severity(rule.action),
            );
            if best.as_ref().is_none_or(|(k, _)| key > *k) {
                best = Some((key, rule));
            }
        }
        best.map(|(_, r)| r)
    }

    fn facts_of(s: &StatementFacts) -> Vec<Fact<'_>> {
        let mut facts: Vec<Fact<'_>> = s.kinds.iter().map(|k| Fact::Kind(k)).collect();
        facts.extend(s.objects.iter().map(Fact::Object));
        facts.extend(s.functions.iter().map(|f| Fact::Function(f)));
        facts.extend(s.features.iter().map(|f| Fact::Feature(*f)));
        facts
    }

    /// Judges one statement.
    pub fn decide_statement(&self, s: &StatementFacts, identities: &[usize]) -> Decision {
        // Enforced and observed verdicts are kept apart: an observe-mode
        // rule reports, an enforce-mode rule decides.
        let mut enforced: Option<(u8, Decision)> = None;
        let mut observed: Option<(u8, Decision)> = None;
        for fact in Self::facts_of(s) {
            let (sev, decision) = match self.judge(fact, identities) {
                Some(rule) => {
                    let sev = compile::severity(rule.action);
                    let action = match rule.action {
                        RuleAction::Allow => Action::Allow,
                        RuleAction::Deny => Action::Deny,
                        RuleAction::Approve => Action::NeedsApproval,
                    };
                    let reason = match (&rule.reason, rule.action) {
                        (_, RuleAction::Allow) => String::new(),
                        (Some(r), _) => r.clone(),
                        (None, _) => format!("{} is not allowed", fact.describe()),
                    };
                    (
                        sev,
                        Decision {
                            action,
                            rule: Arc::clone(&rule.name),
                            reason,
                            mode: rule.mode,
                            controls: Arc::clone(&rule.controls),
                            policy: Arc::clone(&self.label),
                            audit_form: AuditForm::default(),
                        },
                    )
                }
                // Features are flags on top of kinds and objects; only a rule
                // naming one judges it.
                None if matches!(fact, Fact::Feature(_)) => continue,
                None => (
                    compile::severity(RuleAction::Deny),
                    Decision {
                        action: Action::Deny,
                        rule: Arc::from(RULE_DEFAULT_DENY),
                        reason: format!("{} is not allowed by any rule", fact.describe()),
                        mode: Mode::Enforce,
                        controls: Arc::from(Vec::new()),
                        policy: Arc::clone(&self.label),
                        audit_form: AuditForm::default(),
                    },
                ),
            };
            let slot = if decision.mode == Mode::Observe {
                &mut observed
            } else {
                &mut enforced
            };
            if slot.as_ref().is_none_or(|(s, _)| sev > *s) {
                *slot = Some((sev, decision));
            }
        }
        let allow = || Decision {
            action: Action::Allow,
            rule: Arc::from("allow"),
            reason: String::new(),
            mode: Mode::Enforce,
            controls: Arc::from(Vec::new()),
            policy: Arc::clone(&self.label),
            audit_form: AuditForm::default(),
        };
        // An enforced refusal stops the statement whatever was observed; an
        // observed refusal is reported only when nothing enforced objects.
        match (enforced, observed) {
            (Some((es, e)), _) if es > 0 => e,
            (_, Some((os, o))) if os > 0 => o,
            (Some((_, e)), _) => e,
            (None, _) => allow(),
        }
    }
}

/// Judges a whole query string: the built-in floor first, then the policy
/// for each statement; the worst statement decides.
pub fn decide(policy: Option<&Policy>, identities: &[usize], analysis: &Analysis) -> Decision {
    if analysis.parse_error.is_some() {
        return Decision::unparseable();
    }
    for s in &analysis.statements {
        if s.features.contains(&Feature::PinnedSettingChange) {
            return Decision::pinned_setting(&format!("a {} statement", s.kinds[0]));
        }
    }
    let Some(policy) = policy else {
        return Decision::no_policy();
    };
    let mut worst: Option<Decision> = None;
    for s in &analysis.statements {
        let d = policy.decide_statement(s, identities);
        let rank = |d: &Decision| {
            (
                u8::from(d.mode == Mode::Enforce && d.action != Action::Allow),
                match d.action {
                    Action::Allow => 0,
                    Action::NeedsApproval => 1,
                    Action::Deny => 2,
                },
            )
        };
        if worst.as_ref().is_none_or(|w| rank(&d) > rank(w)) {
            worst = Some(d);
        }
    }
    worst.unwrap_or_else(|| Decision {
        action: Action::Allow,
        rule: Arc::from("empty"),
        reason: String::new(),
        mode: Mode::Enforce,
        controls: Arc::from(Vec::new()),
        policy: Arc::clone(&policy.label),
        audit_form: AuditForm::default(),
    })
}

#[cfg(test)]
mod tests;
