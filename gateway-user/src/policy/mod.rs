//! Decisions: what may pass.
//!
//! This is the decision point every statement goes through before it goes
//! upstream. The built-in rule set is the floor any policy keeps: what does
//! not parse is denied, the fast-path FunctionCall is denied, replication
//! connections are denied.

mod load;

use serde::Serialize;

use crate::sql::Analysis;

pub use load::{load_policy_path, PolicyError, PolicySource};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Deny,
}

/// The verdict on one statement, with the rule that gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub rule: &'static str,
    /// Why, in words fit for the client; never holds a protected value.
    pub reason: String,
}

impl Decision {
    fn allow(rule: &'static str) -> Self {
        Self {
            action: Action::Allow,
            rule,
            reason: String::new(),
        }
    }

    fn deny(rule: &'static str, reason: impl Into<String>) -> Self {
        Self {
            action: Action::Deny,
            rule,
            reason: reason.into(),
        }
    }

    pub fn is_allowed(&self) -> bool {
        self.action == Action::Allow
    }

    /// The message of the ErrorResponse a denied client receives.
    pub fn client_message(&self) -> String {
        format!("agentgate: denied by rule {}: {}", self.rule, self.reason)
    }
}

pub const RULE_UNPARSEABLE: &str = "builtin.unparseable";
pub const RULE_FUNCTION_CALL: &str = "builtin.function-call";
pub const RULE_REPLICATION: &str = "builtin.replication";
pub const RULE_AUDIT_UNAVAILABLE: &str = "builtin.audit-unavailable";
pub const RULE_UNKNOWN_STATEMENT: &str = "builtin.unknown-prepared-statement";
pub const RULE_ALLOW_PARSED: &str = "builtin.allow-parsed";

/// The rule set in force.
#[derive(Debug, Default)]
pub struct Policy {}

impl Policy {
    pub fn builtin() -> Self {
        Self {}
    }

    /// Judges one query string (a simple Query or a Parse). One denied
    /// statement denies the whole string.
    pub fn decide(&self, analysis: &Analysis) -> Decision {
        if analysis.parse_error.is_some() {
            return Decision::deny(
                RULE_UNPARSEABLE,
                "the statement could not be parsed, and what the gateway cannot read it does not pass",
            );
        }
        Decision::allow(RULE_ALLOW_PARSED)
    }

    pub fn decide_function_call(&self) -> Decision {
        Decision::deny(
            RULE_FUNCTION_CALL,
            "the fast-path FunctionCall message is not allowed; call the function in a query",
        )
    }

    pub fn decide_replication(&self) -> Decision {
        Decision::deny(RULE_REPLICATION, "replication connections are not allowed")
    }

    pub fn deny_unknown_statement(&self, what: &str) -> Decision {
        Decision::deny(
            RULE_UNKNOWN_STATEMENT,
            format!("{what} was not prepared through the gateway"),
        )
    }

    pub fn deny_audit_unavailable(&self) -> Decision {
        Decision::deny(
            RULE_AUDIT_UNAVAILABLE,
            "the audit trail cannot be written, so no statement may run",
        )
    }
}
