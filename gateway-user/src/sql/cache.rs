//! Analyses cached by statement text.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{analyze, Analysis};

/// A bounded, process-wide cache of analyses keyed by the exact text, so a
/// statement a driver sends again and again is parsed once. The key is the
/// full text, literals included: two texts that differ only in a literal
/// can be judged differently, so they are never merged.
pub struct AnalysisCache {
    entries: Mutex<HashMap<Arc<str>, Arc<Analysis>>>,
    capacity: usize,
}

impl AnalysisCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    pub fn analyze(&self, text: &str) -> Arc<Analysis> {
        if let Some(hit) = self.lock().get(text) {
            return Arc::clone(hit);
        }
        let analysis = Arc::new(analyze(text));
        let mut entries = self.lock();
        // Dropping everything when full is crude but bounded and O(1)
        // amortised; the working set of a driver is small.
        if entries.len() >= self.capacity {
            entries.clear();
        }
        entries.insert(Arc::from(text), Arc::clone(&analysis));
        analysis
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Analysis>>> {
        // A panic while holding the lock cannot leave the map inconsistent
        // (inserts are single calls), so a poisoned lock is still usable.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}
