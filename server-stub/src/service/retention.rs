//! Retention: records older than `--retention-days` are deleted, so a long-running
//! control plane does not grow without bound. What goes, once older than the
//! retention: finished tasks (by their last change), certificates (by their expiry:
//! a revoked certificate stays while it could still be presented), events, and
//! signals that are no longer active. Nodes, instances and tokens stay: they are
//! the fleet's inventory, not its history.

use std::collections::HashSet;

use crate::model::Op;
use crate::store::{PruneCounts, StoreError};

use super::AppState;

/// How often the server looks for records past their retention.
pub const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

impl AppState {
    /// Deletes what is older than the retention from SQLite and then from memory
    /// (memory changes only after the commit, so a failed write loses nothing).
    pub async fn prune(&self) -> Result<PruneCounts, StoreError> {
        let Some(retention_ms) = self.cfg.retention_ms() else {
            return Ok(PruneCounts::default());
        };
        let _w = self.write_lock.lock().await;
        let now = self.clock.now_ms();
        let cutoff = now.saturating_sub(retention_ms);
        let (tasks, certs, ops) = {
            let mem = self.lock();
            let tasks: HashSet<String> = mem
                .tasks
                .values()
                .filter(|t| t.status.is_final() && t.updated_ms < cutoff)
                .map(|t| t.id.clone())
                .collect();
            // A certificate stays while its node may still ask to reissue it: pruning
            // it sooner would make that node's next call a final refusal.
            let grace_ms = i64::try_from(self.cfg.reissue_grace_seconds)
                .unwrap_or(i64::MAX)
                .saturating_mul(1000);
            let cert_cutoff = cutoff.min(now.saturating_sub(grace_ms));
            let certs: Vec<String> = mem
                .certs
                .values()
                .filter(|c| c.not_after_ms < cert_cutoff)
                .map(|c| c.serial.clone())
                .collect();
            // Instances name their tasks; a pruned task leaves their lists too.
            let ops: Vec<Op> = mem
                .instances
                .values()
                .filter(|i| i.task_ids.iter().any(|t| tasks.contains(t)))
                .map(|i| {
                    let mut i = i.clone();
                    i.task_ids.retain(|t| !tasks.contains(t));
                    Op::Instance(Box::new(i))
                })
                .collect();
            (tasks, certs, ops)
        };
        let counts = self
            .store
            .prune(cutoff, ops, tasks.iter().cloned().collect(), certs.clone())
            .await?;
        let mut mem = self.lock();
        for id in &tasks {
            mem.tasks.remove(id);
        }
        for serial in &certs {
            mem.certs.remove(serial);
        }
        // Only the task lists change here: heartbeats may have moved the rest of an
        // instance on in memory since it was copied above (they are flushed later).
        let trimmed: Vec<String> = mem
            .instances
            .values()
            .filter(|i| i.task_ids.iter().any(|t| tasks.contains(t)))
            .map(|i| i.id.clone())
            .collect();
        for id in &trimmed {
            if let Some(inst) = mem.instances.get_mut(id) {
                inst.task_ids.retain(|t| !tasks.contains(t));
            }
        }
        if counts.total() > 0 {
            tracing::info!(
                tasks = counts.tasks,
                certificates = counts.certs,
                events = counts.events,
                signals = counts.signals,
                retention_days = self.cfg.retention_days,
                "pruned records past their retention"
            );
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use powernode_proto::admin::{CreateNodeRequest, ProvisionRequest, TerminateRequest};

    use crate::clock::Clock;
    use crate::config::Config;
    use crate::provider::Recorder;
    use crate::service::tests::state_from;

    use super::*;

    fn state(dir: &std::path::Path, clock: Clock) -> AppState {
        state_with_days(dir, clock, |_| {})
    }

    fn state_with_days(
        dir: &std::path::Path,
        clock: Clock,
        tune: impl FnOnce(&mut Config),
    ) -> AppState {
        let mut cfg = Config::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap());
        tune(&mut cfg);
        state_from(cfg, clock, Box::new(Recorder { image_base: None }))
    }

    fn node(h: &str) -> CreateNodeRequest {
        CreateNodeRequest {
            hostname: h.into(),
            template_id: crate::catalog::TEMPLATE_EDGE_BASE.into(),
            lifecycle_class: powernode_proto::LifecycleClass::Ephemeral,
            labels: Default::default(),
        }
    }

    /// An old terminated instance loses its finished tasks, expired certificates and
    /// events; what is recent, still open or could still be presented stays, in
    /// memory and in SQLite, and event ids keep growing after a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_past_the_retention_are_pruned_and_the_rest_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::default();
        let st = state(dir.path(), clock.clone());
        let old = st.create_node(node("old")).await.unwrap();
        let p = st
            .provision(&old.id, ProvisionRequest::default())
            .await
            .unwrap();
        let old_inst = p.instance.id.clone();
        st.terminate(&old_inst, TerminateRequest { force: true })
            .await
            .unwrap();
        let old_tasks: Vec<String> = st.lock().tasks.keys().cloned().collect();
        assert!(!old_tasks.is_empty());
        assert!(old_tasks
            .iter()
            .all(|t| st.get_task(t).unwrap().status.is_final()));
        let day = 86_400_000;
        st.mutate(|mem, now| {
            // Expired long ago; revoked but valid for years; valid.
            mem.add_cert(now, &old_inst, "expired", now + day);
            mem.add_cert(now, &old_inst, "revoked-valid", now + 400 * day);
            mem.certs.get_mut("revoked-valid").unwrap().revoked = true;
            mem.add_cert(now, &old_inst, "valid", now + 400 * day);
            Ok(())
        })
        .await
        .unwrap();
        let old_events = st.recent_events(1000, None).await.unwrap();
        assert!(old_events.len() > 2, "{old_events:?}");

        clock.advance_secs(31 * 86_400);
        let recent = st.create_node(node("recent")).await.unwrap();
        let p2 = st
            .provision(&recent.id, ProvisionRequest::default())
            .await
            .unwrap();
        let recent_task = p2.task_id.clone();
        assert!(!st.get_task(&recent_task).unwrap().status.is_final());
        let newest_before = st.recent_events(1, None).await.unwrap()[0].id;

        let counts = st.prune().await.unwrap();
        assert_eq!(counts.tasks, old_tasks.len(), "{counts:?}");
        assert_eq!(counts.certs, 1, "{counts:?}");
        assert_eq!(counts.events, old_events.len(), "{counts:?}");
        for t in &old_tasks {
            assert!(st.get_task(t).is_err(), "task {t} should be gone");
        }
        assert!(st.get_task(&recent_task).is_ok());
        {
            let mem = st.lock();
            assert!(mem.instances[&old_inst].task_ids.is_empty());
            let mut serials: Vec<&str> = mem.certs.keys().map(String::as_str).collect();
            serials.sort_unstable();
            assert_eq!(serials, ["revoked-valid", "valid"]);
        }
        let events = st.recent_events(1000, None).await.unwrap();
        assert!(events.iter().all(|e| e.id > old_events[0].id));
        assert_eq!(events[0].id, newest_before);
        // A second pass finds nothing more.
        assert_eq!(st.prune().await.unwrap().total(), 0);

        // SQLite agrees after a restart, and new events continue the ids.
        drop(st);
        let st = state(dir.path(), clock.clone());
        for t in &old_tasks {
            assert!(
                st.get_task(t).is_err(),
                "task {t} came back after a restart"
            );
        }
        assert_eq!(st.lock().certs.len(), 2);
        assert!(st.lock().instances[&old_inst].task_ids.is_empty());
        st.create_node(node("again")).await.unwrap();
        let newest = st.recent_events(1, None).await.unwrap()[0].id;
        assert!(newest > newest_before);
        assert!(!st.get_task(&recent_task).unwrap().status.is_final());
    }

