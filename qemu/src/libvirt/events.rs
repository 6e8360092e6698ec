//! libvirt's domain events as `virsh event --all --loop` prints them, one per line:
//! `event 'reboot' for domain 'NAME'` (the guest reset in place) and
//! `event 'lifecycle' for domain 'NAME': Stopped Shutdown` (state and reason).
//!
//! The stream runs in a thread of its own that also starts the `virsh` process, which
//! gets a parent-death signal: it ends with that thread (the stream dropped, or this
//! process killed), never later, whatever thread created the stream.

use std::io::{BufRead as _, BufReader, Read as _};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{Virsh, VirshError};

/// One event, stamped with when this process read it (events arrive as they happen:
/// the reader blocks on the stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainEvent {
    pub domain: String,
    pub kind: EventKind,
    pub at: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// The guest reset in place (`on_reboot=restart`).
    Reboot,
    /// A lifecycle change: `state` is `Started`, `Stopped`, `Shutdown`, ...; `detail`
    /// says why (`Shutdown`, `Destroyed`, `Crashed`, `Failed`, `Finished after guest
    /// request`, ...).
    Lifecycle { state: String, detail: String },
}

/// Parses one line of `virsh event` output; `None` for lines and event kinds this
/// crate does not use.
pub fn parse_event_line(line: &str) -> Option<(String, EventKind)> {
    // `--timestamp` puts a time before `event`; accept either form.
    let rest = &line[line.find("event '")? + "event '".len()..];
    let (kind, rest) = rest.split_once('\'')?;
    let rest = rest.strip_prefix(" for domain '")?;
    // The name is quoted; lifecycle events go on after `': `.
    let (domain, detail) = match rest.rfind("': ") {
        Some(i) if kind == "lifecycle" => (&rest[..i], Some(&rest[i + 3..])),
        _ => (rest.strip_suffix('\'')?, None),
    };
    let kind = match (kind, detail) {
        ("reboot", None) => EventKind::Reboot,
        ("lifecycle", Some(detail)) => {
            let (state, detail) = detail.trim().split_once(' ').unwrap_or((detail.trim(), ""));
            EventKind::Lifecycle {
                state: state.to_string(),
                detail: detail.to_string(),
            }
        }
        _ => return None,
    };
    Some((domain.to_string(), kind))
}

/// What the reader thread sends.
#[derive(Debug)]
enum Item {
    Event(DomainEvent),
    /// The stream ended: `virsh` exited (libvirtd went away, say), with its stderr.
    Ended(String),
}

/// A running `virsh event --all --loop`.
#[derive(Debug)]
pub struct EventStream {
    rx: Receiver<Item>,
    child: Arc<Mutex<Option<Child>>>,
    ended: Option<String>,
}

impl EventStream {
    /// Starts the stream; events that happen from now on are read.
    pub fn start(virsh: &Virsh) -> Result<Self, VirshError> {
        let (tx, rx) = mpsc::channel();
        let (started_tx, started_rx) = mpsc::channel();
        let child = Arc::new(Mutex::new(None));
        let slot = Arc::clone(&child);
        let mut cmd = virsh.command(&["event", "--all", "--loop"]);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let program = virsh.program().to_string_lossy().into_owned();
        std::thread::Builder::new()
            .name("virsh-events".into())
            .spawn(move || read_events(cmd, slot, started_tx, tx))
            .map_err(|source| VirshError::Spawn {
                program: program.clone(),
                source,
            })?;
        match started_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                rx,
                child,
                ended: None,
            }),
            Ok(Err(source)) => Err(VirshError::Spawn { program, source }),
            Err(_) => Err(VirshError::Spawn {
                program,
                source: std::io::Error::other("the event thread ended before starting virsh"),
            }),
        }
    }

    /// The events read since the last call (never blocks).
    pub fn drain(&mut self) -> Vec<DomainEvent> {
        let mut out = Vec::new();
        loop {
            match self.rx.try_recv() {
                Ok(Item::Event(e)) => out.push(e),
                Ok(Item::Ended(why)) => self.ended = Some(why),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.ended
                        .get_or_insert_with(|| "the event thread ended".into());
                    break;
                }
            }
        }
        out
    }

    /// Why the stream ended, once it has (after [`EventStream::drain`] saw it).
    pub fn ended(&self) -> Option<&str> {
        self.ended.as_deref()
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if let Some(child) = self
            .child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            // Through the handle: a child the reader already reaped is not signalled.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn read_events(
    mut cmd: Command,
    slot: Arc<Mutex<Option<Child>>>,
    started: mpsc::Sender<std::io::Result<()>>,
    tx: mpsc::Sender<Item>,
) {
    crate::sys::kill_with_parent(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = started.send(Err(e));
            return;
        }
    };
    let (stdout, mut stderr) = (child.stdout.take(), child.stderr.take());
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
    let _ = started.send(Ok(()));
    if let Some(stdout) = stdout {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some((domain, kind)) = parse_event_line(&line) {
                let event = DomainEvent {
                    domain,
                    kind,
                    at: Instant::now(),
                };
                if tx.send(Item::Event(event)).is_err() {
                    break;
                }
            }
        }
    }
    let mut why = String::new();
    if let Some(err) = stderr.as_mut() {
        let _ = err.take(4096).read_to_string(&mut why);
    }
    let status = slot
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_mut()
        .map(|c| c.wait().map(|s| s.to_string()).unwrap_or_default())
        .unwrap_or_default();
    let _ = tx.send(Item::Ended(format!(
        "virsh event ended ({status}): {}",
        why.trim()
    )));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lifecycle(state: &str, detail: &str) -> EventKind {
        EventKind::Lifecycle {
            state: state.into(),
            detail: detail.into(),
        }
    }

    #[test]
    fn the_lines_virsh_prints_are_parsed() {
        assert_eq!(
            parse_event_line("event 'reboot' for domain 'powernode-inst-1'"),
            Some(("powernode-inst-1".into(), EventKind::Reboot))
        );
        assert_eq!(
            parse_event_line(
                "2026-12-07 15:13:30.663+0000: event 'lifecycle' for domain 'powernode-a': Stopped Destroyed"
            ),
            Some(("powernode-a".into(), lifecycle("Stopped", "Destroyed")))
        );
        assert_eq!(
            parse_event_line(
                "event 'lifecycle' for domain 'd': Shutdown Finished after guest request"
            ),
            Some((
                "d".into(),
                lifecycle("Shutdown", "Finished after guest request")
            ))
        );
        // A name with the separator in it still parses from the right.
        assert_eq!(
            parse_event_line("event 'lifecycle' for domain 'a': b': Started Booted"),
            Some(("a': b".into(), lifecycle("Started", "Booted")))
        );
    }

    #[test]
    fn other_events_and_noise_are_skipped() {
        for line in [
            "",
            "event loop interrupted",
            "event 'device-added' for domain 'd': virtio-disk1",
            "event 'reboot' for domain",
            "event 'lifecycle' for domain 'd'",
        ] {
            assert_eq!(parse_event_line(line), None, "{line}");
        }
    }
}
