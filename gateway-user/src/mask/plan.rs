//! Which result columns to mask, and with which rule: from the server's
//! provenance (table OID and attribute number) for plain columns, through
//! the catalog to parents and view definitions, and from the statement's
//! lineage for computed ones.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::catalog::State;
use super::function::TypeClass;
use crate::policy::masking::{Computed, MaskRule, MaskSet};
use crate::sql::lineage::{Lineage, RelName, Source};
use crate::wire::rows::Field;

/// How deep views and parents are followed (cycles cannot loop forever).
const MAX_DEPTH: usize = 16;

/// What the rows of the current statement are made of, for computed columns.
#[derive(Debug, Clone)]
pub enum RowSource {
    Known(Arc<Lineage>),
    /// SHOW, EXPLAIN and the like: no table data.
    NoData,
    /// A cursor or prepared statement the gateway did not see defined:
    /// computed columns are masked whenever any column rule applies.
    Unknown,
}

#[derive(Debug, Clone)]
pub enum Action {
    Pass,
    Mask(Arc<MaskRule>),
    /// Run the detectors over the value.
    Scan,
}

#[derive(Debug, Clone)]
pub struct ColumnPlan {
    pub action: Action,
    pub class: TypeClass,
    pub binary: bool,
    /// How the audit names the column: `schema.table.column` when the
    /// server gave its provenance, the output name otherwise.
    pub label: String,
}

/// The plan for one result: one entry per column.
#[derive(Debug, Clone)]
pub struct RowPlan {
    columns: Vec<ColumnPlan>,
    /// Every column passes: rows go through undecoded. Worked out once,
    /// since it is asked for every row.
    noop: bool,
}

impl RowPlan {
    pub fn new(columns: Vec<ColumnPlan>) -> Self {
        let noop = columns.iter().all(|c| matches!(c.action, Action::Pass));
        Self { columns, noop }
    }

    pub fn columns(&self) -> &[ColumnPlan] {
        &self.columns
    }

    /// Nothing to do: rows pass undecoded.
    pub fn is_noop(&self) -> bool {
        self.noop
    }
}

/// Resolves protection for sources and catalog columns.
pub struct Resolver<'a> {
    pub set: &'a MaskSet,
    pub catalog: Option<&'a State>,
}

impl Resolver<'_> {
    /// The rule protecting column `attnum` of relation `oid` (0: whole row).
    pub fn column(&self, oid: u32, attnum: i16, depth: usize) -> Option<Arc<MaskRule>> {
        let Some(cat) = self.catalog else {
            // No catalog (it could not be reached): fail closed.
            return self.set.first_rule().cloned();
        };
        let Some(rel) = cat.by_oid.get(&oid) else {
            return self.set.first_rule().cloned();
        };
        if depth > MAX_DEPTH {
            return self.set.first_rule().cloned();
        }
        let names: Vec<(i16, &str)> = if attnum <= 0 {
            rel.columns.iter().map(|(n, c)| (*n, c.as_str())).collect()
        } else {
            match rel.column(attnum) {
                Some(c) => vec![(attnum, c)],
                None => return self.set.first_rule().cloned(),
            }
        };
        for (num, col) in names {
            if let Some(r) = self.set.column(Some(&rel.schema), &rel.name, col) {
                return Some(Arc::clone(r));
            }
            // A partition or child is covered by its parent's rules; its
            // column of the same name is the parent's column.
            for parent in &rel.parents {
                if let Some(p) = cat.by_oid.get(parent) {
                    if let Some(pnum) = p.columns.iter().find(|(_, c)| c == col).map(|(n, _)| *n) {
                        if let Some(r) = self.column(*parent, pnum, depth + 1) {
                            return Some(r);
                        }
                    }
                } else if let Some(r) = self.set.first_rule() {
                    return Some(Arc::clone(r));
                }
            }
            if let Some(view) = &rel.view {
                let sources = match &view.columns {
                    Some(cols) => usize::try_from(num - 1)
                        .ok()
                        .and_then(|i| cols.get(i))
                        .unwrap_or(&view.all),
                    None => &view.all,
                };
                if let Some(r) = self.sources(sources, depth + 1) {
                    return Some(r);
                }
            }
        }
        None
    }

    /// The rule protecting any of these sources.
    pub fn sources(&self, sources: &BTreeSet<Source>, depth: usize) -> Option<Arc<MaskRule>> {
        sources.iter().find_map(|s| self.source(s, depth))
    }

    fn source(&self, s: &Source, depth: usize) -> Option<Arc<MaskRule>> {
        let rel: &RelName = s.relation();
        let direct = match s {
            Source::Column(r, c) => self.set.column(r.schema.as_deref(), &r.name, c),
            Source::Row(r) => self.set.any_in_table(r.schema.as_deref(), &r.name),
        };
        if let Some(r) = direct {
            return Some(Arc::clone(r));
        }
        let cat = self.catalog?;
        for found in cat.named(rel) {
            let attnum = match s {
                Source::Row(_) => 0,
                Source::Column(_, c) => match found.columns.iter().find(|(_, n)| n == c) {
                    Some((n, _)) => *n,
                    None => continue,
                },
            };
            if let Some(r) = self.column(found.oid, attnum, depth + 1) {
                return Some(r);
            }
        }
        None
    }

    /// A rule with `computed: deny` that a computed output of this lineage
    /// would trip: the statement is refused before it runs.
    pub fn computed_denial(&self, l: &Lineage) -> Option<Arc<MaskRule>> {
        l.computed
            .iter()
            .filter_map(|s| self.source(s, 0))
            .find(|r| r.computed == Computed::Deny)
    }

    /// The plan for a result with these fields.
    pub fn plan(&self, fields: &[Field], rows: &RowSource) -> RowPlan {
        let detect = !self.set.detectors().is_empty();
        let computed_all = match rows {
            RowSource::Known(l) => self.sources(&l.all, 0),
            RowSource::NoData => None,
            RowSource::Unknown => self.set.first_rule().cloned(),
        };
        let positional = match rows {
            RowSource::Known(l) => l.columns.as_ref().filter(|c| c.len() == fields.len()),
            _ => None,
        };
        let columns = fields
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let class = TypeClass::of(f.type_oid);
                let rule = if f.table_oid != 0 {
                    self.column(f.table_oid, f.attnum, 0)
                } else {
                    match positional {
                        Some(cols) => self.sources(&cols[i], 0),
                        None => computed_all.clone(),
                    }
                };
                let action = match rule {
                    Some(r) => Action::Mask(r),
                    None if detect && class.scannable() => Action::Scan,
                    None => Action::Pass,
                };
                // Only columns that may be masked are ever counted.
                let label = if matches!(action, Action::Pass) {
                    String::new()
                } else if f.table_oid != 0 {
                    self.catalog
                        .and_then(|c| c.by_oid.get(&f.table_oid))
                        .and_then(|r| r.column(f.attnum).map(|c| format!("{}.{c}", r.qualified())))
                        .unwrap_or_else(|| f.name.clone())
                } else {
                    f.name.clone()
                };
                ColumnPlan {
                    action,
                    class,
                    binary: f.format == 1,
                    label,
                }
            })
            .collect();
        RowPlan::new(columns)
    }
}
