//! From policy files to a checked, ready-to-use policy. Every problem is
//! collected (not just the first) and located by file and line.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::glob::Pattern;
use super::masking::{compile_mask_rule, MaskRule, MaskSet};
use super::model::{IdentityDef, Mode, PolicyFile, RuleAction, RuleDef};
use crate::sql::{Access, Feature};

/// Statement kinds a rule may name (see `sql::statement_kind`).
pub const KINDS: &[&str] = &[
    "select",
    "select_into",
    "insert",
    "update",
    "delete",
    "merge",
    "copy_in",
    "copy_out",
    "transaction",
    "set",
    "show",
    "explain",
    "prepare",
    "execute",
    "deallocate",
    "cursor",
    "listen",
    "notify",
    "call",
    "do",
    "lock",
    "maintenance",
    "alter_system",
    "load",
    "privilege",
    "session",
    "ddl",
    "utility",
];

/// One problem found in a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{}: {}", self.file.display(), l, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// An IPv4 or IPv6 block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Self> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.parse().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct IdentityMatcher {
    pub agent: Option<Vec<Pattern>>,
    pub client_addr: Option<Vec<Cidr>>,
    pub uid: Option<Vec<u32>>,
    pub gid: Option<Vec<u32>>,
    pub comm: Option<Vec<Pattern>>,
    pub cgroup: Option<Vec<Pattern>>,
    pub startup_user: Option<Vec<Pattern>>,
    pub database: Option<Vec<Pattern>>,
}

#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub matcher: IdentityMatcher,
}

#[derive(Debug, Clone)]
pub enum Target {
    Kinds(Vec<Pattern>),
    Objects {
        patterns: Vec<Pattern>,
        access: Option<Vec<Access>>,
    },
    Functions(Vec<Pattern>),
    Features(Vec<Feature>),
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub name: Arc<str>,
    /// Indices into `Policy::identities`; `None` means every session.
    pub identities: Option<Vec<usize>>,
    pub action: RuleAction,
    pub mode: Mode,
    pub controls: Arc<[String]>,
    pub reason: Option<String>,
    pub target: Target,
}

/// A checked policy, ready for decisions.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Name and content digest, as the audit records it.
    pub label: Arc<str>,
    pub identities: Vec<Identity>,
    pub rules: Vec<Rule>,
    pub masking: Vec<Arc<MaskRule>>,
}

impl Policy {
    /// The masking rules for a session with these identities.
    pub fn mask_set(&self, identities: &[usize]) -> MaskSet {
        MaskSet::new(
            self.masking
                .iter()
                .filter(|r| {
                    r.identities
                        .as_ref()
                        .is_none_or(|ids| ids.iter().any(|i| identities.contains(i)))
                })
                .cloned()
                .collect(),
        )
    }
}

/// Where a name sits in a file, for messages.
fn line_of(text: &str, needle: &str) -> Option<usize> {
    text.lines()
        .position(|l| l.contains("name:") && l.contains(needle))
        .map(|i| i + 1)
}

struct Checker<'a> {
    file: &'a Path,
    text: &'a str,
    problems: &'a mut Vec<Problem>,
}

impl Checker<'_> {
    fn problem(&mut self, near: &str, message: String) {
        self.problems.push(Problem {
            file: self.file.to_owned(),
            line: line_of(self.text, near),
            message,
        });
    }
}

fn patterns(list: &[String]) -> Vec<Pattern> {
    list.iter().map(|s| Pattern::new(s)).collect()
}

fn lower_patterns(list: &[String]) -> Vec<Pattern> {
    list.iter()
        .map(|s| Pattern::new(&s.to_ascii_lowercase()))
        .collect()
}

