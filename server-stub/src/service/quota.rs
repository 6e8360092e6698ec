//! Provider quota: at most `--quota-concurrent-provisions` provisions at once and
//! `--quota-instances-per-region` live instances per region. A provision over quota
//! waits in `pending` (the instance says which limit, a `provider_quota_exceeded`
//! event is recorded once, the stuck row names it) and starts when a provision in
//! its region ends or an instance there ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use powernode_proto::{ErrorCode, InstanceStatus};
use serde_json::json;

use super::AppState;
use crate::error::{AppError, AppResult};

/// Provisions under way per region, and what a waiting provision waits on.
#[derive(Debug, Default)]
pub struct Quota {
    in_flight: Mutex<HashMap<String, u32>>,
    /// Check and take happen under it, so two waiters never take the last slot both.
    gate: tokio::sync::Mutex<()>,
    changed: tokio::sync::Notify,
}

impl Quota {
    /// Something that counts against a quota ended: waiters look again.
    pub fn changed(&self) {
        self.changed.notify_waiters();
    }
}

/// A provision's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    quota: Arc<Quota>,
    region: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self
            .quota
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.region) {
            *n = n.saturating_sub(1);
        }
        drop(m);
        self.quota.changed();
    }
}

/// A wait never sleeps longer than this between looks (a missed wake costs no more).
const RECHECK: Duration = Duration::from_secs(1);

impl AppState {
    /// Waits until the provision of `instance_id` (in `region`) fits the quotas, and
    /// takes its slot (none without quotas: nothing is counted). Refused when the
    /// instance stopped pending meanwhile (its provision was cancelled).
    pub(crate) async fn wait_for_quota(
        &self,
        instance_id: &str,
        region: &str,
    ) -> AppResult<Option<Slot>> {
        let quota = self.quota.clone();
        let (max_flight, max_live) = (
            self.cfg.quota_concurrent_provisions,
            self.cfg.quota_instances_per_region,
        );
        if max_flight == 0 && max_live == 0 {
            return Ok(None);
        }
        let mut told = false;
        loop {
            let changed = quota.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let _gate = quota.gate.lock().await;
                let (pending, live) = {
                    let mem = self.lock();
                    let pending = mem
                        .instances
                        .get(instance_id)
                        .is_some_and(|i| i.status == InstanceStatus::Pending);
                    // Counted only when limited: a scan of every instance.
                    let live = if max_live == 0 {
                        0
                    } else {
                        mem.instances
                            .values()
                            .filter(|i| {
                                i.region == region
                                    && i.id != instance_id
                                    && i.waiting_for_quota.is_none()
                                    && !matches!(
                                        i.status,
                                        InstanceStatus::Terminated | InstanceStatus::Failed
                                    )
                            })
                            .count()
                    };
                    (pending, u32::try_from(live).unwrap_or(u32::MAX))
                };
                if !pending {
                    return Err(AppError::conflict(
                        ErrorCode::TaskCancelled,
                        format!("instance {instance_id} stopped waiting for provider quota"),
                    ));
                }
                let flight = quota
                    .in_flight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(region)
                    .copied()
                    .unwrap_or(0);
                let over = if max_flight > 0 && flight >= max_flight {
                    Some(("concurrent_provisions", flight, max_flight))
                } else if max_live > 0 && live >= max_live {
                    Some(("instances_per_region", live, max_live))
                } else {
                    None
                };
                match over {
                    None => {
                        *quota
                            .in_flight
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entry(region.to_string())
                            .or_default() += 1;
                        if told {
                            self.quota_note(instance_id, None).await?;
                        }
                        return Ok(Some(Slot {
                            quota: quota.clone(),
                            region: region.to_string(),
                        }));
                    }
                    Some((limit, used, max)) if !told => {
                        told = true;
                        let words = format!("{limit}: {used} of {max} in {region}");
                        tracing::info!(instance = instance_id, %words, "provision waits for provider quota");
                        self.quota_note(instance_id, Some((limit, used, max, words)))
                            .await?;
                    }
                    Some(_) => {}
                }
            }
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep(RECHECK) => {}
            }
        }
    }

    /// Marks the instance waiting for quota (with the event), or no longer waiting.
    async fn quota_note(
        &self,
        instance_id: &str,
        over: Option<(&str, u32, u32, String)>,
    ) -> AppResult<()> {
        self.mutate(|mem, now| {
            let Some(inst) = mem.instances.get_mut(instance_id) else {
                return Ok(());
            };
            let node_id = inst.node_id.clone();
            let region = inst.region.clone();
            match over {
                Some((limit, used, max, words)) => {
                    inst.waiting_for_quota = Some(words);
                    mem.save_instance(instance_id);
                    mem.event(
                        now,
                        "provider_quota_exceeded",
                        Some(&node_id),
                        Some(instance_id),
                        json!({"limit": limit, "in_use": used, "max": max, "region": region}),
                    );
                }
                None => {
                    inst.waiting_for_quota = None;
                    mem.save_instance(instance_id);
                    mem.event(
                        now,
                        "provider_quota_admitted",
                        Some(&node_id),
                        Some(instance_id),
                        json!({"region": region}),
                    );
                }
            }
            Ok(())
        })
        .await
    }
}
