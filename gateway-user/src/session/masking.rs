//! The masking path of a session's backend relay: builds a plan when a
//! result starts, rewrites its rows, COPY data and messages, and counts
//! what it masked for the audit.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::mask::catalog::Catalog;
use crate::mask::function::TypeClass;
use crate::mask::plan::{Action, ColumnPlan, Resolver, RowPlan, RowSource};
use crate::mask::rewrite::{self, CopyFormat, CopyMasker, Counts};
use crate::policy::masking::MaskSet;
use crate::sql::lineage::RelName;
use crate::wire::rows::{self, Field};
use crate::wire::{backend, DecodeError, Frame, FrameRef};

use super::tracker::{Head, Tracker};

/// What a result needs before its plan can be made.
pub struct Request {
    fields: Option<Arc<Vec<Field>>>,
    rows: RowSource,
    copy: Option<CopyRequest>,
}

struct CopyRequest {
    format: CopyFormat,
    /// `COPY table TO`: the table's columns come from the catalog.
    table: Option<RelName>,
}

/// What a row plan was made from: the same key gives the same plan.
#[derive(Clone, PartialEq, Eq, Hash)]
struct PlanKey {
    fields: Arc<Vec<Field>>,
    /// The lineage's address (kept alive by the cached entry's key holder).
    rows: usize,
    set: usize,
    generation: u64,
}

/// A plan with the lineage and mask set its key points at.
type CachedPlan = (Arc<RowPlan>, RowSource, Arc<MaskSet>);

/// Plans of recent results: a driver sends the same statements over and
/// over, and their plans only change with the catalog or the policy.
const PLAN_CACHE_ENTRIES: usize = 256;

#[derive(Default)]
pub struct ResultMasker {
    pub catalog: Option<Arc<Catalog>>,
    plan: Option<Arc<RowPlan>>,
    copy: Option<CopyMasker>,
    counts: Counts,
    /// The last plan looked up, checked before the map: a driver usually
    /// runs one statement shape many times in a row (and the row shape is
    /// then the same `Arc`, so the comparison is a pointer check). Holds
    /// what its key points at alive, like the map's entries.
    last: Option<(PlanKey, CachedPlan)>,
    /// Each entry keeps the lineage and mask set its key points at alive.
    plans: std::collections::HashMap<PlanKey, CachedPlan, foldhash::fast::RandomState>,
}

impl ResultMasker {
    pub fn new(catalog: Option<Arc<Catalog>>) -> Self {
        Self {
            catalog,
            ..Self::default()
        }
    }

    /// Whether this frame starts a result that has no plan yet.
    pub fn needs_plan(&self, tag: u8) -> bool {
        match tag {
            rows::DATA_ROW => self.plan.is_none(),
            rows::COPY_OUT_RESPONSE => true,
            _ => false,
        }
    }

    /// What the plan for the result starting with `frame` needs to know.
    pub fn request(tracker: &Tracker, frame: FrameRef<'_>) -> Request {
        let (rows, facts) = match tracker.head() {
            Head::Statement(s) => (
                s.rows.clone(),
                s.statement
                    .analysis
                    .statements
                    .get(s.statement.index)
                    .map(|f| &f.output),
            ),
            _ => (RowSource::Unknown, None),
        };
        if frame.tag() == rows::COPY_OUT_RESPONSE {
            let overall = rows::decode_copy_response(frame.tag(), frame.body())
                .map(|(o, _)| o)
                .unwrap_or(0);
            let opts = facts.and_then(|o| o.copy_options.as_ref());
            let format = match (overall, opts.map(|o| o.format.as_str())) {
                (1, _) | (_, Some("binary")) => CopyFormat::Binary,
                (_, Some("csv")) => CopyFormat::Csv {
                    delimiter: opts.and_then(|o| o.delimiter).unwrap_or(b','),
                    quote: opts.and_then(|o| o.quote).unwrap_or(b'"'),
                },
                _ => CopyFormat::Text {
                    delimiter: opts.and_then(|o| o.delimiter).unwrap_or(b'\t'),
                },
            };
            return Request {
                fields: None,
                rows,
                copy: Some(CopyRequest {
                    format,
                    table: facts.and_then(|o| o.copy_table.clone()),
                }),
            };
        }
        Request {
            fields: tracker.current_fields(),
            rows,
            copy: None,
        }
    }

    /// Makes the plan (or reuses one made from the same row shape, lineage,
    /// rules and catalog), filling the catalog with what it needs first.
    pub async fn prepare(&mut self, req: Request, set: &Arc<MaskSet>) {
        let key = self.key(&req, set);
        if key.as_ref().is_some_and(|k| self.cached(k)) {
            return;
        }
        let rows = req.rows.clone();
        self.make_plan(req, set).await;
        if let (Some(mut k), Some(plan)) = (key, &self.plan) {
            if self.plans.len() >= PLAN_CACHE_ENTRIES {
                self.plans.clear();
            }
            // Filling the catalog may have moved its generation: the plan
            // belongs to the state after the lookup.
            k.generation = self.catalog.as_ref().map_or(0, |c| c.generation());
            let cached = (Arc::clone(plan), rows, Arc::clone(set));
            self.last = Some((k.clone(), cached.clone()));
            self.plans.insert(k, cached);
        }
    }

    /// Takes the plan made earlier for the same request, when there is one:
    /// true when no `prepare` (and no catalog lookup) is needed.
    pub fn reuse(&mut self, req: &Request, set: &Arc<MaskSet>) -> bool {
        self.key(req, set).is_some_and(|k| self.cached(&k))
    }

