//! Analyses cached by statement text, and by shape.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{analyze, shape::shape, Analysis};

/// A bounded, process-wide cache of analyses, so a statement a driver sends
/// again and again is parsed once. Keyed by the exact text and, for
/// analyses that allow it, by the text's shape (numbers replaced): texts
/// that differ in a string literal are never merged, since a string can
/// change a decision (`set_config('role', ...)`); a number only can where
/// it is an option's value, and such analyses are not shared.
pub struct AnalysisCache {
    entries: Mutex<Maps>,
    capacity: usize,
}

/// Keys are the client's text (as bytes: a text off the wire is found
/// before it is checked to be UTF-8), hashed on every statement: a fast
/// hasher (foldhash) rather than SipHash, since the gateway's own bounded
/// cache is cleared when full and cannot be flooded into slowness.
type Map = HashMap<Box<[u8]>, Arc<Analysis>, foldhash::fast::RandomState>;

#[derive(Default)]
struct Maps {
    /// By exact text: texts without numbers, and analyses not shareable.
    /// Every key was a `str`, so bytes equal to one are UTF-8.
    exact: Map,
    /// By shape (numbers replaced), for shareable analyses.
    shapes: Map,
}

enum ByShape {
    Hit(Arc<Analysis>),
    /// Not cached: the shape, to insert under.
    Miss(Box<[u8]>),
    /// The text has no number to replace.
    NoShape,
}

/// The largest shape buffer kept for the next statement.
const SHAPE_BUFFER_KEPT: usize = 64 * 1024;

thread_local! {
    /// Where each statement's shape is written: one buffer per thread,
    /// reused, so a cache hit allocates nothing.
    static SHAPE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl AnalysisCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(Maps::default()),
            capacity,
        }
    }

    pub fn analyze(&self, text: &str) -> Arc<Analysis> {
        self.known(text.as_bytes())
            .unwrap_or_else(|| self.analyze_unknown(text))
    }

    /// The analysis of exactly this text, when cached. Looked at first: a
    /// text with no number in it (parameters, prepared statements) is found
    /// without scanning it for one. Bytes found here are UTF-8, since every
    /// key was a `str`.
    pub fn known(&self, text: &[u8]) -> Option<Arc<Analysis>> {
        self.lock().exact.get(text).map(Arc::clone)
    }

    /// `analyze` for a text `known` did not find.
    pub fn analyze_unknown(&self, text: &str) -> Arc<Analysis> {
        let shaped = match SHAPE.with_borrow_mut(|buf| self.by_shape(text, buf)) {
            ByShape::Hit(hit) => return hit,
            ByShape::Miss(key) => Some(key),
            ByShape::NoShape => None,
        };
        let analysis = Arc::new(analyze(text));
        let mut maps = self.lock();
        // Dropping everything when full is crude but bounded and O(1)
        // amortised; the working set of a driver is small.
        if maps.exact.len() + maps.shapes.len() >= self.capacity {
            maps.exact.clear();
            maps.shapes.clear();
        }
        match shaped {
            Some(key) if analysis.shareable => {
                maps.shapes.insert(key, Arc::clone(&analysis));
            }
            _ => {
                maps.exact
                    .insert(Box::from(text.as_bytes()), Arc::clone(&analysis));
            }
        }
        analysis
    }

    fn by_shape(&self, text: &str, buf: &mut Vec<u8>) -> ByShape {
        let found = if shape(text, buf) {
            match self.lock().shapes.get(buf.as_slice()) {
                Some(hit) => ByShape::Hit(Arc::clone(hit)),
                None => ByShape::Miss(Box::from(buf.as_slice())),
            }
        } else {
            ByShape::NoShape
        };
        // One huge statement must not pin its size for the thread's life.
        if buf.capacity() > SHAPE_BUFFER_KEPT {
            *buf = Vec::new();
        }
        found
    }

    pub fn clear(&self) {
        let mut maps = self.lock();
        maps.exact.clear();
        maps.shapes.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        // A panic while holding the lock cannot leave the map inconsistent
        // (inserts are single calls), so a poisoned lock is still usable.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only bytes equal to a text analysed before are known: they need no
    /// UTF-8 check of their own.
    #[test]
    fn known_texts_are_found_by_their_exact_bytes() {
        let c = AnalysisCache::new(16);
        assert!(c.known(b"SELECT $1").is_none());
        let a = c.analyze("SELECT $1");
        assert!(c.known(b"SELECT $1").is_some_and(|k| Arc::ptr_eq(&k, &a)));
        assert!(c.known(b"SELECT $1\xff").is_none());
        assert!(c.known(b"SELECT $").is_none());
    }

    #[test]
    fn numbers_share_an_analysis_strings_and_options_do_not() {
        let c = AnalysisCache::new(100);
        let a = c.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = 1");
        let b = c.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = 2");
        assert!(Arc::ptr_eq(&a, &b));
        let x = c.analyze("SELECT set_config('role', 'x', false)");
        let y = c.analyze("SELECT set_config('work_mem', 'x', false)");
        assert!(!Arc::ptr_eq(&x, &y));
        let on = c.analyze("EXPLAIN (ANALYZE 1) DELETE FROM t");
        let off = c.analyze("EXPLAIN (ANALYZE 0) DELETE FROM t");
        assert!(!Arc::ptr_eq(&on, &off));
        assert_ne!(on.statements[0].features, off.statements[0].features);
    }

    /// Pairs of statements the corpus policy judges differently: through the
    /// cache, each keeps its own verdict, in either order.
    #[test]
    fn the_cache_never_merges_statements_judged_differently() {
        let text = include_str!("../../../policies/corpus.yaml");
        let policy = crate::policy::compile(&[("corpus.yaml".into(), text.to_owned())]).unwrap();
        let pairs = [
            (
                "SELECT set_config('role', 'postgres', false)",
                "SELECT set_config('application_name', 'postgres', false)",
            ),
            ("COPY orders TO '/tmp/orders'", "COPY orders TO STDOUT"),
            (
                "EXPLAIN (ANALYZE 1) DELETE FROM orders",
                "EXPLAIN (ANALYZE 0) DELETE FROM orders",
            ),
            (
                "EXPLAIN (ANALYZE 7, VERBOSE 0) UPDATE orders SET note = 'x'",
                "EXPLAIN (ANALYZE 0, VERBOSE 7) UPDATE orders SET note = 'x'",
            ),
            ("SELECT pg_read_file('x', 0, 10)", "SELECT upper('x')"),
        ];
        for (a, b) in pairs {
            for order in [[a, b], [b, a]] {
                let c = AnalysisCache::new(100);
                let first = crate::policy::decide(Some(&policy), &[0], &c.analyze(order[0]));
                let second = crate::policy::decide(Some(&policy), &[0], &c.analyze(order[1]));
                let alone = |sql| crate::policy::decide(Some(&policy), &[0], &analyze(sql));
                assert_eq!(first.action, alone(order[0]).action, "{}", order[0]);
                assert_eq!(second.action, alone(order[1]).action, "{}", order[1]);
                assert_ne!(first.action, second.action, "{a} / {b}");
            }
        }
    }
}
