//! libvirt, driven through `virsh`: the domain XML of a [`crate::VmSpec`]
//! ([`domain`]), the calls a provider makes (create, ACPI shutdown, destroy, state,
//! list) and the event stream ([`events`]).
//!
//! Through `virsh` rather than the `virt` crate: the server must build and run on
//! hosts without libvirt (its other providers need none), and `virt` links
//! `libvirt.so` at build time; `virsh` is libvirt's own command-line client over the
//! same API, and a stand-in for it makes the provider testable without a daemon.
//! Every call has a deadline, so a hung daemon is an error, not a hung server.

pub mod domain;
pub mod events;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub use domain::{domain_xml, DomainError};
pub use events::{DomainEvent, EventKind, EventStream};

/// libvirt's system connection: QEMU started by the root daemon, as `libvirt-qemu`.
pub const DEFAULT_URI: &str = "qemu:///system";
/// Longest wait for one `virsh` call (a domain start under TCG takes about 0.5 s).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum VirshError {
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("libvirt has no domain {0}")]
    NoDomain(String),
    #[error("`virsh -c {uri} {args}` failed ({status}): {stderr}")]
    Failed {
        uri: String,
        args: String,
        status: String,
        stderr: String,
    },
    #[error("`virsh -c {uri} {args}` did not answer within {} s", timeout.as_secs())]
    Timeout {
        uri: String,
        args: String,
        timeout: Duration,
    },
    #[error("unexpected answer from `virsh {args}`: {output:?}")]
    Unexpected { args: String, output: String },
}

/// What `virsh dominfo` says of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomInfo {
    pub uuid: String,
    /// `running`, `paused`, `in shutdown`, `shut off`, `crashed`, ...
    pub state: String,
    pub persistent: bool,
}

impl DomInfo {
    /// Whether a QEMU process is behind the domain.
    pub fn active(&self) -> bool {
        matches!(
            self.state.as_str(),
            "running" | "paused" | "in shutdown" | "pmsuspended" | "idle" | "blocked"
        )
    }

    /// Parses `virsh dominfo` output (`Key:  value` lines).
    pub fn parse(text: &str) -> Option<Self> {
        let field = |key: &str| {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == key).then(|| v.trim().to_string())
            })
        };
        Some(Self {
            uuid: field("UUID")?,
            state: field("State")?,
            persistent: field("Persistent").as_deref() == Some("yes"),
        })
    }
}

/// A `virsh` program and the connection it talks to.
#[derive(Debug, Clone)]
pub struct Virsh {
    program: PathBuf,
    uri: String,
}

impl Virsh {
    pub fn new(program: impl Into<PathBuf>, uri: impl Into<String>) -> Self {
        Self {
            program: program.into(),
            uri: uri.into(),
        }
    }

    pub fn program(&self) -> &Path {
        &self.program
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// `virsh -c URI ARGS`, quiet and in the C locale (its messages are matched).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(["-q", "-c", &self.uri])
            .args(args)
            .env("LC_ALL", "C");
        cmd
    }