    /// Everything is older than any retention, yet the newest event stays: ids
    /// continue from it after a restart. `--retention-days 0` keeps everything.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_newest_event_stays_and_zero_days_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::default();
        let st = state(dir.path(), clock.clone());
        st.create_node(node("a")).await.unwrap();
        st.create_node(node("b")).await.unwrap();
        let events = st.recent_events(100, None).await.unwrap();
        assert!(events.len() >= 2);
        clock.advance_secs(365 * 86_400);
        let counts = st.prune().await.unwrap();
        assert_eq!(counts.events, events.len() - 1);
        let left = st.recent_events(100, None).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, events[0].id);

        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::default();
        let st = state_with_days(dir.path(), clock.clone(), |c| c.retention_days = 0);
        st.create_node(node("a")).await.unwrap();
        st.create_node(node("b")).await.unwrap();
        clock.advance_secs(365 * 86_400);
        assert_eq!(st.prune().await.unwrap().total(), 0);
        assert!(st.recent_events(100, None).await.unwrap().len() >= 2);
    }

    /// A retention shorter than the reissue grace does not take a certificate its
    /// node may still reissue: that would turn the node's next call into a final
    /// `client_certificate_invalid`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_expired_certificate_stays_through_the_reissue_grace() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::default();
        let st = state_with_days(dir.path(), clock.clone(), |c| {
            c.retention_days = 1;
            c.reissue_grace_seconds = 7 * 86_400;
        });
        let n = st.create_node(node("a")).await.unwrap();
        let p = st
            .provision(&n.id, ProvisionRequest::default())
            .await
            .unwrap();
        let inst = p.instance.id;
        st.mutate(|mem, now| {
            mem.add_cert(now, &inst, "short", now + 3_600_000);
            Ok(())
        })
        .await
        .unwrap();
        clock.advance_secs(3 * 86_400);
        st.prune().await.unwrap();
        assert!(
            st.lock().certs.contains_key("short"),
            "pruned inside the grace"
        );
        clock.advance_secs(5 * 86_400);
        assert_eq!(st.prune().await.unwrap().certs, 1);
        assert!(!st.lock().certs.contains_key("short"));
    }
}
