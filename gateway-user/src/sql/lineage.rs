//! Column lineage: which source columns can flow into each output column of
//! a statement, read from its parse tree.
//!
//! The server tells the table and column of a plain column reference in its
//! RowDescription; a computed column (function, cast, concatenation,
//! aggregate, constructor, sub-select, CASE, ...) arrives with table OID 0.
//! For those, this walk says what they were computed from. It errs on the
//! side of more sources: an unqualified name counts for every relation in
//! scope that may have it, a whole-row reference counts as every column, a
//! sub-select counts with everything it returns. WHERE, JOIN conditions and
//! the like do not flow into values and are not followed.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use serde_json::{Map, Value};

/// A relation as written: the catalog resolves it later.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelName {
    pub schema: Option<String>,
    pub name: String,
}

impl std::fmt::Display for RelName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => write!(f, "{}", self.name),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    Column(RelName, String),
    /// A whole-row reference: every column of the relation.
    Row(RelName),
}

impl Source {
    pub fn relation(&self) -> &RelName {
        match self {
            Source::Column(r, _) | Source::Row(r) => r,
        }
    }
}

pub type Sources = BTreeSet<Source>;

/// What the rows of a statement are made of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lineage {
    /// Sources of each output column, when the number of output columns is
    /// known from the text alone (no `*` over a table).
    pub columns: Option<Vec<Sources>>,
    /// Everything any output column may carry.
    pub all: Sources,
    /// What flows into output columns the server reports as computed (not
    /// plain column references), for rules that deny such statements.
    pub computed: Sources,
}

impl Lineage {
    pub fn relations(&self) -> BTreeSet<&RelName> {
        self.all.iter().map(Source::relation).collect()
    }
}

/// A statement that returns rows another statement defined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowsOf {
    /// `FETCH`/`MOVE` from a cursor.
    Cursor(String),
    /// `EXECUTE` of a prepared statement.
    Prepared(String),
}

/// Cursor bookkeeping a statement does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CursorEffect {
    Declare(String),
    Close(String),
    CloseAll,
}

/// The lineage facts of one statement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// The rows this statement returns, or for PREPARE and DECLARE, the rows
    /// of the statement it defines. `None` when it returns no table data.
    pub lineage: Option<Arc<Lineage>>,
    pub rows_of: Option<RowsOf>,
    pub cursor: Option<CursorEffect>,
    /// `COPY table TO STDOUT` without a column list: the table's columns in
    /// order, which only the catalog knows.
    pub copy_table: Option<RelName>,
    /// How a COPY TO writes its rows.
    pub copy_options: Option<CopyOptions>,
}

/// The options of a COPY that shape its rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOptions {
    /// text, csv or binary.
    pub format: String,
    pub delimiter: Option<u8>,
    pub quote: Option<u8>,
}

fn copy_options(m: &Map<String, Value>) -> CopyOptions {
    let mut o = CopyOptions {
        format: "text".into(),
        delimiter: None,
        quote: None,
    };
    for opt in m
        .get("options")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(("DefElem", d)) = single(unwrap_node(opt)) else {
            continue;
        };
        let arg = d
            .get("arg")
            .map(unwrap_node)
            .and_then(|a| a.get("String"))
            .and_then(|s| s.get("sval"))
            .and_then(Value::as_str);
        let first = arg.and_then(|a| a.bytes().next());
        match str_of(d, "defname") {
            "format" => o.format = arg.unwrap_or("text").to_ascii_lowercase(),
            "delimiter" => o.delimiter = first,
            "quote" => o.quote = first,
            _ => {}
        }
    }
    o
}

