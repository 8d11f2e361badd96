//! Prepared statements and portals by name.
//!
//! Drivers send almost every statement through the unnamed statement and
//! portal, redefining them for each execution, so those two live in a slot
//! of their own: the per-statement path hashes nothing. Lookups take the
//! borrowed name from the message; an owned key is made only for a new name.

use std::collections::HashMap;

use crate::wire::frontend::Target;

/// Per-session maps keyed by names the client chooses, looked up on every
/// message: a fast hasher (each session's maps are its own).
pub(super) type Fast = foldhash::fast::RandomState;

/// Values by statement (or portal) name, the unnamed one kept apart.
#[derive(Debug)]
pub struct ByName<V> {
    unnamed: Option<V>,
    named: HashMap<String, V, Fast>,
}

impl<V> Default for ByName<V> {
    fn default() -> Self {
        Self {
            unnamed: None,
            named: HashMap::default(),
        }
    }
}

impl<V> ByName<V> {
    pub fn get(&self, name: &str) -> Option<&V> {
        if name.is_empty() {
            self.unnamed.as_ref()
        } else {
            self.named.get(name)
        }
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.unnamed.is_none() && self.named.is_empty()
    }

    /// Sets `name`'s value, replacing any earlier one.
    pub fn insert(&mut self, name: &str, v: V) {
        if name.is_empty() {
            self.unnamed = Some(v);
            return;
        }
        match self.named.get_mut(name) {
            Some(old) => *old = v,
            None => {
                self.named.insert(name.to_owned(), v);
            }
        }
    }

    pub fn remove(&mut self, name: &str) -> Option<V> {
        if name.is_empty() {
            self.unnamed.take()
        } else if self.named.is_empty() {
            // Most sessions keep no named ones: skip hashing the name.
            None
        } else {
            self.named.remove(name)
        }
    }

    /// What `DEALLOCATE ALL` drops: PostgreSQL keeps the unnamed statement
    /// outside its table of named ones, and so does this.
    pub fn clear_named(&mut self) {
        self.named.clear();
    }
}

/// Values kept per prepared statement and per portal: two namespaces, as
/// in PostgreSQL, where a statement and a portal may share a name.
#[derive(Debug)]
pub struct Named<V> {
    statements: ByName<V>,
    portals: ByName<V>,
}

impl<V> Default for Named<V> {
    fn default() -> Self {
        Self {
            statements: ByName::default(),
            portals: ByName::default(),
        }
    }
}

impl<V> Named<V> {
    fn of<'n>(&self, t: Target<'n>) -> (&ByName<V>, &'n str) {
        match t {
            Target::Statement(n) => (&self.statements, n),
            Target::Portal(n) => (&self.portals, n),
        }
    }

    fn of_mut<'n>(&mut self, t: Target<'n>) -> (&mut ByName<V>, &'n str) {
        match t {
            Target::Statement(n) => (&mut self.statements, n),
            Target::Portal(n) => (&mut self.portals, n),
        }
    }

    pub fn get(&self, t: Target<'_>) -> Option<&V> {
        let (by, name) = self.of(t);
        by.get(name)
    }

    pub fn contains(&self, t: Target<'_>) -> bool {
        self.get(t).is_some()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.statements.is_empty() && self.portals.is_empty()
    }

    pub fn insert(&mut self, t: Target<'_>, v: V) {
        let (by, name) = self.of_mut(t);
        by.insert(name, v);
    }

    pub fn remove(&mut self, t: Target<'_>) {
        let (by, name) = self.of_mut(t);
        by.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unnamed_and_named_entries_are_separate_names() {
        let mut b = ByName::default();
        assert!(b.is_empty());
        b.insert("", 1);
        b.insert("s", 2);
        b.insert("", 3);
        assert_eq!(
            (b.get(""), b.get("s"), b.get("t")),
            (Some(&3), Some(&2), None)
        );
        assert_eq!(b.remove(""), Some(3));
        assert!(b.get("").is_none() && b.get("s").is_some());
        assert_eq!(b.remove("t"), None);
        b.insert("", 4);
        b.clear_named();
        assert_eq!((b.get(""), b.get("s")), (Some(&4), None));
    }

    #[test]
    fn statements_and_portals_of_one_name_are_kept_apart() {
        for name in ["", "s"] {
            let mut n = Named::default();
            assert!(n.is_empty());
            n.insert(Target::Statement(name), 1);
            n.insert(Target::Portal(name), 2);
            n.insert(Target::Portal(name), 3);
            assert_eq!(n.get(Target::Statement(name)), Some(&1));
            assert_eq!(n.get(Target::Portal(name)), Some(&3));
            n.remove(Target::Statement(name));
            assert!(!n.contains(Target::Statement(name)));
            assert!(n.contains(Target::Portal(name)));
            n.remove(Target::Portal(name));
            assert!(n.is_empty(), "{name:?}");
        }
    }
}
