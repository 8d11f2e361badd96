//! Facts from a parse tree, by a walk over every node.
//!
//! The tree is walked in its serialised form, so no node type can be
//! skipped by omission: every object, function and statement anywhere in the
//! statement (sub-selects, CTEs, LATERAL, DEFAULTs, function arguments, the
//! inside of EXPLAIN, PREPARE, DECLARE and COPY (query)) is seen.

use std::collections::BTreeSet;

use serde::Serialize;
use serde_json::{Map, Value};

/// How a statement touches a table or view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    Read,
    Insert,
    Update,
    Delete,
    Merge,
    CopyIn,
    CopyOut,
    Ddl,
}

impl Access {
    pub const ALL: [Access; 8] = [
        Access::Read,
        Access::Insert,
        Access::Update,
        Access::Delete,
        Access::Merge,
        Access::CopyIn,
        Access::CopyOut,
        Access::Ddl,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Insert => "insert",
            Access::Update => "update",
            Access::Delete => "delete",
            Access::Merge => "merge",
            Access::CopyIn => "copy_in",
            Access::CopyOut => "copy_out",
            Access::Ddl => "ddl",
        }
    }
}

/// A table or view, schema-qualified (unqualified names are resolved the
/// way the default search path does: `pg_*` to `pg_catalog`, the rest to
/// `public`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ObjectRef {
    pub name: String,
    pub access: Access,
}

/// Risky features a policy can single out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    /// An UPDATE or DELETE without WHERE that will run (plain, in a CTE,
    /// under EXPLAIN ANALYZE, in PREPARE).
    DmlWithoutWhere,
    /// COPY to or from a server-side file.
    CopyFile,
    /// COPY to or from a program.
    CopyProgram,
    /// SELECT ... INTO a new table.
    SelectInto,
    /// A WITH clause holding INSERT, UPDATE, DELETE or MERGE.
    DataModifyingCte,
    /// EXPLAIN ANALYZE, which runs its statement.
    ExplainAnalyze,
    /// PREPARE of a statement.
    Prepare,
    /// A change of role or session authorization in any form.
    RoleChange,
    /// A change of a setting that changes how the server reads SQL.
    PinnedSettingChange,
}

impl Feature {
    pub const ALL: [Feature; 9] = [
        Feature::DmlWithoutWhere,
        Feature::CopyFile,
        Feature::CopyProgram,
        Feature::SelectInto,
        Feature::DataModifyingCte,
        Feature::ExplainAnalyze,
        Feature::Prepare,
        Feature::RoleChange,
        Feature::PinnedSettingChange,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Feature::DmlWithoutWhere => "dml_without_where",
            Feature::CopyFile => "copy_file",
            Feature::CopyProgram => "copy_program",
            Feature::SelectInto => "select_into",
            Feature::DataModifyingCte => "data_modifying_cte",
            Feature::ExplainAnalyze => "explain_analyze",
            Feature::Prepare => "prepare",
            Feature::RoleChange => "role_change",
            Feature::PinnedSettingChange => "pinned_setting_change",
        }
    }
}

/// Settings that change how the server reads SQL text: the gateway parses
/// with them fixed, so nobody may change them.
pub const PINNED_SETTINGS: &[&str] = &[
    "standard_conforming_strings",
    "backslash_quote",
    "client_encoding",
];

/// Settings whose change is a change of identity.
const ROLE_SETTINGS: &[&str] = &["role", "session_authorization"];

#[derive(Debug, Default, Clone)]
pub struct Facts {
    pub kinds: Vec<&'static str>,
    pub objects: BTreeSet<ObjectRef>,
    /// Functions as written: `name` or `schema.name`.
    pub functions: BTreeSet<String>,
    pub features: BTreeSet<Feature>,
}

#[derive(Clone, Copy)]
struct Ctx {
    /// False inside a plain EXPLAIN: the statement is planned, not run.
    executed: bool,
    access: Access,
}

struct Walker<'a> {
    facts: Facts,
    ctes: &'a BTreeSet<String>,
}

/// Walks one statement's tree.
pub fn collect(top_kind: &'static str, tree: &Value) -> Facts {
    // Objects a DDL or utility statement names are touched as such; reads
    // inside it (a view's query) are reads again.
    let access = match top_kind {
        "select" | "insert" | "update" | "delete" | "merge" | "copy_in" | "copy_out"
        | "explain" | "prepare" | "execute" | "cursor" | "transaction" | "set" | "show" => {
            Access::Read
        }
        _ => Access::Ddl,
    };
    let mut ctes = BTreeSet::new();
    cte_names(tree, &mut ctes);
    let mut w = Walker {
        facts: Facts {
            kinds: vec![top_kind],
            ..Facts::default()
        },
        ctes: &ctes,
    };
    w.walk(
        tree,
        Ctx {
            executed: true,
            access,
        },
    );
    w.facts
}