/// Reads the output facts of one statement tree (`{"stmt": {"node": ...}}`).
pub fn output(tree: &Value) -> Output {
    let node = tree.get("stmt").and_then(|s| s.get("node")).unwrap_or(tree);
    let Some((name, inner)) = single(node) else {
        return Output::default();
    };
    let env = Env::default();
    match name {
        "SelectStmt" | "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => Output {
            lineage: statement(name, inner, &env, &[]).map(Arc::new),
            ..Output::default()
        },
        "CopyStmt" => {
            let mut out = copy_output(inner, &env);
            out.copy_options = Some(copy_options(inner));
            out
        }
        "PrepareStmt" => Output {
            lineage: inner
                .get("query")
                .and_then(|q| query(q, &env, &[]))
                .map(Arc::new),
            ..Output::default()
        },
        "DeclareCursorStmt" => Output {
            lineage: inner
                .get("query")
                .and_then(|q| query(q, &env, &[]))
                .map(Arc::new),
            cursor: Some(CursorEffect::Declare(
                str_of(inner, "portalname").to_owned(),
            )),
            ..Output::default()
        },
        "ExplainStmt" => Output::default(),
        "FetchStmt" => Output {
            rows_of: Some(RowsOf::Cursor(str_of(inner, "portalname").to_owned())),
            ..Output::default()
        },
        "ExecuteStmt" => Output {
            rows_of: Some(RowsOf::Prepared(str_of(inner, "name").to_owned())),
            ..Output::default()
        },
        "ClosePortalStmt" => Output {
            cursor: Some(match inner.get("portalname").and_then(Value::as_str) {
                Some(n) if !n.is_empty() => CursorEffect::Close(n.to_owned()),
                _ => CursorEffect::CloseAll,
            }),
            ..Output::default()
        },
        _ => Output::default(),
    }
}

/// Lineage of a COPY TO: its query's, or its table's (listed columns, or
/// all of them in the catalog's order).
fn copy_output(inner: &Map<String, Value>, env: &Env) -> Output {
    if let Some(q) = inner.get("query").filter(|q| !q.is_null()) {
        return Output {
            lineage: query(q, env, &[]).map(Arc::new),
            ..Output::default()
        };
    }
    let Some(rel) = inner
        .get("relation")
        .and_then(Value::as_object)
        .map(rel_name)
    else {
        return Output::default();
    };
    let cols = names(inner.get("attlist"));
    if cols.is_empty() {
        let all = BTreeSet::from([Source::Row(rel.clone())]);
        Output {
            lineage: Some(Arc::new(Lineage {
                columns: None,
                all,
                computed: Sources::new(),
            })),
            copy_table: Some(rel),
            ..Output::default()
        }
    } else {
        let columns: Vec<Sources> = cols
            .iter()
            .map(|c| BTreeSet::from([Source::Column(rel.clone(), c.clone())]))
            .collect();
        let all = columns.iter().flatten().cloned().collect();
        Output {
            lineage: Some(Arc::new(Lineage {
                columns: Some(columns),
                all,
                computed: Sources::new(),
            })),
            ..Output::default()
        }
    }
}

/// `{"Name": {...}}` → ("Name", {...}).
fn single(v: &Value) -> Option<(&str, &Map<String, Value>)> {
    let m = v.as_object()?;
    if m.len() != 1 {
        return None;
    }
    let (k, inner) = m.iter().next()?;
    Some((k.as_str(), inner.as_object()?))
}

/// Unwraps `{"node": X}` to X.
fn unwrap_node(v: &Value) -> &Value {
    v.get("node").unwrap_or(v)
}

fn str_of<'a>(m: &'a Map<String, Value>, key: &str) -> &'a str {
    m.get(key).and_then(Value::as_str).unwrap_or("")
}

fn rel_name(m: &Map<String, Value>) -> RelName {
    let schema = str_of(m, "schemaname");
    RelName {
        schema: (!schema.is_empty()).then(|| schema.to_owned()),
        name: str_of(m, "relname").to_owned(),
    }
}

/// String items of a list of `String` nodes.
fn names(list: Option<&Value>) -> Vec<String> {
    list.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|n| unwrap_node(n).get("String")?.get("sval")?.as_str())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// A relation in scope and what its columns carry.
