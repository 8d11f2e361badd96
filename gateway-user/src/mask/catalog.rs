//! The catalog cache: table OIDs and attribute numbers to names, parents
//! (partitions, inheritance) and view definitions, fetched over the
//! gateway's own upstream connection, one cache per database.
//!
//! It is filled on demand (a lookup miss fetches), dropped when a DDL
//! statement completes through the gateway, and aged out after a minute so
//! that changes made around the gateway are seen too.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::session::upstream::{self, Upstream, UpstreamSettings};
use crate::session::ReadError;
use crate::sql::lineage::{Lineage, RelName};
use crate::wire::{backend, frontend, rows};

const MAX_AGE: Duration = Duration::from_secs(60);
/// Views on views on partitions...: how deep a lookup follows.
const MAX_ROUNDS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog connection: {0}")]
    Upstream(#[from] upstream::UpstreamError),
    #[error("catalog query: {0}")]
    Io(#[from] std::io::Error),
    #[error("catalog query: {0}")]
    Read(#[from] ReadError),
    /// The server refused the query; the connection is still usable.
    #[error("catalog query failed: {0}")]
    Query(String),
    /// The server's answer could not be read; the connection is not usable.
    #[error("catalog answer unreadable: {0}")]
    Protocol(String),
}

/// One table, view, partition or other relation.
#[derive(Debug)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// pg_class.relkind: r, p, v, m, f, ...
    pub kind: String,
    /// (attnum, name), user columns in order.
    pub columns: Vec<(i16, String)>,
    /// Direct parents: the partitioned table or inheritance parents.
    pub parents: Vec<u32>,
    /// For a view: what each of its columns is made of.
    pub view: Option<Arc<Lineage>>,
}

impl Relation {
    pub fn column(&self, attnum: i16) -> Option<&str> {
        self.columns
            .iter()
            .find(|(n, _)| *n == attnum)
            .map(|(_, c)| c.as_str())
    }

    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

#[derive(Debug, Default)]
pub struct State {
    pub by_oid: HashMap<u32, Arc<Relation>>,
    by_name: HashMap<String, Vec<u32>>,
    /// Names already asked for (found or not).
    asked: HashSet<String>,
    /// OIDs asked for and not found.
    missing: HashSet<u32>,
    filled: Option<Instant>,
}

impl State {
    /// Relations a name as written may mean: with a schema, that one; without,
    /// any schema's (the session's search_path is its own).
    pub fn named(&self, rel: &RelName) -> Vec<&Arc<Relation>> {
        self.by_name
            .get(&rel.name)
            .into_iter()
            .flatten()
            .filter_map(|oid| self.by_oid.get(oid))
            .filter(|r| rel.schema.as_ref().is_none_or(|s| *s == r.schema))
            .collect()
    }

    /// Whether an OID was looked up and does not exist.
    pub fn known_missing(&self, oid: u32) -> bool {
        self.missing.contains(&oid)
    }
}

/// One database's cache and the connection that fills it.
pub struct Catalog {
    settings: UpstreamSettings,
    addr: String,
    database: String,
    conn: tokio::sync::Mutex<Option<Upstream>>,
    state: RwLock<State>,
    /// Changes whenever what the cache knows changes, so plans made from it
    /// can be reused until then.
    generation: std::sync::atomic::AtomicU64,
    /// Catalog queries sent so far.
    lookups: std::sync::atomic::AtomicU64,
}

impl Catalog {
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Forget everything (the schema changed).
    pub fn invalidate(&self) {
        *self.write() = State::default();
        self.bump();
    }

    /// How many catalog queries this cache has sent.
    pub fn lookups(&self) -> u64 {
        self.lookups.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    fn bump(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Makes sure the relations with these OIDs and names, their parents and
    /// what their views read are in the cache.
    pub async fn ensure(&self, oids: &[u32], names: &[&RelName]) -> Result<(), CatalogError> {
        {
            // Checked under the write lock: of the sessions that find the
            // cache too old, only the first empties it.
            let mut s = self.write();
            if s.filled.is_some_and(|t| t.elapsed() > MAX_AGE) {
                *s = State::default();
                self.bump();
            }
        }
        let mut want_oids: Vec<u32> = oids.to_vec();
        let mut want_names: Vec<String> = names.iter().map(|n| n.name.clone()).collect();
        for _ in 0..MAX_ROUNDS {
            if self.known_already(&mut want_oids, &mut want_names) {
                return Ok(());
            }
            // One lookup at a time per database. Sessions that waited here
            // for one that was fetching the same relations (all of them, after
            // the cache aged out) find them cached and ask nothing.
            let mut conn = self.conn.lock().await;
            if self.known_already(&mut want_oids, &mut want_names) {
                return Ok(());
            }
            self.lookups
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let found = self.fetch(&mut conn, &want_oids, &want_names).await?;
            drop(conn);
            let mut next_oids = Vec::new();
            let mut next_names = Vec::new();
            let mut s = self.write();
            s.filled.get_or_insert_with(Instant::now);
            self.bump();
            for n in &want_names {
                s.asked.insert(n.clone());
            }
            for o in &want_oids {
                if !found.iter().any(|r| r.oid == *o) {
                    s.missing.insert(*o);
                }
            }
            for r in found {
                next_oids.extend(r.parents.iter().copied());
                if let Some(v) = &r.view {
                    next_names.extend(v.relations().into_iter().map(|n| n.name.clone()));
                }
                let ids = s.by_name.entry(r.name.clone()).or_default();
                if !ids.contains(&r.oid) {
                    ids.push(r.oid);
                }
                s.by_oid.insert(r.oid, Arc::new(r));
            }
            want_oids = next_oids;
            want_names = next_names;
        }
        Ok(())
    }

    /// Drops what the cache already knows from the wanted lists; true when
    /// nothing is left to ask.
    fn known_already(&self, oids: &mut Vec<u32>, names: &mut Vec<String>) -> bool {
        {
            let s = self.read();
            oids.retain(|o| *o != 0 && !s.by_oid.contains_key(o) && !s.missing.contains(o));
            names.retain(|n| !s.asked.contains(n));
        }
        oids.sort_unstable();
        oids.dedup();
        names.sort();
        names.dedup();
        oids.is_empty() && names.is_empty()
    }

    async fn fetch(
        &self,
        guard: &mut Option<Upstream>,
        oids: &[u32],
        names: &[String],
    ) -> Result<Vec<Relation>, CatalogError> {
        let sql = lookup_sql(oids, names);
        // One retry on a fresh connection: the old one may have been closed
        // by the server (idle timeout, restart).
        for attempt in 0..2 {
            // The connection is taken out while a query is on it and put
            // back only when the exchange finished: a lookup dropped half-way
            // (its session ended) takes its connection with it, instead of
            // leaving an unread answer for the next lookup to take as its own.
            let mut conn = match guard.take() {
                Some(c) => c,
                None => {
                    let params = [
                        ("user", self.settings.user.as_str()),
                        ("database", self.database.as_str()),
                        ("application_name", "agentgate-catalog"),
                    ];
                    upstream::connect(&self.settings, &self.addr, 196608, &params).await?
                }
            };
            match simple_query(&mut conn, &sql).await {
                Ok(text) => {
                    *guard = Some(conn);
                    return parse_relations(&text);
                }
                // The server answered with an error and is ready again.
                Err(e @ CatalogError::Query(_)) => {
                    *guard = Some(conn);
                    return Err(e);
                }
                Err(e) if attempt == 0 => {
                    tracing::debug!(error = %e, "catalog connection lost; reconnecting");
                }
                Err(e) => return Err(e),
            }
        }
        Err(CatalogError::Query("no catalog connection".into()))
    }
}

fn quote_literal(s: &str) -> String {
    // standard_conforming_strings is on for the gateway's own connection
    // (the server default); only the quote needs doubling.
    format!("'{}'", s.replace('\'', "''"))
}

fn lookup_sql(oids: &[u32], names: &[String]) -> String {
    let oid_list = if oids.is_empty() {
        "NULL".to_owned()
    } else {
        oids.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let name_list = if names.is_empty() {
        "NULL".to_owned()
    } else {
        names
            .iter()
            .map(|n| quote_literal(n))
            .collect::<Vec<_>>()
            .join(",")
    };
    format!(
        "SELECT coalesce(json_agg(json_build_object(\
           'oid', c.oid::int8, 'schema', n.nspname, 'name', c.relname, 'kind', c.relkind, \
           'columns', (SELECT coalesce(json_agg(json_build_array(a.attnum, a.attname) ORDER BY a.attnum), '[]') \
                       FROM pg_catalog.pg_attribute a \
                       WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), \
           'parents', (SELECT coalesce(json_agg(i.inhparent::int8), '[]') FROM pg_catalog.pg_inherits i \
                       WHERE i.inhrelid = c.oid), \
           'view', CASE WHEN c.relkind IN ('v', 'm') THEN pg_catalog.pg_get_viewdef(c.oid) END)), '[]') \
         FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.oid IN ({oid_list}) OR c.relname IN ({name_list})"
    )
}

#[derive(serde::Deserialize)]
struct RawRelation {
    oid: u32,
    schema: String,
    name: String,
    kind: String,
    columns: Vec<(i16, String)>,
    parents: Vec<u32>,
    view: Option<String>,
}

fn parse_relations(text: &str) -> Result<Vec<Relation>, CatalogError> {
    let raw: Vec<RawRelation> =
        serde_json::from_str(text).map_err(|e| CatalogError::Query(e.to_string()))?;
    Ok(raw
        .into_iter()
        .map(|r| {
            let view = r.view.as_deref().map(|def| {
                let a = crate::sql::analyze(def);
                // A view whose definition the gateway cannot read is treated
                // as reading nothing it can name; its columns still resolve
                // through the server's own RowDescription where plain.
                a.statements
                    .into_iter()
                    .next()
                    .and_then(|s| s.output.lineage)
                    .unwrap_or_default()
            });
            Relation {
                oid: r.oid,
                schema: r.schema,
                name: r.name,
                kind: r.kind,
                columns: r.columns,
                parents: r.parents,
                view,
            }
        })
        .collect())
}

/// Runs one query on the catalog connection; returns the first value of
/// the first row.
async fn simple_query(conn: &mut Upstream, sql: &str) -> Result<String, CatalogError> {
    conn.conn.write_all(frontend::query(sql).as_bytes()).await?;
    conn.conn.flush().await?;
    let splitter = upstream::backend_splitter();
    let mut value = None;
    let mut error = None;
    loop {
        let frame = crate::session::read_frame(&mut conn.conn, &mut conn.buf, splitter).await?;
        match frame.tag() {
            rows::DATA_ROW if value.is_none() => {
                let row = rows::decode_data_row(frame.body())
                    .map_err(|e| CatalogError::Protocol(e.to_string()))?;
                value = row
                    .first()
                    .copied()
                    .flatten()
                    .map(|v| String::from_utf8_lossy(v).into_owned());
            }
            backend::ERROR_RESPONSE => {
                let f = backend::decode_error_fields(frame.tag(), frame.body())
                    .map_err(|e| CatalogError::Protocol(e.to_string()))?;
                error = Some(format!("{} ({})", f.message, f.code));
            }
            backend::READY_FOR_QUERY => break,
            _ => {}
        }
    }
    if let Some(e) = error {
        return Err(CatalogError::Query(e));
    }
    value.ok_or_else(|| CatalogError::Query("no answer".into()))
}

/// Every database's catalog.
pub struct Catalogs {
    settings: UpstreamSettings,
    by_db: std::sync::Mutex<HashMap<(String, String), Arc<Catalog>>>,
}

impl Catalogs {
    pub fn new(settings: UpstreamSettings) -> Self {
        Self {
            settings,
            by_db: Default::default(),
        }
    }

    pub fn get(&self, addr: &str, database: &str) -> Arc<Catalog> {
        let mut map = self.by_db.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(
            map.entry((addr.to_owned(), database.to_owned()))
                .or_insert_with(|| {
                    Arc::new(Catalog {
                        settings: self.settings.clone(),
                        addr: addr.to_owned(),
                        database: database.to_owned(),
                        conn: tokio::sync::Mutex::new(None),
                        state: RwLock::new(State::default()),
                        generation: Default::default(),
                        lookups: Default::default(),
                    })
                }),
        )
    }

    /// A DDL statement completed in `database`: its names may have changed.
    pub fn invalidate(&self, addr: &str, database: &str) {
        let map = self.by_db.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(&(addr.to_owned(), database.to_owned())) {
            c.invalidate();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_quotes_names() {
        let sql = lookup_sql(&[16384], &["o'brien".into()]);
        assert!(sql.contains("IN (16384)"));
        assert!(sql.contains("IN ('o''brien')"));
        assert!(lookup_sql(&[], &[]).contains("IN (NULL)"));
    }

    #[test]
    fn relations_parse_with_view_lineage() {
        let text = r#"[{"oid":1,"schema":"public","name":"v","kind":"v","columns":[[1,"e"]],"parents":[],
                        "view":" SELECT upper(customers.email) AS e FROM customers;"}]"#;
        let r = parse_relations(text).unwrap();
        let v = r[0].view.as_ref().unwrap();
        assert_eq!(v.columns.as_ref().unwrap().len(), 1);
        assert_eq!(r[0].column(1), Some("e"));
    }
}
