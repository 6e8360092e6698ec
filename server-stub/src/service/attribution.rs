//! `attribute-failure`: which module and version changes in a window before an
//! instance's failure could explain it, ranked, each with its reasoning.
//!
//! The ranking is a transparent score, not a model: the kind of change, whether it
//! touched a root module, whether the failure code is about module content, whether
//! the failure message names the module, whether the instance ran the new digest,
//! and how close the change came before the failure. Every point is said in words.

use powernode_proto::admin::{AttributedFailure, AttributionCandidate, FailureAttribution};
use powernode_proto::{ErrorCode, InstanceStatus, TaskKind, TaskStatus};
use serde_json::Value;

use super::AppState;
use crate::clock::{format_ts, Millis};
use crate::error::{AppError, AppResult};
use crate::model::{self, InstRec, TaskRec};

/// Longest lookback accepted (30 days).
pub const MAX_LOOKBACK_HOURS: u64 = 24 * 30;

/// Failure codes about what a module's bytes are: a new publication or a changed
/// module list is the likeliest cause.
fn is_module_code(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::SignatureMissing
            | ErrorCode::SignatureMismatch
            | ErrorCode::DigestMismatch
            | ErrorCode::VerityMismatch
            | ErrorCode::OciNotFound
            | ErrorCode::UnsupportedMediaType
            | ErrorCode::UnsafePath
            | ErrorCode::LayerTooLarge
            | ErrorCode::VersionRollback
    )
}

/// A change before scoring.
struct Change {
    change: &'static str,
    at: Millis,
    module: Option<String>,
    version: Option<String>,
    digest: Option<String>,
    kind: Option<String>,
    /// What happened, as the first clause of the reasoning.
    what: String,
    /// Base likelihood of this kind of change.
    base: i64,
    /// Extra said about this change (e.g. the task failed).
    notes: Vec<(i64, String)>,
}

fn minutes(ms: Millis) -> u64 {
    u64::try_from(ms.max(0) / 60_000).unwrap_or(0)
}