#[derive(Debug, Clone)]
enum Item {
    /// A table or view: its columns are its own. `renamed`: column names
    /// an alias gave (`customers AS t(i, n, e)`), which stand for columns
    /// only the catalog can name, so each counts as the whole row.
    Relation {
        alias: String,
        rel: RelName,
        renamed: Vec<String>,
    },
    /// A sub-select, CTE, function or VALUES: columns carry what they were
    /// made of.
    Derived {
        alias: String,
        names: Vec<String>,
        columns: Option<Vec<Sources>>,
        all: Sources,
        computed: Sources,
    },
}

impl Item {
    fn alias(&self) -> &str {
        match self {
            Item::Relation { alias, .. } | Item::Derived { alias, .. } => alias,
        }
    }

    fn everything(&self) -> Sources {
        match self {
            Item::Relation { rel, .. } => BTreeSet::from([Source::Row(rel.clone())]),
            Item::Derived { all, .. } => all.clone(),
        }
    }

    /// What column `col` of this item carries, if it may have one so named.
    fn column(&self, col: &str) -> Option<Sources> {
        match self {
            Item::Relation { rel, renamed, .. } if renamed.iter().any(|r| r == col) => {
                Some(BTreeSet::from([Source::Row(rel.clone())]))
            }
            Item::Relation { rel, .. } => Some(BTreeSet::from([Source::Column(
                rel.clone(),
                col.to_owned(),
            )])),
            Item::Derived {
                names,
                columns,
                all,
                ..
            } => match names.iter().position(|n| n == col) {
                Some(i) => Some(
                    columns
                        .as_ref()
                        .and_then(|c| c.get(i).cloned())
                        .unwrap_or_else(|| all.clone()),
                ),
                // A function's or join's columns are not all named here.
                None if columns.is_none() => Some(all.clone()),
                None => None,
            },
        }
    }
}

/// CTEs visible at a point, innermost last.
#[derive(Debug, Clone, Default)]
struct Env {
    ctes: HashMap<String, Item>,
}

type Scope = Vec<Item>;

/// Lineage of a statement node (SelectStmt without wrapper, or a DML).
fn statement(name: &str, m: &Map<String, Value>, env: &Env, outer: &[&Scope]) -> Option<Lineage> {
    match name {
        "SelectStmt" => Some(select(m, env, outer)),
        "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => {
            let returning = returning_list(m)?;
            if returning.is_empty() {
                return None;
            }
            let env = with_ctes(m, env, outer);
            let mut scope: Scope = Vec::new();
            if let Some(r) = m.get("relation").and_then(Value::as_object) {
                let rel = rel_name(r);
                scope.push(Item::Relation {
                    alias: alias_of(r).unwrap_or_else(|| rel.name.clone()),
                    rel,
                    renamed: Vec::new(),
                });
            }
            for key in ["from_clause", "using_clause"] {
                from_items(m.get(key), &env, outer, &mut scope);
            }
            if let Some(src) = m.get("source_relation") {
                from_item(src, &env, outer, &mut scope);
            }
            Some(targets(returning, &env, &scope, outer))
        }
        _ => None,
    }
}

/// RETURNING expressions (PostgreSQL 18 wraps them in a clause).
fn returning_list(m: &Map<String, Value>) -> Option<&Vec<Value>> {
    m.get("returning_clause")
        .and_then(|r| r.get("exprs"))
        .or_else(|| m.get("returning_list"))
        .and_then(Value::as_array)
}

/// Lineage of a query node wrapped in `{"node": ...}` or bare.
fn query(v: &Value, env: &Env, outer: &[&Scope]) -> Option<Lineage> {
    let (name, m) = single(unwrap_node(v))?;
    statement(name, m, env, outer)
}

