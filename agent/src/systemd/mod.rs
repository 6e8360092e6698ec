//! The agent under systemd: on a root whose `/sbin/init` is systemd the agent is a
//! `Type=notify` service ([`notify`]: `READY=1`, watchdog pings), module services
//! are systemd units ([`SystemdSupervisor`], so `systemctl status` shows them and an
//! agent restart leaves them running), and heartbeats carry systemd's own state
//! ([`system_state`]).
//!
//! Everything systemd is asked goes through `systemctl` / `journalctl` behind the
//! [`Systemctl`] seam, so tests assert the exact calls with a recording fake (this
//! crate's tests never need a running systemd). It must never hang the agent on a
//! wedged systemd: each call has a deadline.

mod notify;
mod units;

use std::time::Duration;

use powernode_proto::node::SystemdState;

pub use notify::{notify, notify_to, watchdog_interval};
pub use units::{unit_name, unit_text, SystemdSupervisor, DEFAULT_UNIT_DIR};

/// What a `systemctl` / `journalctl` call printed and whether it exited 0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CmdOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("running {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} did not answer within {} s", timeout.as_secs())]
    Timeout { program: String, timeout: Duration },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("writing unit file {path}")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("service {service}: {reason}")]
    Spec { service: String, reason: String },
}

impl SystemdError {
    /// systemctl did not answer (or could not be run): worth asking again. A
    /// `Failed` call was answered: systemd said no.
    pub fn transient(&self) -> bool {
        matches!(
            self,
            SystemdError::Timeout { .. } | SystemdError::Spawn { .. }
        )
    }

    /// The wire code when this goes upstream.
    pub fn code(&self) -> powernode_proto::ErrorCode {
        match self {
            SystemdError::Spec { .. } => powernode_proto::ErrorCode::BadRequest,
            _ => powernode_proto::ErrorCode::Internal,
        }
    }
}

/// Runs `systemctl` or `journalctl` with arguments; blocking. A non-zero exit is
/// not an error here (`is-system-running` exits 1 when degraded and says so).
pub trait Systemctl: Send + Sync {
    fn run(&self, program: &str, args: &[String]) -> Result<CmdOutput, SystemdError>;
}

/// Runs `program args` and fails unless it exited 0.
fn checked(
    runner: &dyn Systemctl,
    program: &str,
    args: &[String],
) -> Result<CmdOutput, SystemdError> {
    let out = runner.run(program, args)?;
    if out.success {
        Ok(out)
    } else {
        Err(SystemdError::Failed {
            command: format!("{program} {}", args.join(" ")),
            stderr: out.stderr.trim().to_string(),
        })
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// The real programs, each call bounded by `timeout` (killed past it).
#[derive(Debug, Clone)]
pub struct RealSystemctl {
    pub timeout: Duration,
}

impl Default for RealSystemctl {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(15),
        }
    }
}

impl Systemctl for RealSystemctl {
    fn run(&self, program: &str, args: &[String]) -> Result<CmdOutput, SystemdError> {
        use std::io::Read;
        let spawn_err = |source| SystemdError::Spawn {
            program: program.to_string(),
            source,
        };
        let mut child = std::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        // Read both pipes off this thread so a chatty journalctl cannot fill one
        // while we wait for its exit.
        let mut out_pipe = child.stdout.take();
        let mut err_pipe = child.stderr.take();
        let out_reader = std::thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(p) = out_pipe.as_mut() {
                let _ = p.read_to_end(&mut s);
            }
            s
        });
        let err_reader = std::thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(p) = err_pipe.as_mut() {
                let _ = p.read_to_end(&mut s);
            }
            s
        });
        let deadline = std::time::Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait().map_err(spawn_err)? {
                Some(s) => break s,
                None if std::time::Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(SystemdError::Timeout {
                        program: program.to_string(),
                        timeout: self.timeout,
                    });
                }
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        let stdout = out_reader.join().unwrap_or_default();
        let stderr = err_reader.join().unwrap_or_default();
        Ok(CmdOutput {
            success: status.success(),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    }
}

