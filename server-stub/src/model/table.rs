//! [`Table`]: one kind of record keyed by id, able to remember what the records a
//! mutation writes looked like before it, so a mutation whose commit fails can be
//! undone in memory without copying the whole state (100k instances in the fleet
//! benchmark).
//!
//! Reads go through `Deref` to the `HashMap`. Every way to write (`get_mut`, `insert`,
//! `remove`) is a method here that first remembers the record while recording is on;
//! there is deliberately no `DerefMut`, so a write that bypasses the journal does not
//! compile (`values_mut`, `iter_mut`, `entry`: add a remembering method first).

use std::collections::HashMap;

/// Records of one kind by id.
#[derive(Debug, Clone)]
pub struct Table<V> {
    map: HashMap<String, V>,
    /// While recording: each written id's record before its first write in this
    /// mutation (`None`: it did not exist).
    before: Option<HashMap<String, Option<V>>>,
}

impl<V> Default for Table<V> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            before: None,
        }
    }
}

impl<V> std::ops::Deref for Table<V> {
    type Target = HashMap<String, V>;
    fn deref(&self) -> &HashMap<String, V> {
        &self.map
    }
}

/// What a recorded mutation changed in one table: `(id, record before)`.
pub type Before<V> = HashMap<String, Option<V>>;

impl<V: Clone> Table<V> {
    pub fn get_mut(&mut self, id: &str) -> Option<&mut V> {
        // One lookup when not recording: the heartbeat hot path comes here.
        if self.before.is_some() && self.map.contains_key(id) {
            self.remember(id);
        }
        self.map.get_mut(id)
    }

    pub fn insert(&mut self, id: String, v: V) -> Option<V> {
        self.remember(&id);
        self.map.insert(id, v)
    }

    pub fn remove(&mut self, id: &str) -> Option<V> {
        if self.before.is_some() && self.map.contains_key(id) {
            self.remember(id);
        }
        self.map.remove(id)
    }

    fn remember(&mut self, id: &str) {
        if let Some(before) = &mut self.before {
            if !before.contains_key(id) {
                before.insert(id.to_string(), self.map.get(id).cloned());
            }
        }
    }

    /// Starts remembering (forgetting whatever an earlier, unfinished recording
    /// held).
    pub(crate) fn record(&mut self) {
        self.before = Some(HashMap::new());
    }

    /// Stops remembering; returns what the writes since [`Table::record`] replaced.
    pub(crate) fn finish(&mut self) -> Before<V> {
        self.before.take().unwrap_or_default()
    }

    /// Puts back what [`Table::finish`] returned; returns the ids put back.
    pub(crate) fn restore(&mut self, before: Before<V>) -> Vec<String> {
        let mut ids = Vec::with_capacity(before.len());
        for (id, old) in before {
            match old {
                Some(v) => {
                    self.map.insert(id.clone(), v);
                }
                None => {
                    self.map.remove(&id);
                }
            }
            ids.push(id);
        }
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_undoes_writes_inserts_and_removes_made_while_recording() {
        let mut t: Table<u32> = Table::default();
        t.insert("a".into(), 1);
        t.insert("b".into(), 2);
        t.insert("c".into(), 3);
        t.record();
        *t.get_mut("a").unwrap() = 10;
        *t.get_mut("a").unwrap() = 11;
        t.remove("b");
        t.insert("d".into(), 4);
        assert!(t.get_mut("zz").is_none());
        let before = t.finish();
        assert_eq!(before.len(), 3, "a, b, d remembered once each: {before:?}");
        // Writes after the recording ended are not remembered.
        *t.get_mut("c").unwrap() = 30;
        t.restore(before);
        let mut all: Vec<_> = t.iter().map(|(k, v)| (k.clone(), *v)).collect();
        all.sort();
        assert_eq!(
            all,
            [("a".into(), 1), ("b".into(), 2), ("c".into(), 30)].to_vec()
        );
    }
}