fn compile_identity(def: &IdentityDef, c: &mut Checker<'_>) -> Identity {
    let m = &def.matcher;
    let mut cidrs = None;
    if let Some(list) = &m.client_addr {
        let mut out = Vec::new();
        for s in list.to_vec() {
            match Cidr::parse(&s) {
                Some(cidr) => out.push(cidr),
                None => c.problem(
                    &def.name,
                    format!(
                        "identity {:?}: client_addr {s:?} is not an address or CIDR block",
                        def.name
                    ),
                ),
            }
        }
        cidrs = Some(out);
    }
    Identity {
        name: def.name.clone(),
        matcher: IdentityMatcher {
            agent: m.agent.as_ref().map(|v| patterns(&v.to_vec())),
            client_addr: cidrs,
            uid: m.uid.as_ref().map(|v| v.to_vec()),
            gid: m.gid.as_ref().map(|v| v.to_vec()),
            comm: m.comm.as_ref().map(|v| patterns(&v.to_vec())),
            cgroup: m.cgroup.as_ref().map(|v| patterns(&v.to_vec())),
            startup_user: m.startup_user.as_ref().map(|v| patterns(&v.to_vec())),
            database: m.database.as_ref().map(|v| patterns(&v.to_vec())),
        },
    }
}

fn compile_rule(
    def: &RuleDef,
    default_mode: Mode,
    identities: &[Identity],
    c: &mut Checker<'_>,
) -> Option<Rule> {
    let name = &def.name;
    let given = [
        def.kinds.is_some(),
        def.objects.is_some(),
        def.functions.is_some(),
        def.features.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if given != 1 {
        c.problem(
            name,
            format!("rule {name:?}: give exactly one of kinds, objects, functions, features (found {given})"),
        );
        return None;
    }
    if def.access.is_some() && def.objects.is_none() {
        c.problem(
            name,
            format!("rule {name:?}: access applies only to objects"),
        );
    }
    let ids = match &def.identities {
        None => None,
        Some(list) => {
            let mut out = Vec::new();
            for id in list {
                match identities.iter().position(|i| &i.name == id) {
                    Some(i) => out.push(i),
                    None => c.problem(name, format!("rule {name:?}: unknown identity {id:?}")),
                }
            }
            Some(out)
        }
    };
    let target = if let Some(kinds) = &def.kinds {
        for k in kinds {
            if k != "*" && !KINDS.contains(&k.as_str()) {
                c.problem(
                    name,
                    format!(
                        "rule {name:?}: unknown statement kind {k:?} (known: {})",
                        KINDS.join(", ")
                    ),
                );
            }
        }
        Target::Kinds(patterns(kinds))
    } else if let Some(objects) = &def.objects {
        let access = def.access.as_ref().map(|list| {
            list.iter()
                .filter_map(|a| {
                    let found = Access::ALL.into_iter().find(|x| x.name() == a);
                    if found.is_none() {
                        c.problem(name, format!("rule {name:?}: unknown access {a:?}"));
                    }
                    found
                })
                .collect()
        });
        Target::Objects {
            patterns: patterns(objects),
            access,
        }
    } else if let Some(functions) = &def.functions {
        Target::Functions(lower_patterns(functions))
    } else {
        let list = def.features.as_deref().unwrap_or_default();
        let mut out = Vec::new();
        for f in list {
            match Feature::ALL.into_iter().find(|x| x.name() == f) {
                Some(x) => out.push(x),
                None => c.problem(
                    name,
                    format!(
                        "rule {name:?}: unknown feature {f:?} (known: {})",
                        Feature::ALL.map(Feature::name).join(", ")
                    ),
                ),
            }
        }
        Target::Features(out)
    };
    Some(Rule {
        name: Arc::from(name.as_str()),
        identities: ids,
        action: def.action,
        mode: def.mode.unwrap_or(default_mode),
        controls: def.controls.clone().into(),
        reason: def.reason.clone(),
        target,
    })
}

/// Checks and compiles the given files (path and text). On error returns
/// every problem found.
pub fn compile(sources: &[(PathBuf, String)]) -> Result<Policy, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut files = Vec::new();
    for (path, text) in sources {
        match serde_yaml_ng::from_str::<PolicyFile>(text) {
            Ok(f) => files.push((path, text, f)),
            Err(e) => problems.push(Problem {
                file: path.clone(),
                line: e.location().map(|l| l.line()),
                message: e.to_string(),
            }),
        }
    }
    let mut identities: Vec<Identity> = Vec::new();
    for (path, text, f) in &files {
        let mut c = Checker {
            file: path,
            text,
            problems: &mut problems,
        };
        for def in &f.identities {
            if identities.iter().any(|i| i.name == def.name) {
                c.problem(
                    &def.name,
                    format!("identity {:?} is defined twice", def.name),
                );
            }
            identities.push(compile_identity(def, &mut c));
        }
    }
    let mut rules: Vec<Rule> = Vec::new();
    for (path, text, f) in &files {
        let mut c = Checker {
            file: path,
            text,
            problems: &mut problems,
        };
        for def in &f.rules {
            if rules.iter().any(|r| *r.name == *def.name) {
                c.problem(&def.name, format!("rule {:?} is defined twice", def.name));
            }
            if let Some(r) = compile_rule(def, f.mode.unwrap_or_default(), &identities, &mut c) {
                rules.push(r);
            }
        }
    }
    let mut masking: Vec<Arc<MaskRule>> = Vec::new();
    for (path, text, f) in &files {
        let mut c = Checker {
            file: path,
            text,
            problems: &mut problems,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        for def in &f.masking {
            if masking.iter().any(|r| *r.name == *def.name)
                || rules.iter().any(|r| *r.name == *def.name)
            {
                c.problem(&def.name, format!("rule {:?} is defined twice", def.name));
            }
            let mut found = Vec::new();
            let rule = compile_mask_rule(def, &identities, dir, &mut |m| found.push(m));
            for m in found {
                c.problem(&def.name, m);
            }
            if let Some(r) = rule {
                masking.push(Arc::new(r));
            }
        }
    }
    if sources.is_empty() {
        problems.push(Problem {
            file: PathBuf::from("."),
            line: None,
            message: "no policy file".into(),
        });
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut digest = Sha256::new();
    for (_, text) in sources {
        digest.update(text.as_bytes());
    }
    let hex: String = digest
        .finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    let name = match files.as_slice() {
        [(path, _, f)] => f.policy.clone().unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        }),
        _ => files
            .iter()
            .map(|(p, _, f)| {
                f.policy.clone().unwrap_or_else(|| {
                    p.file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default()
                })
            })
            .collect::<Vec<_>>()
            .join("+"),
    };
    Ok(Policy {
        label: Arc::from(format!("{name}@sha256:{hex}")),
        identities,
        rules,
        masking,
    })
}

