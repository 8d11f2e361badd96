//! Statement analysis: SQL text in, facts out.
//!
//! The text is parsed by PostgreSQL's own grammar (libpg_query through the
//! `pg_query` crate), so the gateway splits and reads statements exactly as
//! the server will. Nothing here decides anything; `policy` does.

mod cache;
mod facts;
mod kind;
pub mod lineage;
pub mod shape;

use pg_query::{protobuf, NodeEnum};
use serde::Serialize;

pub use cache::AnalysisCache;
pub use facts::{Access, Feature, ObjectRef, PINNED_SETTINGS};
pub use kind::statement_kind;

/// What the gateway learnt from one query string (one simple Query, or the
/// text of one Parse).
#[derive(Debug, Clone)]
pub struct Analysis {
    /// One entry per statement, in execution order. Empty when the text holds
    /// no statement (empty string, only comments or semicolons).
    pub statements: Vec<StatementFacts>,
    /// Set when the text does not parse. The message may quote the client's
    /// text, so it goes to the client only, never to the audit.
    pub parse_error: Option<String>,
    /// Whether texts of the same shape (numbers aside) get these very facts:
    /// false when a number is an option's value (`EXPLAIN (ANALYZE 0)`).
    pub shareable: bool,
}

/// Facts about one statement.
#[derive(Debug, Clone, Serialize)]
pub struct StatementFacts {
    /// The statement with every literal replaced by `$n`: safe to audit.
    pub text: String,
    /// libpg_query's fingerprint: equal for statements that differ only in
    /// literals.
    pub fingerprint: String,
    /// The top-level kind first, then the kinds of statements nested in it
    /// (EXPLAIN, PREPARE, CTEs, COPY (query), DECLARE CURSOR).
    pub kinds: Vec<&'static str>,
    pub objects: Vec<ObjectRef>,
    /// Functions called anywhere, lower-cased, qualified as written.
    pub functions: Vec<String>,
    pub features: Vec<Feature>,
    /// What the statement does to the session's prepared statements, which
    /// the extended protocol can Bind by name.
    #[serde(skip)]
    pub prepared_effect: PreparedEffect,
    /// Which source columns flow into the rows it returns (for masking).
    #[serde(skip)]
    pub output: lineage::Output,
    /// The audited fields (text, fingerprint, kinds, objects, functions) as
    /// JSON object members, serialised once however often it runs.
    #[serde(skip)]
    pub audit_json: std::sync::OnceLock<String>,
}

impl StatementFacts {
    pub fn audit_members(&self) -> &str {
        self.audit_json.get_or_init(|| {
            #[derive(Serialize)]
            struct Audited<'a> {
                text: &'a str,
                fingerprint: &'a str,
                kinds: &'a [&'static str],
                objects: &'a [ObjectRef],
                functions: &'a [String],
            }
            let whole = serde_json::to_string(&Audited {
                text: &self.text,
                fingerprint: &self.fingerprint,
                kinds: &self.kinds,
                objects: &self.objects,
                functions: &self.functions,
            })
            .unwrap_or_else(|_| "{}".into());
            whole
                .strip_prefix('{')
                .and_then(|w| w.strip_suffix('}'))
                .unwrap_or("")
                .to_owned()
        })
    }
}

/// SQL-level PREPARE and DEALLOCATE create and drop the same prepared
/// statements a protocol-level Parse does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PreparedEffect {
    #[default]
    None,
    Prepare(String),
    Deallocate(String),
    DeallocateAll,
}

fn prepared_effect(node: Option<&NodeEnum>) -> PreparedEffect {
    match node {
        Some(NodeEnum::PrepareStmt(p)) => PreparedEffect::Prepare(p.name.clone()),
        Some(NodeEnum::DeallocateStmt(d)) if d.isall => PreparedEffect::DeallocateAll,
        Some(NodeEnum::DeallocateStmt(d)) => PreparedEffect::Deallocate(d.name.clone()),
        Some(NodeEnum::DiscardStmt(d)) if d.target == protobuf::DiscardMode::DiscardAll as i32 => {
            PreparedEffect::DeallocateAll
        }
        _ => PreparedEffect::None,
    }
}