/// Whether systemd is the init of this system (sd_booted(3): `/run/systemd/system`
/// is a directory).
pub fn booted() -> bool {
    std::path::Path::new(units::DEFAULT_UNIT_DIR).is_dir()
}

/// systemd's state, from the real `systemctl`; `None` when it cannot be asked.
pub fn system_state() -> Option<SystemdState> {
    system_state_with(&RealSystemctl::default())
}

/// systemd's state: `is-system-running`, the failed units and whether
/// `multi-user.target` is active. `None` when systemctl cannot be run or says
/// nothing (no systemd).
pub fn system_state_with(runner: &dyn Systemctl) -> Option<SystemdState> {
    let running = runner
        .run("systemctl", &args(&["is-system-running"]))
        .map_err(
            |e| tracing::debug!(error = %crate::error_chain(&e), "systemctl is-system-running"),
        )
        .ok()?;
    let state = running.stdout.trim().to_string();
    if state.is_empty() {
        return None;
    }
    let failed_units = runner
        .run(
            "systemctl",
            &args(&[
                "list-units",
                "--state=failed",
                "--plain",
                "--no-legend",
                "--no-pager",
            ]),
        )
        .map(|o| parse_failed_units(&o.stdout))
        .unwrap_or_default();
    // One call for the target and the agent's own unit (blocks in argument order),
    // one for the manager: when userspace started (systemd's exec).
    let units = runner
        .run(
            "systemctl",
            &args(&[
                "show",
                "multi-user.target",
                "powernode-agent.service",
                "-p",
                "ActiveState,ActiveEnterTimestampMonotonic,NRestarts",
            ]),
        )
        .map(|o| o.stdout)
        .unwrap_or_default();
    let mut blocks = units.split("\n\n").map(show_props);
    let (target, agent) = (
        blocks.next().unwrap_or_default(),
        blocks.next().unwrap_or_default(),
    );
    let multi_user = target.get("ActiveState").map(String::as_str) == Some("active");
    let manager = runner
        .run(
            "systemctl",
            &args(&["show", "-p", "UserspaceTimestampMonotonic"]),
        )
        .map(|o| show_props(&o.stdout))
        .unwrap_or_default();
    Some(SystemdState {
        state,
        failed_units,
        multi_user,
        multi_user_at_ms: multi_user
            .then(|| monotonic_ms(&target, "ActiveEnterTimestampMonotonic"))
            .flatten(),
        userspace_at_ms: monotonic_ms(&manager, "UserspaceTimestampMonotonic"),
        agent_restarts: agent
            .get("NRestarts")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
    })
}

/// `KEY=VALUE` lines of `systemctl show`.
fn show_props(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A `...TimestampMonotonic` property (µs since boot; 0 means never) in ms: the
/// same clock as the boot timeline (CLOCK_BOOTTIME, equal to it without suspend).
fn monotonic_ms(props: &std::collections::BTreeMap<String, String>, key: &str) -> Option<u64> {
    props
        .get(key)
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|us| *us > 0)
        .map(|us| us / 1000)
}

