//! The policy in force, swapped atomically on reload.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use super::{compile, read_policy_path, Policy};

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    Applied {
        label: String,
    },
    /// The new files were invalid; the old policy stays in force.
    Rejected {
        problems: Vec<String>,
    },
}

/// Reads and checks the policy at `path`; every problem as one line.
pub fn load(path: &Path) -> Result<Policy, Vec<String>> {
    let sources = read_policy_path(path).map_err(|e| vec![e.to_string()])?;
    compile(&sources).map_err(|ps| ps.iter().map(|p| p.to_string()).collect())
}

type Signature = Vec<(PathBuf, Option<SystemTime>, u64)>;

pub struct PolicyStore {
    path: Option<PathBuf>,
    current: RwLock<Option<Arc<Policy>>>,
    version: AtomicU64,
    seen: RwLock<Signature>,
}

impl PolicyStore {
    /// The policy at `path` (it must be valid), or none: the built-in floor
    /// only.
    pub fn open(path: Option<&Path>) -> Result<Self, Vec<String>> {
        let policy = match path {
            Some(p) => Some(Arc::new(load(p)?)),
            None => None,
        };
        let store = Self {
            path: path.map(Path::to_owned),
            current: RwLock::new(policy),
            version: AtomicU64::new(1),
            seen: RwLock::new(Vec::new()),
        };
        let sig = store.signature();
        *store.seen.write().unwrap_or_else(|p| p.into_inner()) = sig;
        Ok(store)
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The policy in force and its version (bumped by every applied reload).
    pub fn current(&self) -> (u64, Option<Arc<Policy>>) {
        let guard = self.current.read().unwrap_or_else(|p| p.into_inner());
        (self.version.load(Ordering::Acquire), guard.clone())
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Files, modification times and sizes: what a change would alter.
    fn signature(&self) -> Signature {
        let Some(path) = &self.path else {
            return Vec::new();
        };
        let mut files = vec![path.clone()];
        if path.is_dir() {
            if let Ok(rd) = std::fs::read_dir(path) {
                files.extend(rd.filter_map(|e| e.ok().map(|e| e.path())));
            }
        }
        files.sort();
        files
            .into_iter()
            .map(|f| {
                let meta = std::fs::metadata(&f).ok();
                let mtime = meta.as_ref().and_then(|m| m.modified().ok());
                let len = meta.map(|m| m.len()).unwrap_or(0);
                (f, mtime, len)
            })
            .collect()
    }

    /// True when the files changed since the last load or check.
    pub fn changed_on_disk(&self) -> bool {
        let sig = self.signature();
        let mut seen = self.seen.write().unwrap_or_else(|p| p.into_inner());
        if *seen == sig {
            return false;
        }
        *seen = sig;
        true
    }

    /// Loads, checks and swaps in the policy files; keeps the old policy
    /// when the new one is invalid.
    pub fn reload(&self) -> Option<ReloadOutcome> {
        let path = self.path.as_ref()?;
        Some(match load(path) {
            Ok(p) => {
                let label = p.label.to_string();
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(p));
                self.version.fetch_add(1, Ordering::AcqRel);
                ReloadOutcome::Applied { label }
            }
            Err(problems) => ReloadOutcome::Rejected { problems },
        })
    }
}