fn cte_names(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::Object(cte)) = m.get("CommonTableExpr") {
                if let Some(Value::String(name)) = cte.get("ctename") {
                    out.insert(name.clone());
                }
            }
            m.values().for_each(|x| cte_names(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| cte_names(x, out)),
        _ => {}
    }
}

fn str_field<'v>(m: &'v Map<String, Value>, key: &str) -> &'v str {
    m.get(key).and_then(Value::as_str).unwrap_or("")
}

fn is_null(m: &Map<String, Value>, key: &str) -> bool {
    m.get(key).is_none_or(Value::is_null)
}

/// The `sval` of a string constant node, if `v` is one.
fn const_string(v: &Value) -> Option<&str> {
    v.get("node")?
        .get("AConst")?
        .get("val")?
        .get("Sval")?
        .get("sval")?
        .as_str()
}

/// Names in a `[{"node": {"String": {"sval": ...}}}]` list, joined by dots.
fn dotted(list: Option<&Value>) -> String {
    let parts: Vec<&str> = list
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|n| n.get("node")?.get("String")?.get("sval")?.as_str())
                .collect()
        })
        .unwrap_or_default();
    parts.join(".")
}

/// A DML statement node, if `v` is one (wrapped in `node` or not).
fn dml_kind(v: &Value) -> Option<&'static str> {
    let inner = v.get("node").unwrap_or(v);
    let m = inner.as_object()?;
    if m.contains_key("InsertStmt") {
        Some("insert")
    } else if m.contains_key("UpdateStmt") {
        Some("update")
    } else if m.contains_key("DeleteStmt") {
        Some("delete")
    } else if m.contains_key("MergeStmt") {
        Some("merge")
    } else {
        None
    }
}