/// Unit names from `list-units --plain --no-legend`: the first column of each
/// line (a `●` marker may precede it on some versions).
fn parse_failed_units(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| *w != "●" && *w != "*")
                .map(str::to_string)
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use std::sync::Mutex;

    /// Records each call as one line (`systemctl start --no-block x.service`) and
    /// answers from `answer` (by the call's line), else success with no output.
    #[derive(Default)]
    pub struct Recorder {
        pub calls: Mutex<Vec<String>>,
        #[allow(clippy::type_complexity)]
        pub answer: Mutex<Option<Box<dyn FnMut(&str) -> Option<CmdOutput> + Send>>>,
    }

    impl Recorder {
        pub fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
        pub fn answer_with(&self, f: impl FnMut(&str) -> Option<CmdOutput> + Send + 'static) {
            *self.answer.lock().unwrap() = Some(Box::new(f));
        }
    }

    pub fn ok(stdout: &str) -> CmdOutput {
        CmdOutput {
            success: true,
            stdout: stdout.to_string(),
            stderr: String::new(),
        }
    }

    impl Systemctl for Recorder {
        fn run(&self, program: &str, args: &[String]) -> Result<CmdOutput, SystemdError> {
            let line = std::iter::once(program.to_string())
                .chain(args.iter().cloned())
                .collect::<Vec<_>>()
                .join(" ");
            self.calls.lock().unwrap().push(line.clone());
            if let Some(f) = self.answer.lock().unwrap().as_mut() {
                if let Some(out) = f(&line) {
                    return Ok(out);
                }
            }
            Ok(ok(""))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{ok, Recorder};
    use super::*;

    #[test]
    fn system_state_reads_state_failed_units_and_the_target() {
        let r = Recorder::default();
        r.answer_with(|line| match line {
            "systemctl is-system-running" => Some(CmdOutput {
                success: false,
                stdout: "degraded\n".into(),
                stderr: String::new(),
            }),
            l if l.starts_with("systemctl list-units") => Some(ok(
                "docker.service loaded failed failed Docker Application Container Engine\n\
                 ● web.service loaded failed failed Web\n",
            )),
            l if l.starts_with("systemctl show multi-user.target") => Some(ok(
                "ActiveState=active\nActiveEnterTimestampMonotonic=21456789\nNRestarts=0\n\n\
                 ActiveState=active\nActiveEnterTimestampMonotonic=20000000\nNRestarts=2\n",
            )),
            "systemctl show -p UserspaceTimestampMonotonic" => {
                Some(ok("UserspaceTimestampMonotonic=9123456\n"))
            }
            _ => None,
        });
        let s = system_state_with(&r).unwrap();
        assert_eq!(s.state, "degraded");
        assert_eq!(s.failed_units, vec!["docker.service", "web.service"]);
        assert!(s.multi_user && s.degraded());
        assert_eq!(s.multi_user_at_ms, Some(21456));
        assert_eq!(s.userspace_at_ms, Some(9123));
        assert_eq!(s.agent_restarts, 2);
        assert_eq!(
            r.calls(),
            vec![
                "systemctl is-system-running",
                "systemctl list-units --state=failed --plain --no-legend --no-pager",
                "systemctl show multi-user.target powernode-agent.service -p ActiveState,ActiveEnterTimestampMonotonic,NRestarts",
                "systemctl show -p UserspaceTimestampMonotonic",
            ]
        );
    }

    #[test]
    fn no_systemd_is_no_state() {
        struct Absent;
        impl Systemctl for Absent {
            fn run(&self, program: &str, _: &[String]) -> Result<CmdOutput, SystemdError> {
                Err(SystemdError::Spawn {
                    program: program.into(),
                    source: std::io::ErrorKind::NotFound.into(),
                })
            }
        }
        assert_eq!(system_state_with(&Absent), None);
    }

    #[test]
    fn the_real_runner_returns_output_and_status_and_bounds_a_hang() {
        let r = RealSystemctl::default();
        let out = r
            .run("sh", &args(&["-c", "echo hi; echo oops >&2; exit 3"]))
            .unwrap();
        assert_eq!((out.success, out.stdout.as_str()), (false, "hi\n"));
        assert_eq!(out.stderr, "oops\n");
        let quick = RealSystemctl {
            timeout: Duration::from_millis(200),
        };
        let t = std::time::Instant::now();
        assert!(matches!(
            quick.run("sleep", &args(&["5"])),
            Err(SystemdError::Timeout { .. })
        ));
        assert!(t.elapsed() < Duration::from_secs(3));
    }
}
