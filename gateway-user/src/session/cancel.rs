//! Cancel keys: the client sees the real backend pid with a key the gateway
//! minted, so a cancel reaches the right backend while the database's own
//! key never leaves the gateway.

use std::collections::HashMap;
use std::sync::Mutex;

use rand::Rng;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelTarget {
    pub addr: String,
    pub pid: i32,
    pub key: i32,
}

#[derive(Default)]
pub struct CancelRegistry {
    by_key: Mutex<HashMap<(i32, i32), CancelTarget>>,
}

impl CancelRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(i32, i32), CancelTarget>> {
        self.by_key.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a live backend and returns the key to give the client.
    pub fn register(&self, target: CancelTarget) -> i32 {
        let mut map = self.lock();
        loop {
            let key: i32 = rand::thread_rng().gen();
            if let std::collections::hash_map::Entry::Vacant(e) = map.entry((target.pid, key)) {
                e.insert(target);
                return key;
            }
        }
    }

    pub fn unregister(&self, pid: i32, key: i32) {
        self.lock().remove(&(pid, key));
    }

    pub fn lookup(&self, pid: i32, key: i32) -> Option<CancelTarget> {
        self.lock().get(&(pid, key)).cloned()
    }
}
