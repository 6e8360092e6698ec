//! Desired modules against running ones: the verbs (`attach`, `detach`, `update`)
//! and whether a change needs a reboot. Pure functions over the records, so the
//! sensor can compute each template's desired set once per pass.

use std::collections::BTreeMap;

use powernode_proto::admin::{DriftItem, Template};

use crate::model::InstRec;

/// What a template wants, with the pinned digest of each published module.
#[derive(Debug, Clone, Default)]
pub struct DesiredSet {
    pub root: Vec<String>,
    pub runtime: Vec<String>,
    /// Latest publication's manifest digest per module name (absent: never published).
    pub pinned: BTreeMap<String, String>,
}

impl DesiredSet {
    /// `template` with its module lists already applied; `pinned` from the latest
    /// publications.
    pub fn new(template: &Template, pinned: BTreeMap<String, String>) -> Self {
        Self {
            root: template.root_modules.clone(),
            runtime: template.runtime_modules.clone(),
            pinned,
        }
    }

    fn kind_of(&self, name: &str) -> Option<&'static str> {
        if self.root.iter().any(|m| m == name) {
            Some("root")
        } else if self.runtime.iter().any(|m| m == name) {
            Some("runtime")
        } else {
            None
        }
    }

    fn names(&self) -> impl Iterator<Item = &String> {
        self.root.iter().chain(self.runtime.iter())
    }
}

/// A desired root module that `/` was composed from, by the root facts of the
/// handshake: those arrive before the first heartbeat lists the running modules,
/// and they are the authority on what the root holds.
fn composed_into_root(set: &DesiredSet, name: &str, inst: &InstRec) -> bool {
    set.kind_of(name) == Some("root")
        && set.pinned.get(name).is_some_and(|want| {
            inst.root
                .as_ref()
                .is_some_and(|r| r.modules.iter().any(|d| d == want))
        })
}

fn item(
    module: &str,
    action: &str,
    kind: &str,
    desired: Option<String>,
    running: Option<String>,
) -> DriftItem {
    DriftItem {
        module: module.to_string(),
        action: action.to_string(),
        desired_digest: desired,
        running_digest: running,
        kind: Some(kind.to_string()),
        // Root modules are composed into `/` at boot: only a reboot changes them.
        reboot_required: kind == "root",
    }
}

/// The differences, desired modules in template order first, then modules running
/// that nothing asks for.
pub fn items(set: &DesiredSet, inst: &InstRec) -> Vec<DriftItem> {
    let mut out = Vec::new();
    for name in set.names() {
        let kind = set.kind_of(name).unwrap_or("runtime");
        match inst.modules.iter().find(|m| &m.name == name) {
            None if composed_into_root(set, name, inst) => {}
            None => out.push(item(
                name,
                "attach",
                kind,
                set.pinned.get(name).cloned(),
                None,
            )),
            Some(m) => {
                if let Some(want) = set.pinned.get(name).filter(|d| **d != m.digest) {
                    out.push(item(
                        name,
                        "update",
                        kind,
                        Some(want.clone()),
                        Some(m.digest.clone()),
                    ));
                }
            }
        }
    }
    for m in &inst.modules {
        if set.kind_of(&m.name).is_none() {
            // Not desired any more: root if it was composed into `/`.
            let composed = inst
                .root
                .as_ref()
                .is_some_and(|r| r.modules.contains(&m.digest));
            let kind = if composed { "root" } else { "runtime" };
            out.push(item(&m.name, "detach", kind, None, Some(m.digest.clone())));
        }
    }
    out
}

/// Whether there is any drift, without allocating the items.
pub fn has_drift(set: &DesiredSet, inst: &InstRec) -> bool {
    set.names()
        .any(|name| match inst.modules.iter().find(|m| &m.name == name) {
            None => !composed_into_root(set, name, inst),
            Some(m) => set.pinned.get(name).is_some_and(|d| *d != m.digest),
        })
        || inst.modules.iter().any(|m| set.kind_of(&m.name).is_none())
}

