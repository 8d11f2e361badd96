//! Masking rules: compiled from `masking:` entries of policy files, and
//! looked up per column for a session's identities.

use std::path::Path;
use std::sync::Arc;

use super::compile::Identity;
use super::glob::Pattern;
use super::model::MaskRuleDef;
use crate::mask::{Detector, MaskFn};

/// A `schema.table.column` pattern, split so that a column known only by
/// table and column name (no schema) can still be judged.
#[derive(Debug, Clone)]
pub struct ColumnPattern {
    schema: Pattern,
    table: Pattern,
    column: Pattern,
}

impl ColumnPattern {
    fn parse(text: &str) -> Option<Self> {
        let parts: Vec<&str> = text.split('.').collect();
        let (s, t, c) = match parts.as_slice() {
            [t, c] => ("*", *t, *c),
            [s, t, c] => (*s, *t, *c),
            _ => return None,
        };
        if [s, t, c].iter().any(|p| p.is_empty()) {
            return None;
        }
        Some(Self {
            schema: Pattern::new(s),
            table: Pattern::new(t),
            column: Pattern::new(c),
        })
    }

    fn specificity(&self) -> u64 {
        u64::from(self.schema.specificity)
            + u64::from(self.table.specificity)
            + u64::from(self.column.specificity)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Computed {
    Mask,
    Deny,
}

#[derive(Debug)]
pub struct MaskRule {
    pub name: Arc<str>,
    pub identities: Option<Vec<usize>>,
    pub columns: Vec<ColumnPattern>,
    pub column_names: Vec<Pattern>,
    pub detectors: Vec<Detector>,
    pub function: MaskFn,
    pub computed: Computed,
    pub controls: Arc<[String]>,
}

impl MaskRule {
    /// How specifically the rule names this column, if it does.
    fn names(&self, schema: Option<&str>, table: &str, column: &str) -> Option<u64> {
        let by_path = self
            .columns
            .iter()
            .filter(|p| {
                schema.is_none_or(|s| p.schema.matches(s))
                    && p.table.matches(table)
                    && p.column.matches(column)
            })
            .map(ColumnPattern::specificity)
            .max();
        let by_name = self
            .column_names
            .iter()
            .filter(|p| p.matches(column))
            .map(|p| u64::from(p.specificity))
            .max();
        by_path.max(by_name)
    }
}

/// The masking rules that apply to one session.
#[derive(Debug, Default)]
pub struct MaskSet {
    rules: Vec<Arc<MaskRule>>,
    detectors: Vec<(Detector, Arc<MaskRule>)>,
    kinds: Vec<Detector>,
}

impl MaskSet {
    pub fn new(rules: Vec<Arc<MaskRule>>) -> Self {
        let mut detectors: Vec<(Detector, Arc<MaskRule>)> = Vec::new();
        for r in &rules {
            for d in &r.detectors {
                if !detectors.iter().any(|(x, _)| x == d) {
                    detectors.push((*d, Arc::clone(r)));
                }
            }
        }
        detectors.sort_by_key(|(d, _)| *d);
        let rules = rules
            .into_iter()
            .filter(|r| !r.columns.is_empty() || !r.column_names.is_empty())
            .collect();
        let kinds = detectors.iter().map(|(d, _)| *d).collect();
        Self {
            rules,
            detectors,
            kinds,
        }
    }

    /// Nothing to mask and nothing to detect: rows pass untouched.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.detectors.is_empty()
    }

    pub fn has_computed_deny(&self) -> bool {
        self.rules.iter().any(|r| r.computed == Computed::Deny)
    }

    pub fn has_column_rules(&self) -> bool {
        !self.rules.is_empty()
    }

    /// The rule protecting a column; `schema` is `None` when only the table
    /// name is known (then any schema counts, to err on the safe side).
    pub fn column(
        &self,
        schema: Option<&str>,
        table: &str,
        column: &str,
    ) -> Option<&Arc<MaskRule>> {
        let mut best: Option<(u64, &Arc<MaskRule>)> = None;
        for r in &self.rules {
            if let Some(s) = r.names(schema, table, column) {
                if best.is_none_or(|(b, _)| s > b) {
                    best = Some((s, r));
                }
            }
        }
        best.map(|(_, r)| r)
    }

    /// The rules that protect some column of a table (for whole-row reads).
    pub fn any_in_table(&self, schema: Option<&str>, table: &str) -> Option<&Arc<MaskRule>> {
        self.rules.iter().find(|r| {
            !r.column_names.is_empty()
                || r.columns
                    .iter()
                    .any(|p| schema.is_none_or(|s| p.schema.matches(s)) && p.table.matches(table))
        })
    }

    pub fn detectors(&self) -> &[(Detector, Arc<MaskRule>)] {
        &self.detectors
    }

    pub fn detector_kinds(&self) -> &[Detector] {
        &self.kinds
    }

    pub fn first_rule(&self) -> Option<&Arc<MaskRule>> {
        self.rules.first()
    }
}

pub fn compile_mask_rule(
    def: &MaskRuleDef,
    identities: &[Identity],
    dir: &Path,
    problem: &mut dyn FnMut(String),
) -> Option<MaskRule> {
    let name = &def.name;
    if def.columns.is_none() && def.column_names.is_none() && def.detect.is_none() {
        problem(format!(
            "masking rule {name:?}: give columns, column_names or detect"
        ));
        return None;
    }
    let ids = def.identities.as_ref().map(|list| {
        list.iter()
            .filter_map(|id| {
                let found = identities.iter().position(|i| &i.name == id);
                if found.is_none() {
                    problem(format!("masking rule {name:?}: unknown identity {id:?}"));
                }
                found
            })
            .collect()
    });
    let mut columns = Vec::new();
    for c in def.columns.iter().flatten() {
        match ColumnPattern::parse(c) {
            Some(p) => columns.push(p),
            None => problem(format!(
                "masking rule {name:?}: column {c:?} is not schema.table.column or table.column"
            )),
        }
    }
    let mut detectors = Vec::new();
    for d in def.detect.iter().flatten() {
        match Detector::from_name(d) {
            Some(x) => detectors.push(x),
            None => problem(format!(
                "masking rule {name:?}: unknown detector {d:?} (known: {})",
                Detector::ALL.map(Detector::name).join(", ")
            )),
        }
    }
    let function = match def.function.as_deref().unwrap_or("redact") {
        "redact" => MaskFn::Redact,
        "null" => MaskFn::Null,
        "format" => MaskFn::Format,
        "partial" => MaskFn::Partial {
            keep: def.keep.unwrap_or(4),
        },
        "hash" => match &def.secret_file {
            None => {
                problem(format!("masking rule {name:?}: hash needs secret_file"));
                return None;
            }
            Some(f) => match std::fs::read(dir.join(f)) {
                Ok(key) if key.trim_ascii().len() >= 16 => MaskFn::Hash {
                    key: Arc::from(key.trim_ascii()),
                },
                Ok(_) => {
                    problem(format!(
                        "masking rule {name:?}: the key in {f:?} is shorter than 16 bytes"
                    ));
                    return None;
                }
                Err(e) => {
                    problem(format!("masking rule {name:?}: cannot read {f:?}: {e}"));
                    return None;
                }
            },
        },
        other => {
            problem(format!(
                "masking rule {name:?}: unknown function {other:?} (known: redact, null, partial, hash, format)"
            ));
            return None;
        }
    };
    if def.keep.is_some() && !matches!(function, MaskFn::Partial { .. }) {
        problem(format!(
            "masking rule {name:?}: keep applies only to partial"
        ));
    }
    if def.keep == Some(0) {
        problem(format!(
            "masking rule {name:?}: keep must be at least 1 (use redact to keep nothing)"
        ));
    }
    let computed = match def.computed.as_deref().unwrap_or("mask") {
        "mask" => Computed::Mask,
        "deny" => Computed::Deny,
        other => {
            problem(format!(
                "masking rule {name:?}: computed must be mask or deny, not {other:?}"
            ));
            Computed::Mask
        }
    };
    Some(MaskRule {
        name: Arc::from(name.as_str()),
        identities: ids,
        columns,
        column_names: def
            .column_names
            .iter()
            .flatten()
            .map(|s| Pattern::new(s))
            .collect(),
        detectors,
        function,
        computed,
        controls: def.controls.clone().into(),
    })
}
