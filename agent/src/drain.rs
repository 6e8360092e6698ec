//! Drain steps: commands a module declares (`org.powernode.drain`, see
//! `crate::modules::config`) that a drain runs before the node's services stop, the
//! workload-aware part of a drain (stop the containers a `--restart=always` daemon
//! would bring back, then let the daemon stop). Each step is bounded by its own
//! timeout and by what is left of the drain's; a step that fails or overruns fails
//! the drain, which then leaves the node draining for the operator, as a stuck
//! service does. A cancelled drain runs the steps' `undo`, last step first.
//!
//! It must never leave a step's process behind: a step that overruns is killed with
//! its process group.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::supervisor::{forget_supervised, signal_group, spawn_supervised};

/// A drain step as the runtime runs it: argv resolved against its module's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainStep {
    pub module: String,
    pub name: String,
    pub argv: Vec<String>,
    pub undo: Option<Vec<String>>,
    pub timeout: Duration,
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
}

impl DrainStep {
    /// How a drain result names it: `step:MODULE/NAME`.
    pub fn label(&self) -> String {
        format!("step:{}/{}", self.module, self.name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("drain step {step} could not start")]
    Spawn {
        step: String,
        #[source]
        source: std::io::Error,
    },
    #[error("drain step {step} failed ({status}){output}")]
    Failed {
        step: String,
        status: String,
        output: String,
    },
    #[error("drain step {step} still running after {} s; killed", after.as_secs_f32())]
    Timeout { step: String, after: Duration },
}

impl StepError {
    /// The code a drain task's result carries.
    pub fn code(&self) -> &'static str {
        "drain_step_failed"
    }

    /// The step's label (`step:MODULE/NAME`).
    pub fn step(&self) -> &str {
        match self {
            StepError::Spawn { step, .. }
            | StepError::Failed { step, .. }
            | StepError::Timeout { step, .. } => step,
        }
    }
}

/// The last lines a failed step printed, kept short for the task result.
const OUTPUT_TAIL_LINES: usize = 5;
const OUTPUT_TAIL_BYTES: usize = 1024;

fn tail(stdout: &[u8], stderr: &[u8]) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(stdout),
        String::from_utf8_lossy(stderr)
    );
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = lines[lines.len().saturating_sub(OUTPUT_TAIL_LINES)..].join(" | ");
    if out.len() > OUTPUT_TAIL_BYTES {
        let mut cut = OUTPUT_TAIL_BYTES;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    if out.is_empty() {
        out
    } else {
        format!(": {out}")
    }
}

/// Runs `argv` (in its own process group) within `limit`; `label` names it in errors.
async fn run_command(
    label: &str,
    argv: &[String],
    step: &DrainStep,
    limit: Duration,
) -> Result<(), StepError> {
    let spawn_err = |source| StepError::Spawn {
        step: label.to_string(),
        source,
    };
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| spawn_err(std::io::Error::other("empty command")))?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for (k, v) in &step.env {
        cmd.env(k, v);
    }
    if let Some(dir) = &step.cwd {
        cmd.current_dir(dir);
    }
    let child = spawn_supervised(&mut cmd).map_err(spawn_err)?;
    let pid = child.id().unwrap_or(0);
    // Kills the group however this ends: done, timed out, or dropped (a cancel).
    struct Group(u32);
    impl Drop for Group {
        fn drop(&mut self) {
            if self.0 != 0 {
                signal_group(self.0, rustix::process::Signal::KILL);
                forget_supervised(self.0);
            }
        }
    }
    let _group = Group(pid);
    tracing::info!(step = %label, pid, timeout_s = limit.as_secs(), "drain step started");
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Err(_) => Err(StepError::Timeout {
            step: label.to_string(),
            after: limit,
        }),
        Ok(Err(e)) => Err(spawn_err(e)),
        Ok(Ok(out)) if out.status.success() => {
            tracing::info!(step = %label, "drain step done");
            Ok(())
        }
        Ok(Ok(out)) => {
            use std::os::unix::process::ExitStatusExt;
            let status = match (out.status.code(), out.status.signal()) {
                (Some(c), _) => format!("exit {c}"),
                (None, Some(s)) => format!("signal {s}"),
                _ => "unknown".into(),
            };
            Err(StepError::Failed {
                step: label.to_string(),
                status,
                output: tail(&out.stdout, &out.stderr),
            })
        }
    }
}