/// A stable key of a drift, so a changed drift fires a fresh signal.
pub fn key(items: &[DriftItem]) -> String {
    items
        .iter()
        .map(|i| {
            format!(
                "{}:{}:{}",
                i.module,
                i.action,
                i.desired_digest.as_deref().unwrap_or("-")
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use powernode_proto::node::{RootFacts, RunningModule};

    fn inst(modules: &[(&str, &str)], root: &[&str]) -> InstRec {
        let mut i = InstRec::new(
            "inst-1".into(),
            "node-1".into(),
            "t".into(),
            "r".into(),
            "recorder".into(),
            0,
        );
        i.status = powernode_proto::InstanceStatus::Running;
        i.modules = modules
            .iter()
            .map(|(n, d)| RunningModule {
                name: n.to_string(),
                version: "1".into(),
                digest: d.to_string(),
            })
            .collect();
        i.root = Some(RootFacts {
            fstype: "overlay".into(),
            modules: root.iter().map(|d| d.to_string()).collect(),
            ..RootFacts::default()
        });
        i
    }

    fn set() -> DesiredSet {
        DesiredSet {
            root: vec!["base".into()],
            runtime: vec!["svc".into(), "new".into()],
            pinned: [
                ("base".to_string(), "sha256:b2".to_string()),
                ("svc".to_string(), "sha256:s1".to_string()),
                ("new".to_string(), "sha256:n1".to_string()),
            ]
            .into(),
        }
    }

    #[test]
    fn verbs_kinds_and_reboot() {
        let i = inst(
            &[
                ("base", "sha256:b1"),
                ("svc", "sha256:s1"),
                ("old", "sha256:o1"),
                ("oldroot", "sha256:r1"),
            ],
            &["sha256:b1", "sha256:r1"],
        );
        let s = set();
        assert!(has_drift(&s, &i));
        let got: Vec<(String, String, Option<String>, bool)> = items(&s, &i)
            .into_iter()
            .map(|d| (d.module, d.action, d.kind, d.reboot_required))
            .collect();
        let want = [
            ("base", "update", "root", true),
            ("new", "attach", "runtime", false),
            ("old", "detach", "runtime", false),
            ("oldroot", "detach", "root", true),
        ];
        assert_eq!(got.len(), want.len(), "{got:?}");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(
                (g.0.as_str(), g.1.as_str(), g.2.as_deref(), g.3),
                (w.0, w.1, Some(w.2), w.3)
            );
        }
        let k = key(&items(&s, &i));
        assert!(k.starts_with("base:update:sha256:b2,"), "{k}");
    }

    #[test]
    fn no_drift_when_running_matches_and_unpublished_is_attach_without_digest() {
        let s = set();
        let i = inst(
            &[
                ("base", "sha256:b2"),
                ("svc", "sha256:s1"),
                ("new", "sha256:n1"),
            ],
            &["sha256:b2"],
        );
        assert!(!has_drift(&s, &i));
        assert!(items(&s, &i).is_empty());
        let mut s = set();
        s.pinned.remove("new");
        let i = inst(&[("base", "sha256:b2"), ("svc", "sha256:s1")], &[]);
        let it = items(&s, &i);
        assert_eq!(it.len(), 1);
        assert_eq!(
            (it[0].action.as_str(), it[0].desired_digest.as_deref()),
            ("attach", None)
        );
    }

    #[test]
    fn root_facts_before_the_first_heartbeat_count_as_attached() {
        let mut s = set();
        s.runtime.clear();
        // Handshake done (root composed from the pinned base), no heartbeat yet.
        let i = inst(&[], &["sha256:b2"]);
        assert!(!has_drift(&s, &i));
        assert!(items(&s, &i).is_empty());
        // Composed from an older base: that is still drift, and needs a reboot.
        let i = inst(&[], &["sha256:b1"]);
        assert!(has_drift(&s, &i));
        let it = items(&s, &i);
        assert_eq!(
            (it[0].action.as_str(), it[0].reboot_required),
            ("attach", true)
        );
    }
}