impl AppState {
    pub async fn attribute_failure(
        &self,
        instance_id: &str,
        lookback_hours: u64,
    ) -> AppResult<FailureAttribution> {
        if lookback_hours == 0 || lookback_hours > MAX_LOOKBACK_HOURS {
            return Err(AppError::bad_request(format!(
                "lookback_hours must be 1..={MAX_LOOKBACK_HOURS}"
            )));
        }
        let now = self.clock.now_ms();
        let (inst, template_id, tasks, stuck) = {
            let mem = self.lock();
            let inst = mem
                .instances
                .get(instance_id)
                .ok_or_else(|| AppError::not_found("instance", instance_id))?
                .clone();
            let template_id = mem.nodes.get(&inst.node_id).map(|n| n.template_id.clone());
            let tasks: Vec<TaskRec> = inst
                .task_ids
                .iter()
                .filter_map(|t| mem.tasks.get(t).cloned())
                .collect();
            let stuck = model::stuck_info(
                &inst,
                now,
                self.started_ms,
                &self.cfg.stuck,
                mem.drain_state(&inst).as_ref(),
            );
            (inst, template_id, tasks, stuck)
        };
        let (fail_at, failure) = self.failure_of(&inst, &tasks, stuck, now).await?;
        let (code, message) = (failure.code, failure.message.clone().unwrap_or_default());
        let start = fail_at - (lookback_hours as i64) * 3_600_000;

        // Module lists the instance is meant to run, and what it ran.
        let desired = template_id.as_deref().and_then(|t| self.desired_set(t));
        let kind_of = |name: &str| -> Option<String> {
            let d = desired.as_ref()?;
            if d.root.iter().any(|m| m == name) {
                Some("root".into())
            } else if d.runtime.iter().any(|m| m == name) {
                Some("runtime".into())
            } else {
                None
            }
        };
        let ran = |name: &str| inst.modules.iter().any(|m| m.name == name);

        let mut changes: Vec<Change> = Vec::new();
        let pubs = self.modules.publications();
        for (i, p) in pubs.iter().enumerate() {
            if p.created_ms < start || p.created_ms > fail_at {
                continue;
            }
            let p = p.clone();
            // A newer publication of the same module before the failure replaced it.
            let newer = pubs[i + 1..]
                .iter()
                .find(|q| q.name == p.name && q.created_ms <= fail_at);
            let kind = kind_of(&p.name);
            if kind.is_none() && !ran(&p.name) {
                continue; // a module this instance neither wants nor runs
            }
            let kind = kind.unwrap_or_else(|| p.kind.clone());
            let mut notes = Vec::new();
            if inst.modules.iter().any(|m| m.digest == p.digest) {
                notes.push((10, "the instance was running that digest".to_string()));
            }
            if let Some(q) = newer {
                notes.push((
                    -20,
                    format!("superseded by {} {} before the failure", q.name, q.version),
                ));
            }
            changes.push(Change {
                change: "module_published",
                at: p.created_ms,
                what: format!("{kind} module {} {} was published", p.name, p.version),
                module: Some(p.name),
                version: Some(p.version),
                digest: Some(p.digest),
                kind: Some(kind),
                base: 40,
                notes,
            });
        }
        if let Some(tid) = &template_id {
            for (at, d) in self
                .store
                .kind_between(false, "template.modules_changed", None, start, fail_at)
                .await?
            {
                if d["template_id"].as_str() != Some(tid) {
                    continue;
                }
                for (list, kind) in [("root_modules", "root"), ("runtime_modules", "runtime")] {
                    let names = |side: &str| -> Vec<String> {
                        d[side][list]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .filter_map(|v| v.as_str().map(String::from))
                                    .collect()
                            })
                            .unwrap_or_default()
                    };
                    let (before, after) = (names("before"), names("after"));
                    for (name, verb) in after
                        .iter()
                        .filter(|n| !before.contains(n))
                        .map(|n| (n, "added to"))
                        .chain(
                            before
                                .iter()
                                .filter(|n| !after.contains(n))
                                .map(|n| (n, "removed from")),
                        )
                    {
                        changes.push(Change {
                            change: "template_modules_changed",
                            at,
                            what: format!("{kind} module {name} was {verb} template {tid}"),
                            module: Some(name.clone()),
                            version: None,
                            digest: None,
                            kind: Some(kind.to_string()),
                            base: 40,
                            notes: Vec::new(),
                        });
                    }
                }
            }
        }
        for t in &tasks {
            if t.created_ms < start || t.created_ms > fail_at {
                continue;
            }
            let (change, base, what) = match t.kind {
                TaskKind::ModuleUpdate => (
                    "module_update_task",
                    35,
                    format!(
                        "module update task {} ({}) was created",
                        t.id,
                        t.params["changes"]
                            .as_array()
                            .map(|c| c
                                .iter()
                                .map(|i| format!(
                                    "{} {}",
                                    i["action"].as_str().unwrap_or("?"),
                                    i["module"].as_str().unwrap_or("?")
                                ))
                                .collect::<Vec<_>>()
                                .join(", "))
                            .unwrap_or_default()
                    ),
                ),
                TaskKind::Reboot => (
                    "reboot_task",
                    20,
                    format!("reboot task {} was created", t.id),
                ),
                _ => continue,
            };
            let mut notes = Vec::new();
            if t.status == TaskStatus::Failed {
                notes.push((20, format!("the task failed: {}", t.result)));
            }
            let root = t.params["reboot_required"].as_bool() == Some(true);
            let modules: Vec<String> = t.params["changes"]
                .as_array()
                .map(|c| {
                    c.iter()
                        .filter_map(|i| i["module"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            changes.push(Change {
                change,
                at: t.created_ms,
                what,
                module: (!modules.is_empty()).then(|| modules.join(",")),
                version: None,
                digest: None,
                kind: (t.kind == TaskKind::ModuleUpdate)
                    .then(|| if root { "root" } else { "runtime" }.to_string()),
                base,
                notes,
            });
        }
        for (at, d) in self
            .store
            .kind_between(
                true,
                "module.drift_detected",
                Some(instance_id.to_string()),
                start,
                fail_at,
            )
            .await?
        {
            let summary = d["summary"]
                .as_str()
                .unwrap_or("modules differ")
                .to_string();
            let root = d["reboot_required"].as_bool() == Some(true);
            let modules: Vec<String> = d["items"]
                .as_array()
                .map(|c| {
                    c.iter()
                        .filter_map(|i| i["module"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            changes.push(Change {
                change: "drift_detected",
                at,
                what: format!("drift was detected ({summary})"),
                module: (!modules.is_empty()).then(|| modules.join(",")),
                version: None,
                digest: None,
                kind: Some(if root { "root" } else { "runtime" }.to_string()),
                base: 25,
                notes: Vec::new(),
            });
        }

        let window_ms = (fail_at - start).max(1);
        let mut candidates: Vec<(i64, Change)> = changes
            .into_iter()
            .map(|c| {
                let mut score = c.base;
                let mut why = vec![format!(
                    "{} {} min before the failure",
                    c.what,
                    minutes(fail_at - c.at)
                )];
                match c.kind.as_deref() {
                    Some("root") => {
                        score += 15;
                        why.push("a root module is composed into / at boot".into());
                    }
                    Some(_) => score += 5,
                    None => {}
                }
                if let Some(code) = code {
                    if code == ErrorCode::RegistryUnreachable && c.change == "module_published" {
                        // A publication names the registry the node fetches from.
                        score += 20;
                        why.push(format!(
                            "the failure code {code} concerns the registry this publication points the node at"
                        ));
                    } else if c.module.is_some() && is_module_code(code) {
                        score += 25;
                        why.push(format!(
                            "the failure code {code} concerns module content, which this change touches"
                        ));
                    } else if !is_module_code(code) {
                        score -= 15;
                        why.push(format!("the failure code {code} is not about module content"));
                    }
                }
                if let Some(m) = c.module.as_deref() {
                    if m.split(',').any(|n| !n.is_empty() && message.contains(n)) {
                        score += 15;
                        why.push(format!("the failure message names {m}"));
                    }
                }
                for (pts, note) in &c.notes {
                    score += pts;
                    why.push(note.clone());
                }
                // Closer to the failure is likelier (up to 20 points).
                score += 20 * (window_ms - (fail_at - c.at)) / window_ms;
                (score, Change { what: why.join("; "), ..c })
            })
            .collect();
        candidates.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.at.cmp(&a.1.at)));
        Ok(FailureAttribution {
            instance_id: instance_id.to_string(),
            failure,
            lookback_hours,
            window_start: format_ts(start),
            candidates: candidates
                .into_iter()
                .enumerate()
                .map(|(i, (score, c))| AttributionCandidate {
                    rank: u32::try_from(i + 1).unwrap_or(u32::MAX),
                    score: u32::try_from(score.clamp(0, 100)).unwrap_or(0),
                    change: c.change.to_string(),
                    at: format_ts(c.at),
                    minutes_before_failure: minutes(fail_at - c.at),
                    module: c.module,
                    version: c.version,
                    digest: c.digest,
                    kind: c.kind,
                    reasoning: c.what,
                })
                .collect(),
        })
    }

    /// The failure to explain: a failed instance, a failure the node reported, a
    /// stuck state, a failed task; else nothing yet (the window ends now).
    async fn failure_of(
        &self,
        inst: &InstRec,
        tasks: &[TaskRec],
        stuck: Option<powernode_proto::admin::StuckInfo>,
        now: Millis,
    ) -> AppResult<(Millis, AttributedFailure)> {
        let base = |at: Millis, source: &str| AttributedFailure {
            at: format_ts(at),
            status: inst.status,
            source: source.to_string(),
            code: None,
            message: None,
        };
        if let Some(f) = &inst.failure {
            // When the node said so: the last bootstrap.failed signal, else the
            // status change (a server-side failure).
            let reported = self
                .store
                .kind_between(true, "bootstrap.failed", Some(inst.id.clone()), 0, now)
                .await?
                .last()
                .map(|(at, _)| *at);
            let at = match inst.status {
                InstanceStatus::Failed => inst.status_changed_ms,
                _ => reported.unwrap_or(inst.status_changed_ms),
            };
            return Ok((
                at,
                AttributedFailure {
                    code: Some(f.code),
                    message: Some(f.message.clone()),
                    ..base(at, "failure_report")
                },
            ));
        }
        if let Some(s) = stuck {
            let over = (s.for_seconds.saturating_sub(s.threshold_seconds) as i64) * 1000;
            return Ok((
                now - over,
                AttributedFailure {
                    message: Some(format!("{}: {}", s.reason, s.recovery)),
                    ..base(now - over, "stuck")
                },
            ));
        }
        if let Some(t) = tasks
            .iter()
            .filter(|t| t.status == TaskStatus::Failed && t.kind.is_node_side())
            .max_by_key(|t| t.updated_ms)
        {
            // The agent says `{"error": "code", "message"}` or `{"error": {"code", "message"}}`.
            let err = &t.result["error"];
            let code = err
                .as_str()
                .or_else(|| err["code"].as_str())
                .and_then(|c| serde_json::from_value::<ErrorCode>(Value::String(c.into())).ok())
                .filter(|c| *c != ErrorCode::Unknown);
            return Ok((
                t.updated_ms,
                AttributedFailure {
                    code,
                    message: Some(format!(
                        "{} task {} failed: {}",
                        t.kind.as_str(),
                        t.id,
                        err["message"]
                            .as_str()
                            .or_else(|| t.result["message"].as_str())
                            .map(String::from)
                            .unwrap_or_else(|| t.result.to_string())
                    )),
                    ..base(t.updated_ms, "failed_task")
                },
            ));
        }
        if inst.silent_signal.is_some() {
            let at = inst.last_heartbeat_ms.unwrap_or(now);
            return Ok((
                at,
                AttributedFailure {
                    message: Some("no heartbeat (instance.silent)".into()),
                    ..base(at, "silent")
                },
            ));
        }
        Ok((now, base(now, "none")))
    }
}