    /// Runs one call; its stdout, or a typed error with its stderr.
    pub fn run(&self, args: &[&str]) -> Result<String, VirshError> {
        let joined = args.join(" ");
        let mut cmd = self.command(args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().map_err(|source| VirshError::Spawn {
            program: self.program.to_string_lossy().into_owned(),
            source,
        })?;
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out = match rx.recv_timeout(CALL_TIMEOUT) {
            Ok(Ok(out)) => out,
            Ok(Err(source)) => {
                return Err(VirshError::Spawn {
                    program: self.program.to_string_lossy().into_owned(),
                    source,
                })
            }
            Err(_) => {
                // Not reaped yet (its waiter is still blocked), so the pid is still it.
                if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
                return Err(VirshError::Timeout {
                    uri: self.uri.clone(),
                    args: joined,
                    timeout: CALL_TIMEOUT,
                });
            }
        };
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        // `failed to get domain 'X'` (9.x) or `Domain not found` (older), for a domain
        // that is not there (any more).
        if stderr.contains("failed to get domain") || stderr.contains("Domain not found") {
            let name = args.last().copied().unwrap_or_default();
            return Err(VirshError::NoDomain(name.to_string()));
        }
        Err(VirshError::Failed {
            uri: self.uri.clone(),
            args: joined,
            status: out.status.to_string(),
            stderr,
        })
    }

    /// The daemon answers (`virsh version`): checked before a provider relies on it.
    pub fn version(&self) -> Result<String, VirshError> {
        self.run(&["version"])
    }

    /// Starts a transient domain from `xml`: it exists while its QEMU runs, and the
    /// file stays beside the VM's other files for whoever reads them.
    pub fn create(&self, xml: &Path) -> Result<(), VirshError> {
        self.run(&["create", &xml.to_string_lossy()]).map(drop)
    }

    pub fn dominfo(&self, name: &str) -> Result<DomInfo, VirshError> {
        let out = self.run(&["dominfo", name])?;
        DomInfo::parse(&out).ok_or_else(|| VirshError::Unexpected {
            args: format!("dominfo {name}"),
            output: out,
        })
    }

    /// Presses the ACPI power button.
    pub fn shutdown_acpi(&self, name: &str) -> Result<(), VirshError> {
        self.run(&["shutdown", "--mode", "acpi", name]).map(drop)
    }

    /// Kills the domain's QEMU (a transient domain is then gone). `false` when there
    /// was no such domain.
    pub fn destroy(&self, name: &str) -> Result<bool, VirshError> {
        match self.run(&["destroy", name]) {
            Ok(_) => Ok(true),
            Err(VirshError::NoDomain(_)) => Ok(false),
            // Defined but not running: nothing to kill.
            Err(VirshError::Failed { stderr, .. }) if stderr.contains("not running") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The names of the running domains.
    pub fn running_domains(&self) -> Result<Vec<String>, VirshError> {
        Ok(self
            .run(&["list", "--name"])?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// The QEMU pid of a running domain of the system connection (its pid file),
    /// for records and messages; `None` elsewhere.
    pub fn qemu_pid(&self, name: &str) -> Option<u32> {
        if self.uri != DEFAULT_URI {
            return None;
        }
        std::fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Where the system daemon keeps the domain's QEMU log (its command line and
    /// stderr).
    pub fn qemu_log(&self, name: &str) -> Option<PathBuf> {
        (self.uri == DEFAULT_URI)
            .then(|| PathBuf::from(format!("/var/log/libvirt/qemu/{name}.log")))
    }

    pub fn events(&self) -> Result<EventStream, VirshError> {
        EventStream::start(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn dominfo_is_parsed() {
        let text = "Id:             3\nName:           powernode-i\nUUID:           24e85b06-ca40-46a9-8b6d-8a4887b3646a\nOS Type:        hvm\nState:          running\nCPU(s):         1\nPersistent:     no\n";
        let info = DomInfo::parse(text).unwrap();
        assert_eq!(info.uuid, "24e85b06-ca40-46a9-8b6d-8a4887b3646a");
        assert!(info.active() && !info.persistent);
        let off = DomInfo::parse("UUID: u\nState: shut off\n").unwrap();
        assert!(!off.active());
        assert_eq!(DomInfo::parse("State: running\n"), None);
    }

    fn fake(dir: &Path, body: &str) -> Virsh {
        let p = dir.join("virsh");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        Virsh::new(p, "test:///x")
    }

    #[test]
    fn failures_are_typed_with_what_virsh_said() {
        let tmp = tempfile::tempdir().unwrap();
        let v = fake(
            tmp.path(),
            "echo \"error: failed to get domain '$5'\" >&2; exit 1",
        );
        assert!(matches!(v.dominfo("d"), Err(VirshError::NoDomain(n)) if n == "d"));
        assert!(!v.destroy("d").unwrap());
        let v = fake(
            tmp.path(),
            "echo 'error: Failed to connect socket' >&2; exit 1",
        );
        let err = v.version().unwrap_err();
        assert!(
            err.to_string().contains("Failed to connect socket")
                && err.to_string().contains("test:///x version"),
            "{err}"
        );
        let v = fake(tmp.path(), "echo garbage");
        assert!(matches!(v.dominfo("d"), Err(VirshError::Unexpected { .. })));
        let v = Virsh::new(tmp.path().join("missing"), DEFAULT_URI);
        assert!(matches!(v.version(), Err(VirshError::Spawn { .. })));
    }

    #[test]
    fn the_event_stream_delivers_lines_and_says_when_it_ended() {
        let tmp = tempfile::tempdir().unwrap();
        let v = fake(
            tmp.path(),
            "echo \"event 'reboot' for domain 'a'\"; echo \"event 'lifecycle' for domain 'a': Stopped Shutdown\"; echo bye >&2",
        );
        let mut s = v.events().unwrap();
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while s.ended().is_none() && std::time::Instant::now() < deadline {
            got.extend(s.drain());
            std::thread::sleep(Duration::from_millis(10));
        }
        let kinds: Vec<_> = got.iter().map(|e| e.kind.clone()).collect();
        assert_eq!(kinds.len(), 2, "{kinds:?}");
        assert_eq!(kinds[0], EventKind::Reboot);
        assert!(s.ended().unwrap().contains("bye"), "{:?}", s.ended());
    }

    #[test]
    fn a_dropped_stream_ends_its_virsh() {
        let tmp = tempfile::tempdir().unwrap();
        let pidfile = tmp.path().join("pid");
        let v = fake(
            tmp.path(),
            &format!("echo $$ > {}; exec sleep 600", pidfile.display()),
        );
        let s = v.events().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let pid = loop {
            if let Ok(p) = std::fs::read_to_string(&pidfile) {
                if let Ok(p) = p.trim().parse::<u32>() {
                    break p;
                }
            }
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        };
        drop(s);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(stat.is_empty() || stat.contains(") Z "), "{stat}");
    }
}