/// Runs `steps` in order, each within its timeout and what is left until
/// `deadline`; each one started is added to `started` (what a cancel undoes).
/// Returns the labels of the steps done, in order.
pub async fn run_steps(
    steps: &[DrainStep],
    deadline: Instant,
    started: &Mutex<Vec<DrainStep>>,
) -> Result<Vec<String>, StepError> {
    let mut done = Vec::new();
    for step in steps {
        let label = step.label();
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(StepError::Timeout {
                step: label,
                after: Duration::ZERO,
            });
        }
        started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(step.clone());
        run_command(&label, &step.argv, step, step.timeout.min(left)).await?;
        done.push(label);
    }
    Ok(done)
}

/// Runs the `undo` of `steps`, last first, each within its step's timeout; a
/// failure is reported and the rest still run. Returns `(label, error)` per undo.
pub async fn undo_steps(steps: &[DrainStep]) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for step in steps.iter().rev() {
        let Some(undo) = &step.undo else { continue };
        let label = format!("undo:{}/{}", step.module, step.name);
        let result = run_command(&label, undo, step, step.timeout).await;
        if let Err(e) = &result {
            tracing::warn!(error = %crate::error_chain(e), "drain step undo failed");
        }
        out.push((label, result.err().map(|e| crate::error_chain(&e))));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(module: &str, name: &str, script: &str, timeout_ms: u64) -> DrainStep {
        DrainStep {
            module: module.into(),
            name: name.into(),
            argv: vec!["sh".into(), "-c".into(), script.into()],
            undo: None,
            timeout: Duration::from_millis(timeout_ms),
            env: vec![("STEP".into(), name.into())],
            cwd: None,
        }
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(30)
    }

    #[tokio::test]
    async fn steps_run_in_order_with_their_environment() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let s = |m: &str, n: &str| {
            let mut s = step(m, n, &format!("echo $STEP >> {}", log.display()), 5000);
            s.cwd = Some(dir.path().to_path_buf());
            s
        };
        let started = Mutex::new(Vec::new());
        let done = run_steps(&[s("web", "containers"), s("db", "flush")], far(), &started)
            .await
            .unwrap();
        assert_eq!(done, ["step:web/containers", "step:db/flush"]);
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "containers\nflush\n"
        );
        assert_eq!(started.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_failing_step_stops_the_rest_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let started = Mutex::new(Vec::new());
        let err = run_steps(
            &[
                step(
                    "web",
                    "bad",
                    "echo cannot stop containers >&2; exit 3",
                    5000,
                ),
                step("web", "after", &format!("touch {}", marker.display()), 5000),
            ],
            far(),
            &started,
        )
        .await
        .unwrap_err();
        assert_eq!(err.step(), "step:web/bad");
        assert_eq!(err.code(), "drain_step_failed");
        let msg = err.to_string();
        assert!(
            msg.contains("exit 3") && msg.contains("cannot stop containers"),
            "{msg}"
        );
        assert!(!marker.exists());
    }

    #[tokio::test]
    async fn a_step_past_its_time_is_killed_with_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let started = Mutex::new(Vec::new());
        let t = std::time::Instant::now();
        // The shell's child (the sleep) must die too.
        let err = run_steps(
            &[step(
                "web",
                "slow",
                &format!("sleep 30 & echo $! > {}; wait", pidfile.display()),
                300,
            )],
            far(),
            &started,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, StepError::Timeout { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let gone = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z"))
                .unwrap_or(true)
        };
        let t = std::time::Instant::now();
        while !gone() && t.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone(), "the step's child outlived it");
    }

    #[tokio::test]
    async fn the_drains_deadline_bounds_a_step_with_a_longer_timeout() {
        let started = Mutex::new(Vec::new());
        let t = std::time::Instant::now();
        let err = run_steps(
            &[step("m", "long", "sleep 30", 60_000)],
            Instant::now() + Duration::from_millis(300),
            &started,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, StepError::Timeout { .. }));
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn undo_runs_last_step_first_and_goes_on_past_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let with_undo = |name: &str, script: String| {
            let mut s = step("web", name, "true", 5000);
            s.undo = Some(vec!["sh".into(), "-c".into(), script]);
            s
        };
        let steps = [
            with_undo("first", format!("echo first >> {}", log.display())),
            step("web", "no-undo", "true", 5000),
            with_undo("second", "exit 1".into()),
        ];
        let undone = undo_steps(&steps).await;
        assert_eq!(undone.len(), 2);
        assert_eq!(undone[0].0, "undo:web/second");
        assert!(undone[0].1.is_some());
        assert_eq!(undone[1], ("undo:web/first".to_string(), None));
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "first\n");
    }
}