/// The action a rule gives, by severity.
pub fn severity(a: RuleAction) -> u8 {
    match a {
        RuleAction::Allow => 0,
        RuleAction::Approve => 1,
        RuleAction::Deny => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<Policy, Vec<Problem>> {
        compile(&[(PathBuf::from("p.yaml"), text.to_owned())])
    }

    #[test]
    fn problems_name_the_line() {
        let text = "rules:\n  - name: ok\n    action: allow\n    kinds: [select]\n  - name: bad\n    action: deny\n    kinds: [selct]\n";
        let err = check(text).unwrap_err();
        assert_eq!(err.len(), 1);
        assert_eq!(err[0].line, Some(5));
        assert!(err[0].message.contains("selct"));
        let err =
            check("rules:\n  - name: x\n    action: alow\n    kinds: [select]\n").unwrap_err();
        assert_eq!(err[0].line, Some(3), "{}", err[0]);
    }

    #[test]
    fn every_problem_is_listed() {
        let text = "identities:\n  - name: a\n    match: {client_addr: nonsense}\nrules:\n  - name: r1\n    action: allow\n    identities: [b]\n    kinds: [select]\n  - name: r2\n    action: deny\n    kinds: [select]\n    functions: [x]\n";
        let err = check(text).unwrap_err();
        assert_eq!(err.len(), 3, "{err:?}");
    }

    #[test]
    fn cidr() {
        let c = Cidr::parse("127.0.0.0/8").unwrap();
        assert!(c.contains("127.1.2.3".parse().unwrap()));
        assert!(c.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!c.contains("10.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_none());
    }
}
