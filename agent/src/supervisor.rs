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
    /// Dropping the future part way (a cancelled drain) leaves the services it had
    /// not finished stopping marked `stopping`, for [`Supervisor::start_all`].
    fn stop_all(&self, grace: Duration) -> StopFuture<'_>;
    /// Starts again every service that was stopped (a cancelled drain); returns
    /// their names.
    fn start_all(&self) -> Vec<String>;
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
    fn start_all(&self) -> Vec<String> {
        Vec::new()
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

/// Spawns the service's process; the child is killed if its handle is dropped.
fn spawn(s: &mut Service) {
    let Some((program, args)) = s.spec.argv.split_first() else {
        s.state = "failed";
        return;
    };
    match tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => {
            tracing::info!(service = %s.spec.name, pid = child.id(), "service started");
            s.child = Some(child);
            s.state = "running";
        }
        Err(e) => {
            tracing::error!(service = %s.spec.name, error = %e, "service failed to start");
            s.state = "failed";
        }
    }
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
                let mut s = Service {
                    spec,
                    child: None,
                    state: "stopped",
                };
                spawn(&mut s);
                s
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
            .filter_map(|s| {
                let child = s.child.take()?;
                s.state = "stopping";
                Some((s.spec.name.clone(), child))
            })
            .collect();
        Box::pin(async move {
            // TERM everything first, then wait against one shared deadline, so the
            // services stop in parallel without spawning tasks: dropping this future
            // drops the children, and `kill_on_drop` ends them.
            for (_, child) in &children {
                if let Some(pid) = child
                    .id()
                    .and_then(|p| rustix::process::Pid::from_raw(p as i32))
                {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                }
            }
            let deadline = tokio::time::Instant::now() + grace;
            let mut report = StopReport::default();
            for (name, mut child) in children {
                let killed = match tokio::time::timeout_at(deadline, child.wait()).await {
                    Ok(_) => false,
                    Err(_) => {
                        let _ = child.kill().await;
                        true
                    }
                };
                tracing::info!(service = %name, killed, "service stopped");
                if let Some(s) = self.lock().iter_mut().find(|s| s.spec.name == name) {
                    s.state = "stopped";
                }
                if killed {
                    report.killed.push(name);
                } else {
                    report.stopped.push(name);
                }
            }
            report
        })
    }

    fn start_all(&self) -> Vec<String> {
        let mut started = Vec::new();
        for s in self.lock().iter_mut() {
            if s.child.is_none() && matches!(s.state, "stopping" | "stopped") {
                spawn(s);
                started.push(s.spec.name.clone());
            }
        }
        started
    }
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
        // Starting again brings back what was stopped, not what failed to start.
        assert_eq!(sup.start_all(), vec!["polite", "stubborn"]);
        let states: Vec<_> = sup.services().into_iter().map(|s| s.state).collect();
        assert_eq!(states, vec!["running", "running", "failed"]);
        sup.stop_all(Duration::from_millis(10)).await;
    }

    #[tokio::test]
    async fn an_abandoned_stop_can_be_undone() {
        let sup = ProcessSupervisor::start(vec![ServiceSpec {
            name: "stubborn".into(),
            module: String::new(),
            argv: vec![
                "sh".into(),
                "-c".into(),
                "trap '' TERM; while :; do sleep 0.1; done".into(),
            ],
        }]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        // A cancelled drain drops the stop part way through.
        let stop = sup.stop_all(Duration::from_secs(30));
        assert!(tokio::time::timeout(Duration::from_millis(300), stop)
            .await
            .is_err());
        assert_eq!(sup.services()[0].state, "stopping");
        assert_eq!(sup.start_all(), vec!["stubborn"]);
        // The abandoned process is gone (killed on drop), only the new one runs.
        let out = std::process::Command::new("pgrep")
            .args(["-f", "-c", "trap '' TERM; while"])
            .output();
        if let Ok(out) = out {
            let n: u32 = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or(0);
            assert!(n <= 1, "{n} copies running");
        }
        assert_eq!(sup.services()[0].state, "running");
        sup.stop_all(Duration::from_millis(10)).await;
    }
}