fn alias_of(m: &Map<String, Value>) -> Option<String> {
    m.get("alias")
        .and_then(|a| a.get("aliasname"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn alias_columns(m: &Map<String, Value>) -> Vec<String> {
    names(m.get("alias").and_then(|a| a.get("colnames")))
}

fn with_ctes(m: &Map<String, Value>, env: &Env, outer: &[&Scope]) -> Env {
    let Some(ctes) = m
        .get("with_clause")
        .and_then(|w| w.get("ctes"))
        .and_then(Value::as_array)
    else {
        return env.clone();
    };
    let mut env = env.clone();
    for cte in ctes {
        let Some(("CommonTableExpr", c)) = single(unwrap_node(cte)) else {
            continue;
        };
        let name = str_of(c, "ctename").to_owned();
        // A recursive CTE reads itself; that adds nothing the rest of it
        // does not already bring.
        let lineage = c
            .get("ctequery")
            .and_then(|q| query(q, &env, outer))
            .unwrap_or_default();
        let mut cols = names(c.get("aliascolnames"));
        if cols.is_empty() {
            cols = output_names(c.get("ctequery"));
        }
        env.ctes.insert(
            name.clone(),
            Item::Derived {
                alias: name,
                names: cols,
                columns: lineage.columns,
                all: lineage.all,
                computed: lineage.computed,
            },
        );
    }
    env
}

/// The output column names of a query, as the server would name them.
fn output_names(q: Option<&Value>) -> Vec<String> {
    let Some((_, m)) = q.map(unwrap_node).and_then(single) else {
        return Vec::new();
    };
    if let Some(l) = m.get("larg").filter(|l| !l.is_null()) {
        return output_names(Some(&Value::Object(
            [("SelectStmt".to_owned(), l.clone())].into_iter().collect(),
        )));
    }
    let list = m
        .get("target_list")
        .and_then(Value::as_array)
        .filter(|l| !l.is_empty())
        .or_else(|| returning_list(m));
    list.map(|l| l.iter().map(target_name).collect())
        .unwrap_or_default()
}

fn target_name(t: &Value) -> String {
    let Some(("ResTarget", rt)) = single(unwrap_node(t)) else {
        return String::new();
    };
    let given = str_of(rt, "name");
    if !given.is_empty() {
        return given.to_owned();
    }
    let val = rt.get("val").map(unwrap_node);
    match val.and_then(single) {
        Some(("ColumnRef", c)) => names(c.get("fields")).pop().unwrap_or_default(),
        Some(("FuncCall", f)) => names(f.get("funcname")).pop().unwrap_or_default(),
        Some(("TypeCast", tc)) => match tc.get("arg").map(unwrap_node).and_then(single) {
            Some(("ColumnRef", c)) => names(c.get("fields")).pop().unwrap_or_default(),
            _ => String::new(),
        },
        _ => String::new(),
    }
}

fn select(m: &Map<String, Value>, env: &Env, outer: &[&Scope]) -> Lineage {
    let env = with_ctes(m, env, outer);
    let larg = m.get("larg").and_then(Value::as_object);
    let rarg = m.get("rarg").and_then(Value::as_object);
    if let (Some(l), Some(r)) = (larg, rarg) {
        let (l, r) = (select(l, &env, outer), select(r, &env, outer));
        let columns = match (l.columns, r.columns) {
            (Some(a), Some(b)) if a.len() == b.len() => Some(
                a.into_iter()
                    .zip(b)
                    .map(|(mut x, y)| {
                        x.extend(y);
                        x
                    })
                    .collect(),
            ),
            _ => None,
        };
        let mut all = l.all;
        all.extend(r.all);
        let mut computed = l.computed;
        computed.extend(r.computed);
        return Lineage {
            columns,
            all,
            computed,
        };
    }
    let mut scope: Scope = Vec::new();
    from_items(m.get("from_clause"), &env, outer, &mut scope);
    if let Some(rows) = m.get("values_lists").and_then(Value::as_array) {
        if !rows.is_empty() {
            return values(rows, &env, &scope, outer);
        }
    }
    let list = m
        .get("target_list")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    targets(list, &env, &scope, outer)
}

fn values(rows: &[Value], env: &Env, scope: &Scope, outer: &[&Scope]) -> Lineage {
    let mut columns: Vec<Sources> = Vec::new();
    for row in rows {
        let items = unwrap_node(row)
            .get("List")
            .and_then(|l| l.get("items"))
            .and_then(Value::as_array);
        for (i, e) in items.into_iter().flatten().enumerate() {
            if columns.len() <= i {
                columns.resize_with(i + 1, BTreeSet::new);
            }
            let s = expr(e, env, scope, outer);
            columns[i].extend(s);
        }
    }
    let all: Sources = columns.iter().flatten().cloned().collect();
    Lineage {
        columns: Some(columns),
        computed: all.clone(),
        all,
    }
}

fn targets(list: &[Value], env: &Env, scope: &Scope, outer: &[&Scope]) -> Lineage {
    let mut columns: Option<Vec<Sources>> = Some(Vec::new());
    let mut all = Sources::new();
    let mut computed = Sources::new();
    for t in list {
        let Some(("ResTarget", rt)) = single(unwrap_node(t)) else {
            continue;
        };
        let Some(val) = rt.get("val") else { continue };
        if let Some(("ColumnRef", c)) = single(unwrap_node(val)) {
            if let Some(expanded) = star(c, scope) {
                match expanded {
                    Some(cols) => {
                        for s in &cols {
                            all.extend(s.iter().cloned());
                        }
                        for i in star_items(c, scope) {
                            if let Item::Derived { computed: dc, .. } = i {
                                computed.extend(dc.iter().cloned());
                            }
                        }
                        if let Some(out) = columns.as_mut() {
                            out.extend(cols);
                        }
                    }
                    None => {
                        // A `*` over a table: as wide as the table, which
                        // only the catalog knows.
                        let items = star_items(c, scope);
                        for i in items {
                            all.extend(i.everything());
                            if let Item::Derived { computed: dc, .. } = i {
                                computed.extend(dc.iter().cloned());
                            }
                        }
                        columns = None;
                    }
                }
                continue;
            }
        }
        let s = expr(val, env, scope, outer);
        all.extend(s.iter().cloned());
        let bare = matches!(single(unwrap_node(val)), Some(("ColumnRef", _)));
        if bare {
            // A plain reference is computed only where it names a computed
            // column of a sub-select or CTE.
            computed.extend(s.intersection(&derived_computed(scope, outer)).cloned());
        } else {
            computed.extend(s.iter().cloned());
        }
        if let Some(out) = columns.as_mut() {
            out.push(s);
        }
    }
    Lineage {
        columns,
        all,
        computed,
    }
}

/// What flows into computed columns of the sub-selects and CTEs in scope.
fn derived_computed(scope: &Scope, outer: &[&Scope]) -> Sources {
    std::iter::once(scope)
        .chain(outer.iter().copied())
        .flatten()
        .filter_map(|i| match i {
            Item::Derived { computed, .. } => Some(computed.iter().cloned()),
            Item::Relation { .. } => None,
        })
        .flatten()
        .collect()
}

/// For `*` or `x.*`: Some(Some(columns)) when every expanded item's columns
/// are known, Some(None) when some are not, None when not a star.
fn star(c: &Map<String, Value>, scope: &Scope) -> Option<Option<Vec<Sources>>> {
    let fields = c.get("fields").and_then(Value::as_array)?;
    let last = fields.last().map(unwrap_node)?;
    last.get("AStar")?;
    let mut out = Vec::new();
    for item in star_items(c, scope) {
        match item {
            Item::Derived {
                columns: Some(cols),
                ..
            } => out.extend(cols.iter().cloned()),
            _ => return Some(None),
        }
    }
    Some(Some(out))
}

fn star_items<'s>(c: &Map<String, Value>, scope: &'s Scope) -> Vec<&'s Item> {
    let fields = names(c.get("fields"));
    match fields.last() {
        Some(q) => scope.iter().filter(|i| i.alias() == q).collect(),
        None => scope.iter().collect(),
    }
}

fn from_items(list: Option<&Value>, env: &Env, outer: &[&Scope], scope: &mut Scope) {
    for item in list.and_then(Value::as_array).into_iter().flatten() {
        from_item(item, env, outer, scope);
    }
}

fn from_item(v: &Value, env: &Env, outer: &[&Scope], scope: &mut Scope) {
    let Some((name, m)) = single(unwrap_node(v)) else {
        return;
    };
    match name {
        "RangeVar" => {
            let rel = rel_name(m);
            let alias = alias_of(m).unwrap_or_else(|| rel.name.clone());
            if rel.schema.is_none() {
                if let Some(Item::Derived {
                    names,
                    columns,
                    all,
                    computed,
                    ..
                }) = env.ctes.get(&rel.name)
                {
                    let cols = alias_columns(m);
                    scope.push(Item::Derived {
                        alias,
                        names: if cols.is_empty() { names.clone() } else { cols },
                        columns: columns.clone(),
                        all: all.clone(),
                        computed: computed.clone(),
                    });
                    return;
                }
            }
            scope.push(Item::Relation {
                alias,
                rel,
                renamed: alias_columns(m),
            });
        }
        "RangeSubselect" => {
            // LATERAL sub-selects see the items before them.
            let here: Vec<&Scope> = outer.iter().copied().chain([&*scope]).collect();
            let lineage = m
                .get("subquery")
                .and_then(|q| query(q, env, &here))
                .unwrap_or_default();
            let mut cols = alias_columns(m);
            if cols.is_empty() {
                cols = output_names(m.get("subquery"));
            }
            scope.push(Item::Derived {
                alias: alias_of(m).unwrap_or_default(),
                names: cols,
                columns: lineage.columns,
                all: lineage.all,
                computed: lineage.computed,
            });
        }
        "JoinExpr" => {
            let start = scope.len();
            for side in ["larg", "rarg"] {
                if let Some(s) = m.get(side) {
                    from_item(s, env, outer, scope);
                }
            }
            if let Some(alias) = alias_of(m) {
                let all = scope[start..].iter().flat_map(Item::everything).collect();
                let computed = derived_computed(&scope[start..].to_vec(), &[]);
                scope.push(Item::Derived {
                    alias,
                    names: Vec::new(),
                    columns: None,
                    all,
                    computed,
                });
            }
        }
        _ => {
            // Functions in FROM, VALUES, XMLTABLE, JSON_TABLE, TABLESAMPLE:
            // every column carries whatever went in.
            let here: Vec<&Scope> = outer.iter().copied().chain([&*scope]).collect();
            let mut all = Sources::new();
            let s = scope.clone();
            collect(&Value::Object(m.clone()), env, &s, &here, &mut all);
            if let Some(rel) = m.get("relation") {
                from_item(rel, env, outer, scope);
            }
            scope.push(Item::Derived {
                alias: alias_of(m).unwrap_or_default(),
                names: alias_columns(m),
                columns: None,
                computed: all.clone(),
                all,
            });
        }
    }
}

/// Sources of one expression.
fn expr(v: &Value, env: &Env, scope: &Scope, outer: &[&Scope]) -> Sources {
    let mut out = Sources::new();
    collect(v, env, scope, outer, &mut out);
    out
}

fn collect(v: &Value, env: &Env, scope: &Scope, outer: &[&Scope], out: &mut Sources) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| collect(x, env, scope, outer, out)),
        Value::Object(m) => {
            if let Some((name, inner)) = single(v) {
                match name {
                    "ColumnRef" => {
                        column_ref(inner, scope, outer, out);
                        return;
                    }
                    "SubLink" => {
                        sublink(inner, env, scope, outer, out);
                        return;
                    }
                    "SelectStmt" => {
                        let here: Vec<&Scope> = outer.iter().copied().chain([scope]).collect();
                        out.extend(select(inner, env, &here).all);
                        return;
                    }
                    _ => {}
                }
            }
            m.values().for_each(|x| collect(x, env, scope, outer, out));
        }
        _ => {}
    }
}

