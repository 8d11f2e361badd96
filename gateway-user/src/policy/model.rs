//! The policy file format, as written by users (see policies/README.md).

use serde::Deserialize;

/// One YAML policy document.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// A name for the audit; defaults to the file name.
    pub policy: Option<String>,
    /// `enforce` (default) or `observe`, for every rule that does not say.
    pub mode: Option<Mode>,
    #[serde(default)]
    pub identities: Vec<IdentityDef>,
    #[serde(default)]
    pub rules: Vec<RuleDef>,
    /// What the identities may not see (see policies/README.md, "Masking").
    #[serde(default)]
    pub masking: Vec<MaskRuleDef>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Enforce,
    Observe,
}

/// One value or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            OneOrMany::One(v) => vec![v.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// How an agent is recognised. Every key given must hold; a list means any
/// of its values.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityDef {
    pub name: String,
    #[serde(default, rename = "match")]
    pub matcher: IdentityMatch,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityMatch {
    /// The agent name verified by `--client-auth password` (a fact).
    pub agent: Option<OneOrMany<String>>,
    /// The client's address, as CIDR blocks (a fact on loopback and in a pod).
    pub client_addr: Option<OneOrMany<String>>,
    /// Kernel facts from interception.
    pub uid: Option<OneOrMany<u32>>,
    pub gid: Option<OneOrMany<u32>>,
    pub comm: Option<OneOrMany<String>>,
    pub cgroup: Option<OneOrMany<String>>,
    /// The startup `user` (a claim: anyone can send any name).
    pub startup_user: Option<OneOrMany<String>>,
    /// The startup `database` (a claim).
    pub database: Option<OneOrMany<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    Allow,
    Deny,
    /// Needs a human's approval; denied until the approval workflow exists.
    Approve,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleDef {
    pub name: String,
    /// Identities the rule is for; all sessions when absent.
    pub identities: Option<Vec<String>>,
    pub action: RuleAction,
    pub mode: Option<Mode>,
    /// NIST SP 800-53 controls the rule implements, e.g. AC-3, AC-6(9).
    #[serde(default)]
    pub controls: Vec<String>,
    /// One sentence for the client and the audit when the rule denies.
    pub reason: Option<String>,
    /// What the rule is about: exactly one of these.
    pub kinds: Option<Vec<String>>,
    pub objects: Option<Vec<String>>,
    pub functions: Option<Vec<String>>,
    pub features: Option<Vec<String>>,
    /// With `objects`: which kinds of access (read, insert, update, delete,
    /// merge, copy_in, copy_out, ddl); all when absent.
    pub access: Option<Vec<String>>,
}

/// A masking rule: which values to hide from which identities, and how.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskRuleDef {
    pub name: String,
    /// Identities the rule is for; all sessions when absent.
    pub identities: Option<Vec<String>>,
    /// Protected columns as `schema.table.column`, globs allowed.
    pub columns: Option<Vec<String>>,
    /// Protected columns by column name alone, globs allowed.
    pub column_names: Option<Vec<String>>,
    /// Detectors applied to every value: email, ssn, card, phone, iban,
    /// jwt, api_key, private_key.
    pub detect: Option<Vec<String>>,
    /// redact (default), null, partial, hash, format.
    pub function: Option<String>,
    /// For `partial`: how many trailing characters stay (default 4).
    pub keep: Option<usize>,
    /// For `hash`: a file holding the HMAC key (at least 16 bytes), relative
    /// to the policy file.
    pub secret_file: Option<String>,
    /// What happens to a computed value that a protected column flows
    /// into: `mask` (default) or `deny` the statement.
    pub computed: Option<String>,
    #[serde(default)]
    pub controls: Vec<String>,
}