impl Walker<'_> {
    fn kind(&mut self, kind: &'static str, ctx: Ctx) {
        if ctx.executed && !self.facts.kinds.contains(&kind) {
            self.facts.kinds.push(kind);
        }
    }

    fn feature(&mut self, f: Feature) {
        self.facts.features.insert(f);
    }

    fn setting_changed(&mut self, name: &str) {
        let name = name.to_ascii_lowercase();
        if ROLE_SETTINGS.contains(&name.as_str()) {
            self.feature(Feature::RoleChange);
        }
        if PINNED_SETTINGS.contains(&name.as_str()) {
            self.feature(Feature::PinnedSettingChange);
        }
    }

    fn relation(&mut self, rv: &Map<String, Value>, ctx: Ctx) {
        let rel = str_field(rv, "relname");
        let schema = str_field(rv, "schemaname");
        if rel.is_empty() {
            return;
        }
        let name = if !schema.is_empty() {
            format!("{schema}.{rel}")
        } else if self.ctes.contains(rel) {
            return;
        } else if rel.starts_with("pg_") {
            format!("pg_catalog.{rel}")
        } else {
            format!("public.{rel}")
        };
        let access = if ctx.executed {
            ctx.access
        } else {
            Access::Read
        };
        self.facts.objects.insert(ObjectRef { name, access });
    }

    fn walk(&mut self, v: &Value, ctx: Ctx) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| self.walk(x, ctx)),
            Value::Object(m) => {
                // A typed relation field (`relation`, `into.rel`) is a
                // RangeVar without the node wrapper.
                if m.contains_key("relname") && m.contains_key("relpersistence") {
                    self.relation(m, ctx);
                    return;
                }
                if m.len() == 1 {
                    if let Some((name, Value::Object(inner))) = m.iter().next() {
                        if name.starts_with(|c: char| c.is_ascii_uppercase()) {
                            self.node(name, inner, ctx);
                            return;
                        }
                    }
                }
                m.values().for_each(|x| self.walk(x, ctx));
            }
            _ => {}
        }
    }

    fn walk_fields_except(&mut self, m: &Map<String, Value>, skip: &[&str], ctx: Ctx) {
        for (k, v) in m {
            if !skip.contains(&k.as_str()) {
                self.walk(v, ctx);
            }
        }
    }

    fn node(&mut self, name: &str, m: &Map<String, Value>, ctx: Ctx) {
        let read = Ctx {
            access: Access::Read,
            ..ctx
        };
        let with = |access| Ctx { access, ..ctx };
        match name {
            "RangeVar" => self.relation(m, ctx),
            "FuncCall" => {
                let fname = dotted(m.get("funcname"));
                let base = fname.rsplit('.').next().unwrap_or("").to_ascii_lowercase();
                if base == "set_config" {
                    let first = m.get("args").and_then(|a| a.get(0));
                    match first.and_then(const_string) {
                        Some(setting) => self.setting_changed(setting),
                        // A computed name could be anything: assume the worst.
                        None => {
                            self.feature(Feature::RoleChange);
                            self.feature(Feature::PinnedSettingChange);
                        }
                    }
                }
                if !fname.is_empty() {
                    self.facts.functions.insert(fname.to_ascii_lowercase());
                }
                self.walk_fields_except(m, &["funcname"], read);
            }
            "SelectStmt" => {
                self.kind("select", ctx);
                if !is_null(m, "into_clause") {
                    self.feature(Feature::SelectInto);
                    self.walk(
                        m.get("into_clause").unwrap_or(&Value::Null),
                        with(Access::Ddl),
                    );
                }
                self.walk_fields_except(m, &["into_clause"], read);
            }
            "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => {
                let (kind, access) = match name {
                    "InsertStmt" => ("insert", Access::Insert),
                    "UpdateStmt" => ("update", Access::Update),
                    "DeleteStmt" => ("delete", Access::Delete),
                    _ => ("merge", Access::Merge),
                };
                self.kind(kind, ctx);
                if ctx.executed
                    && matches!(name, "UpdateStmt" | "DeleteStmt")
                    && is_null(m, "where_clause")
                {
                    self.feature(Feature::DmlWithoutWhere);
                }
                if let Some(rel) = m.get("relation") {
                    self.walk(rel, with(access));
                }
                self.walk_fields_except(m, &["relation"], read);
            }
            "CopyStmt" => {
                let from = m.get("is_from").and_then(Value::as_bool).unwrap_or(false);
                if m.get("is_program")
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
                {
                    self.feature(Feature::CopyProgram);
                } else if !str_field(m, "filename").is_empty() {
                    self.feature(Feature::CopyFile);
                }
                let access = if from {
                    Access::CopyIn
                } else {
                    Access::CopyOut
                };
                if let Some(rel) = m.get("relation") {
                    self.walk(rel, with(access));
                }
                self.walk_fields_except(m, &["relation"], read);
            }
            "ExplainStmt" => {
                let analyze = m
                    .get("options")
                    .and_then(Value::as_array)
                    .is_some_and(|opts| {
                        opts.iter().any(|o| {
                            let d = o.get("node").and_then(|n| n.get("DefElem"));
                            let is_analyze = d
                                .and_then(|d| d.get("defname"))
                                .and_then(Value::as_str)
                                .is_some_and(|n| n.eq_ignore_ascii_case("analyze"));
                            is_analyze && option_enabled(d.and_then(|d| d.get("arg")))
                        })
                    });
                if analyze {
                    self.feature(Feature::ExplainAnalyze);
                }
                let inner = Ctx {
                    executed: ctx.executed && analyze,
                    access: Access::Read,
                };
                self.walk(m.get("query").unwrap_or(&Value::Null), inner);
            }
            "PrepareStmt" => {
                self.feature(Feature::Prepare);
                // What is prepared is judged as if it ran: it will.
                self.walk(m.get("query").unwrap_or(&Value::Null), read);
                self.walk_fields_except(m, &["query"], read);
            }
            "CommonTableExpr" => {
                if let Some(q) = m.get("ctequery") {
                    if dml_kind(q).is_some() {
                        self.feature(Feature::DataModifyingCte);
                    }
                }
                self.walk_fields_except(m, &[], read);
            }
            "VariableSetStmt" => {
                self.setting_changed(str_field(m, "name"));
                self.walk_fields_except(m, &[], read);
            }
            "CreateTableAsStmt" | "IntoClause" => {
                self.walk_fields_except(m, &[], with(Access::Ddl));
            }
            _ => self.walk_fields_except(m, &[], ctx),
        }
    }
}