    /// Row results have a cache key; COPY plans are made each time.
    fn key(&self, req: &Request, set: &Arc<MaskSet>) -> Option<PlanKey> {
        match (&req.fields, &req.copy) {
            (Some(fields), None) => Some(PlanKey {
                fields: Arc::clone(fields),
                rows: match &req.rows {
                    RowSource::Known(l) => Arc::as_ptr(l) as usize,
                    RowSource::NoData => 1,
                    RowSource::Unknown => 2,
                },
                set: Arc::as_ptr(set) as usize,
                generation: self.catalog.as_ref().map_or(0, |c| c.generation()),
            }),
            _ => None,
        }
    }

    fn cached(&mut self, k: &PlanKey) -> bool {
        if let Some((last, (plan, _, _))) = &self.last {
            if last == k {
                self.plan = Some(Arc::clone(plan));
                return true;
            }
        }
        if let Some(cached) = self.plans.get(k) {
            self.plan = Some(Arc::clone(&cached.0));
            self.last = Some((k.clone(), cached.clone()));
            return true;
        }
        false
    }

    async fn make_plan(&mut self, req: Request, set: &MaskSet) {
        if set.has_column_rules() {
            if let Some(cat) = &self.catalog {
                let oids: Vec<u32> = req
                    .fields
                    .iter()
                    .flat_map(|f| f.iter().map(|f| f.table_oid))
                    .filter(|o| *o != 0)
                    .collect();
                let mut names: BTreeSet<&RelName> = match &req.rows {
                    RowSource::Known(l) => l.relations(),
                    _ => BTreeSet::new(),
                };
                if let Some(t) = req.copy.as_ref().and_then(|c| c.table.as_ref()) {
                    names.insert(t);
                }
                let names: Vec<&RelName> = names.into_iter().collect();
                if let Err(e) = cat.ensure(&oids, &names).await {
                    // Unknown provenance is masked: the resolver fails closed.
                    tracing::warn!(error = %e, "catalog lookup failed; masking what cannot be resolved");
                }
            }
        }
        let state = self.catalog.as_ref().map(|c| c.read());
        let resolver = Resolver {
            set,
            catalog: state.as_deref(),
        };
        match req.copy {
            Some(copy) => {
                let fields = copy_fields(&resolver, copy.table.as_ref(), &req.rows, &copy.format);
                let plan = match fields {
                    Some(f) => resolver.plan(&f, &req.rows),
                    None => blind_plan(set),
                };
                self.copy = Some(CopyMasker::new(copy.format, plan));
            }
            None => {
                self.plan = Some(Arc::new(match &req.fields {
                    Some(f) => resolver.plan(f, &req.rows),
                    // No row shape known: every value is treated as protected.
                    None => blind_plan(set),
                }));
            }
        }
    }

    /// Rewrites one backend frame; `None` leaves it as it is.
    pub fn rewrite(
        &mut self,
        set: &MaskSet,
        frame: FrameRef<'_>,
    ) -> Result<Option<Frame>, DecodeError> {
        match frame.tag() {
            rows::DATA_ROW => {
                let Some(plan) = &self.plan else {
                    return Ok(None);
                };
                if plan.is_noop() {
                    return Ok(None);
                }
                rewrite::data_row(set, plan, frame.body(), &mut self.counts)
            }
            rows::COPY_DATA => {
                let Some(copy) = &mut self.copy else {
                    return Ok(None);
                };
                if copy.plan.is_noop() {
                    return Ok(None);
                }
                let out = copy.data(set, frame.body(), &mut self.counts);
                Ok(Some(rows::copy_data(&out)))
            }
            backend::ERROR_RESPONSE | backend::NOTICE_RESPONSE => {
                rewrite::notice(set, frame.tag(), frame.body())
            }
            _ => Ok(None),
        }
    }

    /// The result ended: its counts, if anything was masked.
    pub fn finish(&mut self) -> Option<Counts> {
        self.plan = None;
        self.copy = None;
        (!self.counts.is_empty()).then(|| std::mem::take(&mut self.counts))
    }
}

/// The columns of a COPY's rows, when known.
fn copy_fields(
    resolver: &Resolver<'_>,
    table: Option<&RelName>,
    rows: &RowSource,
    format: &CopyFormat,
) -> Option<Vec<Field>> {
    let format = i16::from(*format == CopyFormat::Binary);
    if let Some(t) = table {
        let cat = resolver.catalog?;
        let found = cat.named(t);
        // An unqualified name with several candidates: the session's
        // search_path decides, which the gateway does not know.
        let [rel] = found.as_slice() else {
            return None;
        };
        return Some(
            rel.columns
                .iter()
                .map(|(n, name)| Field {
                    name: name.clone(),
                    table_oid: rel.oid,
                    attnum: *n,
                    type_oid: 25,
                    format,
                })
                .collect(),
        );
    }
    let RowSource::Known(l) = rows else {
        return None;
    };
    let cols = l.columns.as_ref()?;
    Some(
        (0..cols.len())
            .map(|i| Field {
                name: format!("column{}", i + 1),
                table_oid: 0,
                attnum: 0,
                type_oid: 25,
                format,
            })
            .collect(),
    )
}

/// PostgreSQL's limit on the columns of a result.
const MAX_COLUMNS: usize = 1664;

/// A plan for rows whose shape is unknown: every column masked by the first
/// column rule (to NULL, since the type is unknown) or scanned.
fn blind_plan(set: &MaskSet) -> RowPlan {
    let width = MAX_COLUMNS;
    let action = match set.first_rule() {
        Some(r) => Action::Mask(Arc::clone(r)),
        None => Action::Scan,
    };
    RowPlan::new(
        (0..width)
            .map(|i| ColumnPlan {
                action: action.clone(),
                class: if matches!(action, Action::Scan) {
                    TypeClass::Text
                } else {
                    TypeClass::Other
                },
                binary: false,
                label: format!("column{}", i + 1),
            })
            .collect(),
    )
}
