//! Service supervision, as much as drain needs for now: list the services and their
//! state, and stop them all within a grace period (SIGTERM, then SIGKILL).
//! Module services plug in here when the module runtime lands.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use powernode_proto::node::ServiceState;

/// What a stop did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StopReport {
    /// Stopped within the grace period.
    pub stopped: Vec<String>,
    /// Killed after the grace period.
    pub killed: Vec<String>,
}

pub type StopFuture<'a> = Pin<Box<dyn Future<Output = StopReport> + Send + 'a>>;

pub trait Supervisor: Send + Sync {
    fn services(&self) -> Vec<ServiceState>;
    /// Stops every running service; each gets `grace` to exit after SIGTERM.
    fn stop_all(&self, grace: Duration) -> StopFuture<'_>;
}

/// A node with no supervised services.
#[derive(Debug, Default)]
pub struct NoServices;

impl Supervisor for NoServices {
    fn services(&self) -> Vec<ServiceState> {
        Vec::new()
    }
    fn stop_all(&self, _grace: Duration) -> StopFuture<'_> {
        Box::pin(async { StopReport::default() })
    }
}

/// A service to run: a name, the module it belongs to, and an argv (no shell).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub module: String,
    pub argv: Vec<String>,
}

impl std::str::FromStr for ServiceSpec {
    type Err = String;
    /// `NAME=PROGRAM ARGS...` (split on whitespace).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, cmd) = s
            .split_once('=')
            .ok_or_else(|| format!("service {s:?} is not NAME=COMMAND"))?;
        let argv: Vec<String> = cmd.split_whitespace().map(str::to_string).collect();
        if name.is_empty() || argv.is_empty() {
            return Err(format!("service {s:?} needs a name and a command"));
        }
        Ok(Self {
            name: name.to_string(),
            module: String::new(),
            argv,
        })
    }
}

struct Service {
    spec: ServiceSpec,
    child: Option<tokio::process::Child>,
    state: &'static str,
}

/// Runs plain processes. No restart policy yet: a service that exits on its own is
/// reported `failed` (non-zero) or `stopped` (zero).
pub struct ProcessSupervisor {
    services: Mutex<Vec<Service>>,
}

impl std::fmt::Debug for ProcessSupervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessSupervisor").finish_non_exhaustive()
    }
}

impl ProcessSupervisor {
    /// Starts every service; a service that cannot start is reported `failed`.
    pub fn start(specs: Vec<ServiceSpec>) -> Self {
        let services = specs
            .into_iter()
            .map(|spec| {
                let (program, args) = spec.argv.split_first().map_or(("", &[][..]), |(p, a)| (p.as_str(), a));
                let child = tokio::process::Command::new(program)
                    .args(args)
                    .stdin(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .spawn();
                match child {
                    Ok(child) => {
                        tracing::info!(service = %spec.name, pid = child.id(), "service started");
                        Service { spec, child: Some(child), state: "running" }
                    }
                    Err(e) => {
                        tracing::error!(service = %spec.name, error = %e, "service failed to start");
                        Service { spec, child: None, state: "failed" }
                    }
                }
            })
            .collect();
        Self {
            services: Mutex::new(services),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Service>> {
        // A panic while holding the lock cannot leave the list inconsistent.
        self.services.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Supervisor for ProcessSupervisor {
    fn services(&self) -> Vec<ServiceState> {
        let mut services = self.lock();
        services
            .iter_mut()
            .map(|s| {
                if let Some(child) = s.child.as_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        s.state = if status.success() {
                            "stopped"
                        } else {
                            "failed"
                        };
                        s.child = None;
                    }
                }
                ServiceState {
                    name: s.spec.name.clone(),
                    module: s.spec.module.clone(),
                    state: s.state.to_string(),
                    restarts: 0,
                }
            })
            .collect()
    }

    fn stop_all(&self, grace: Duration) -> StopFuture<'_> {
        // Take the children out so no lock is held across awaits.
        let children: Vec<(String, tokio::process::Child)> = self
            .lock()
            .iter_mut()
            .filter_map(|s| s.child.take().map(|c| (s.spec.name.clone(), c)))
            .collect();
        Box::pin(async move {
            let stops = children.into_iter().map(|(name, mut child)| async move {
                if let Some(pid) = child
                    .id()
                    .and_then(|p| rustix::process::Pid::from_raw(p as i32))
                {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                }
                let killed = match tokio::time::timeout(grace, child.wait()).await {
                    Ok(_) => false,
                    Err(_) => {
                        let _ = child.kill().await;
                        true
                    }
                };
                tracing::info!(service = %name, killed, "service stopped");
                (name, killed)
            });
            let mut report = StopReport::default();
            for (name, killed) in join_all(stops).await {
                if killed {
                    report.killed.push(name.clone());
                } else {
                    report.stopped.push(name.clone());
                }
                if let Some(s) = self.lock().iter_mut().find(|s| s.spec.name == name) {
                    s.state = "stopped";
                }
            }
            report
        })
    }
}

/// Runs futures concurrently (no futures crate needed for this one use).
async fn join_all<F: Future + Send + 'static>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parsing() {
        let s: ServiceSpec = "web=sleep 100".parse().unwrap();
        assert_eq!(s.name, "web");
        assert_eq!(s.argv, vec!["sleep", "100"]);
        assert!("nocommand".parse::<ServiceSpec>().is_err());
        assert!("x=  ".parse::<ServiceSpec>().is_err());
        assert!("=sleep 1".parse::<ServiceSpec>().is_err());
    }

    #[tokio::test]
    async fn stop_all_terms_then_kills() {
        let sup = ProcessSupervisor::start(vec![
            "polite=sleep 100".parse().unwrap(),
            // Ignores SIGTERM, so it must be killed after the grace period.
            ServiceSpec {
                name: "stubborn".into(),
                module: "m".into(),
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    "trap '' TERM; while :; do sleep 0.1; done".into(),
                ],
            },
            "missing=/nonexistent/binary".parse().unwrap(),
        ]);
        // Give the shell time to install its trap.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let states: Vec<_> = sup.services().into_iter().map(|s| s.state).collect();
        assert_eq!(states, vec!["running", "running", "failed"]);
        let report = sup.stop_all(Duration::from_millis(300)).await;
        assert_eq!(report.stopped, vec!["polite"]);
        assert_eq!(report.killed, vec!["stubborn"]);
        let states: Vec<_> = sup.services().into_iter().map(|s| s.state).collect();
        assert_eq!(states, vec!["stopped", "stopped", "failed"]);
        // Stopping again is a no-op.
        assert_eq!(
            sup.stop_all(Duration::from_millis(10)).await,
            StopReport::default()
        );
    }
}