/// The boolean value of an option like `ANALYZE` in `EXPLAIN (ANALYZE x)`:
/// no argument means on.
fn option_enabled(arg: Option<&Value>) -> bool {
    let Some(node) = arg.and_then(|a| a.get("node")) else {
        return true;
    };
    if let Some(b) = node.get("Boolean") {
        return b.get("boolval").and_then(Value::as_bool).unwrap_or(false);
    }
    if let Some(i) = node.get("Integer") {
        return i.get("ival").and_then(Value::as_i64).unwrap_or(0) != 0;
    }
    if let Some(s) = node
        .get("String")
        .and_then(|s| s.get("sval"))
        .and_then(Value::as_str)
    {
        return !matches!(
            s.to_ascii_lowercase().as_str(),
            "false" | "off" | "no" | "0"
        );
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(sql: &str) -> Facts {
        let a = crate::sql::analyze(sql);
        assert!(a.parse_error.is_none(), "{sql}: {:?}", a.parse_error);
        let s = &a.statements[0];
        Facts {
            kinds: s.kinds.clone(),
            objects: s.objects.iter().cloned().collect(),
            functions: s.functions.iter().cloned().collect(),
            features: s.features.iter().copied().collect(),
        }
    }

    fn has(f: &Facts, feature: Feature) -> bool {
        f.features.contains(&feature)
    }

    #[test]
    fn functions_in_any_position_and_any_qualification() {
        for sql in [
            "SELECT pg_read_file('/etc/passwd')",
            "SELECT pg_catalog.pg_read_file('/etc/passwd')",
            "SELECT * FROM pg_read_file('/etc/passwd') AS f",
            "SELECT 1 WHERE length(PG_READ_FILE('/x')) > 0",
            "SELECT (SELECT pg_read_file('/x'))",
            "WITH x AS (SELECT pg_read_file('/x')) SELECT * FROM x",
            "SELECT * FROM t, LATERAL (SELECT pg_read_file(t.a)) s",
            "INSERT INTO t VALUES (pg_read_file('/x'))",
        ] {
            let f = facts(sql);
            assert!(
                f.functions.iter().any(|n| n.ends_with("pg_read_file")),
                "{sql}: {:?}",
                f.functions
            );
        }
    }

    #[test]
    fn role_changes_in_every_form() {
        for sql in [
            "SET ROLE postgres",
            "SET LOCAL ROLE postgres",
            "SET SESSION AUTHORIZATION postgres",
            "RESET ROLE",
            "SELECT set_config('role', 'postgres', false)",
            "SELECT pg_catalog.set_config('ROLE', 'postgres', false)",
            "SELECT set_config(lower('ROLE'), 'postgres', false)",
        ] {
            assert!(has(&facts(sql), Feature::RoleChange), "{sql}");
        }
        assert!(!has(
            &facts("SELECT set_config('application_name', 'x', false)"),
            Feature::RoleChange
        ));
    }

    #[test]
    fn pinned_settings() {
        for sql in [
            "SET standard_conforming_strings = off",
            "SET client_encoding = 'LATIN1'",
            "SET NAMES 'LATIN1'",
            "SELECT set_config('backslash_quote', 'on', false)",
        ] {
            assert!(has(&facts(sql), Feature::PinnedSettingChange), "{sql}");
        }
        assert!(!has(
            &facts("SET statement_timeout = '5s'"),
            Feature::PinnedSettingChange
        ));
    }

    #[test]
    fn unfiltered_writes_wherever_they_run() {
        for sql in [
            "DELETE FROM t",
            "UPDATE t SET a = 1",
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            "EXPLAIN ANALYZE DELETE FROM t",
            "EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1",
            "PREPARE p AS DELETE FROM t",
        ] {
            assert!(has(&facts(sql), Feature::DmlWithoutWhere), "{sql}");
        }
        for sql in [
            "DELETE FROM t WHERE id = 1",
            "EXPLAIN DELETE FROM t",
            "EXPLAIN (ANALYZE false) DELETE FROM t",
        ] {
            assert!(!has(&facts(sql), Feature::DmlWithoutWhere), "{sql}");
        }
    }

    #[test]
    fn objects_and_access() {
        let f = facts("INSERT INTO orders SELECT * FROM customers c JOIN pg_class p ON true");
        let names: Vec<_> = f
            .objects
            .iter()
            .map(|o| (o.name.as_str(), o.access))
            .collect();
        assert!(
            names.contains(&("public.orders", Access::Insert)),
            "{names:?}"
        );
        assert!(
            names.contains(&("public.customers", Access::Read)),
            "{names:?}"
        );
        assert!(
            names.contains(&("pg_catalog.pg_class", Access::Read)),
            "{names:?}"
        );
        let f = facts("WITH x AS (SELECT 1) SELECT * FROM x");
        assert!(
            f.objects.is_empty(),
            "a CTE is not a table: {:?}",
            f.objects
        );
        let f = facts("COPY customers TO STDOUT");
        assert_eq!(
            f.objects.iter().next().map(|o| o.access),
            Some(Access::CopyOut)
        );
        assert!(has(&facts("COPY t TO '/tmp/x'"), Feature::CopyFile));
        assert!(has(
            &facts("COPY t FROM PROGRAM 'id'"),
            Feature::CopyProgram
        ));
        assert!(has(
            &facts("SELECT * INTO stash FROM customers"),
            Feature::SelectInto
        ));
    }
}