fn sublink(m: &Map<String, Value>, env: &Env, scope: &Scope, outer: &[&Scope], out: &mut Sources) {
    // EXISTS, ALL and ANY give a boolean: nothing of the sub-select flows
    // out. The other kinds return what the sub-select returns.
    let kind = m.get("sub_link_type").and_then(Value::as_i64).unwrap_or(0);
    if matches!(kind, 1..=3) {
        return;
    }
    if let Some(q) = m.get("subselect") {
        let here: Vec<&Scope> = outer.iter().copied().chain([scope]).collect();
        if let Some(l) = query(q, env, &here) {
            out.extend(l.all);
        }
    }
    if let Some(t) = m.get("testexpr") {
        collect(t, env, scope, outer, out);
    }
}

fn column_ref(m: &Map<String, Value>, scope: &Scope, outer: &[&Scope], out: &mut Sources) {
    let fields = m
        .get("fields")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let is_star = fields
        .last()
        .is_some_and(|f| unwrap_node(f).get("AStar").is_some());
    let words = names(m.get("fields"));
    let levels: Vec<&Scope> = std::iter::once(scope)
        .chain(outer.iter().rev().copied())
        .collect();
    if is_star {
        // `*` or `x.*` inside an expression (`count(*)` has no ColumnRef).
        for level in &levels {
            let items: Vec<&Item> = match words.last() {
                Some(q) => level.iter().filter(|i| i.alias() == q).collect(),
                None => level.iter().collect(),
            };
            for i in items {
                out.extend(i.everything());
            }
        }
        return;
    }
    match words.as_slice() {
        [col] => {
            // A column of some item, or a whole-row reference to an item
            // named so: both are counted, at every level.
            for level in &levels {
                for item in level.iter() {
                    if let Some(s) = item.column(col) {
                        out.extend(s);
                    }
                    if item.alias() == col {
                        out.extend(item.everything());
                    }
                }
            }
        }
        [.., qual, col] => {
            let mut found = false;
            for level in &levels {
                for item in level.iter().filter(|i| i.alias() == qual) {
                    found = true;
                    match item.column(col) {
                        Some(s) => out.extend(s),
                        None => out.extend(item.everything()),
                    }
                }
                if found {
                    return;
                }
            }
            // `composite_col.field` or a name not in scope: count the
            // qualifier as a column too, everywhere.
            for level in &levels {
                for item in level.iter() {
                    for c in [qual.as_str(), col.as_str()] {
                        if let Some(s) = item.column(c) {
                            out.extend(s);
                        }
                    }
                }
            }
        }
        [] => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(sql: &str) -> Output {
        let p = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).unwrap();
        let tree = serde_json::to_value(&p.protobuf.stmts[0]).unwrap();
        output(&tree)
    }

    fn col(t: &str, c: &str) -> Source {
        Source::Column(
            RelName {
                schema: None,
                name: t.into(),
            },
            c.into(),
        )
    }

    fn row(t: &str) -> Source {
        Source::Row(RelName {
            schema: None,
            name: t.into(),
        })
    }

    fn columns(sql: &str) -> Vec<Sources> {
        out(sql).lineage.unwrap().columns.clone().unwrap()
    }

    #[test]
    fn expressions_carry_their_columns() {
        let c = columns(
            "SELECT upper(email), name || ' <' || email || '>', count(*), 1 FROM customers",
        );
        assert_eq!(c[0], BTreeSet::from([col("customers", "email")]));
        assert_eq!(
            c[1],
            BTreeSet::from([col("customers", "name"), col("customers", "email")])
        );
        assert!(c[2].is_empty());
        assert!(c[3].is_empty());
    }

    #[test]
    fn whole_rows_count_as_every_column() {
        for sql in [
            "SELECT row_to_json(c) FROM customers c",
            "SELECT to_jsonb(c.*) FROM customers c",
            "SELECT c FROM customers c",
        ] {
            assert!(columns(sql)[0].contains(&row("customers")), "{sql}");
        }
    }

    #[test]
    fn through_subqueries_ctes_unions_and_lateral() {
        let c = columns("SELECT s.p FROM (SELECT phone AS p FROM customers) s");
        assert_eq!(c[0], BTreeSet::from([col("customers", "phone")]));
        let c = columns("WITH x AS (SELECT card FROM customers) SELECT lower(card) FROM x");
        assert_eq!(c[0], BTreeSet::from([col("customers", "card")]));
        let c = columns("WITH x(k) AS (SELECT card FROM customers) SELECT * FROM x");
        assert_eq!(c[0], BTreeSet::from([col("customers", "card")]));
        let c = columns("SELECT 'a' UNION SELECT ssn FROM customers");
        assert_eq!(c[0], BTreeSet::from([col("customers", "ssn")]));
        let c = columns(
            "SELECT (SELECT max(email) FROM customers), EXISTS (SELECT email FROM customers)",
        );
        assert_eq!(c[0], BTreeSet::from([col("customers", "email")]));
        assert!(c[1].is_empty());
        let c = columns("SELECT l.x FROM customers c, LATERAL (SELECT c.ssn AS x) l");
        assert_eq!(c[0], BTreeSet::from([col("customers", "ssn")]));
        let c = columns("SELECT CASE WHEN id > 1 THEN email ELSE 'x' END FROM customers");
        assert!(c[0].contains(&col("customers", "email")));
        let c = columns("SELECT g FROM customers c, unnest(ARRAY[c.email]) g");
        assert!(c[0].contains(&col("customers", "email")));
    }

    #[test]
    fn computed_sources_exclude_plain_reads() {
        let l = out("SELECT email, upper(ssn) FROM customers")
            .lineage
            .unwrap();
        assert_eq!(l.computed, BTreeSet::from([col("customers", "ssn")]));
        let l =
            out("WITH x AS (SELECT lower(card) AS k, phone FROM customers) SELECT k, phone FROM x")
                .lineage
                .unwrap();
        assert!(l.computed.contains(&col("customers", "card")));
        assert!(!l.computed.contains(&col("customers", "phone")));
    }

    #[test]
    fn renamed_columns_count_as_the_whole_row() {
        let c = columns("SELECT upper(e) FROM customers AS t(i, n, e)");
        assert_eq!(c[0], BTreeSet::from([row("customers")]));
        let c = columns("SELECT upper(tier) FROM customers AS t(i, n, e)");
        assert_eq!(c[0], BTreeSet::from([col("customers", "tier")]));
    }

    #[test]
    fn stars_over_tables_leave_the_width_to_the_catalog() {
        let l = out("SELECT *, upper(email) FROM customers")
            .lineage
            .unwrap();
        assert!(l.columns.is_none());
        assert!(l.all.contains(&row("customers")));
    }

    #[test]
    fn returning_copy_cursors_and_prepared() {
        let c = columns("UPDATE customers SET tier = 'x' WHERE id = 1 RETURNING upper(email)");
        assert_eq!(c[0], BTreeSet::from([col("customers", "email")]));
        let o = out("COPY (SELECT ssn FROM customers) TO STDOUT");
        assert_eq!(
            o.lineage.unwrap().columns.clone().unwrap()[0],
            BTreeSet::from([col("customers", "ssn")])
        );
        let o = out("COPY public.customers TO STDOUT");
        assert!(o.copy_table.is_some());
        let o = out("DECLARE c CURSOR FOR SELECT email || '' FROM customers");
        assert_eq!(o.cursor, Some(CursorEffect::Declare("c".into())));
        assert!(o.lineage.is_some());
        assert_eq!(
            out("FETCH 2 FROM c").rows_of,
            Some(RowsOf::Cursor("c".into()))
        );
        assert_eq!(
            out("EXECUTE p(1)").rows_of,
            Some(RowsOf::Prepared("p".into()))
        );
        assert!(out("PREPARE p AS SELECT upper(ssn) FROM customers")
            .lineage
            .is_some());
    }
}