/// Parses `text` and returns its facts. Never panics on any input.
pub fn analyze(text: &str) -> Analysis {
    let parsed = match pg_query::parse(text, pg_query::ParserOptions::DEFAULT) {
        Ok(p) => p,
        Err(e) => {
            return Analysis {
                statements: Vec::new(),
                parse_error: Some(e.to_string()),
                shareable: false,
            }
        }
    };
    let mut shareable = true;
    let single = parsed.protobuf.stmts.len() == 1;
    let mut statements = Vec::with_capacity(parsed.protobuf.stmts.len());
    for raw in &parsed.protobuf.stmts {
        // One statement (the common case) is described by the parse already
        // made; in a multi-statement text each piece is parsed on its own so
        // its tables and functions are its own.
        let facts = match statement_text(text, raw) {
            Some(piece) if single => statement_facts(piece, raw, &parsed),
            Some(piece) => pg_query::parse(piece, pg_query::ParserOptions::DEFAULT)
                .map_err(|e| e.to_string())
                .and_then(|own| statement_facts(piece, raw, &own)),
            None => Err("statement bounds fall outside the text".to_owned()),
        };
        match facts {
            Ok((f, numbers_matter)) => {
                shareable &= !numbers_matter;
                statements.push(f)
            }
            Err(e) => {
                return Analysis {
                    statements: Vec::new(),
                    parse_error: Some(e),
                    shareable: false,
                }
            }
        }
    }
    Analysis {
        statements,
        parse_error: None,
        shareable,
    }
}

/// The source text of one raw statement: `stmt_len` 0 means "to the end".
fn statement_text<'a>(text: &'a str, raw: &protobuf::RawStmt) -> Option<&'a str> {
    let start = usize::try_from(raw.stmt_location).ok()?;
    let end = match usize::try_from(raw.stmt_len).ok()? {
        0 => text.len(),
        n => start.checked_add(n)?,
    };
    text.get(start..end)
}

fn statement_facts(
    piece: &str,
    raw: &protobuf::RawStmt,
    parsed: &pg_query::ParseResult,
) -> Result<(StatementFacts, bool), String> {
    let normalized = pg_query::normalize(piece).map_err(|e| e.to_string())?;
    let fingerprint = pg_query::fingerprint(piece, pg_query::ParserOptions::DEFAULT, 0)
        .map_err(|e| e.to_string())?
        .hex;

    let top = raw.stmt.as_ref().and_then(|n| n.node.as_ref());
    let kind = top.map(statement_kind).unwrap_or("unknown");
    // The walk sees the statement's own tree, whichever parse it came from.
    let own = match parsed.protobuf.stmts.as_slice() {
        [only] => only,
        _ => raw,
    };
    let tree = serde_json::to_value(own).map_err(|e| e.to_string())?;
    let facts = facts::collect(kind, &tree);
    let output = lineage::output(&tree);
    let numbers_matter = has_option_number(&tree);

    Ok((
        StatementFacts {
            text: normalized,
            fingerprint,
            kinds: facts.kinds,
            objects: facts.objects.into_iter().collect(),
            functions: facts.functions.into_iter().collect(),
            features: facts.features.into_iter().collect(),
            prepared_effect: prepared_effect(top),
            output,
            audit_json: Default::default(),
        },
        numbers_matter,
    ))
}

/// Whether a number sits where its value changes the facts: an option's
/// argument (`Integer`/`Float` nodes; expression constants are `AConst`).
fn has_option_number(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Object(m) => m
            .iter()
            .any(|(k, x)| k == "Integer" || k == "Float" || has_option_number(x)),
        serde_json::Value::Array(a) => a.iter().any(has_option_number),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_statements_like_the_server() {
        let a = analyze("COPY t FROM STDIN;\nDROP TABLE x;");
        assert_eq!(a.statements.len(), 2);
        assert_eq!(a.statements[0].kinds[0], "copy_in");
        assert_eq!(a.statements[1].kinds[0], "ddl");
    }

    #[test]
    fn literals_never_reach_the_text() {
        let a = analyze("SELECT * FROM customers WHERE email = 'ada@example.com' AND id = 42");
        let s = &a.statements[0];
        assert!(!s.text.contains("ada@example.com"), "{}", s.text);
        assert!(!s.text.contains("42"), "{}", s.text);
        assert_eq!(s.objects[0].name, "public.customers");
    }

    #[test]
    fn sql_prepare_and_deallocate_are_recognised() {
        let a = analyze("PREPARE q(int) AS SELECT $1; DEALLOCATE q; DEALLOCATE ALL; DISCARD ALL");
        let effects: Vec<_> = a
            .statements
            .iter()
            .map(|s| s.prepared_effect.clone())
            .collect();
        assert_eq!(
            effects,
            [
                PreparedEffect::Prepare("q".into()),
                PreparedEffect::Deallocate("q".into()),
                PreparedEffect::DeallocateAll,
                PreparedEffect::DeallocateAll
            ]
        );
    }

    #[test]
    fn garbage_is_a_parse_error_not_a_panic() {
        for text in ["SELEC 1", "'", "\u{0}", "SELECT $$", "DO $$ BEGIN"] {
            let a = analyze(text);
            assert!(a.parse_error.is_some(), "{text:?} parsed");
        }
        assert!(analyze("").statements.is_empty());
        assert!(analyze(" ; -- nothing").parse_error.is_none());
    }
}
