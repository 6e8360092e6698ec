//! QMP, QEMU's JSON control protocol on a unix socket ([`crate::Device::Qmp`]): one
//! command at a time ([`execute`], e.g. the ACPI power button), and the stream of
//! events a watcher reads without blocking ([`QmpEvents`]: `RESET` when the machine
//! reset in place, `SHUTDOWN` with the reason before QEMU exits).
//!
//! A QMP socket serves one client at a time, so a VM that is watched has two: one
//! the watcher keeps open, one for commands.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// One QMP event (`{"event": NAME, "data": {...}, "timestamp": {...}}`).
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub event: String,
    pub data: serde_json::Value,
    /// When QEMU emitted it (host time, seconds since the epoch), if it said.
    pub timestamp: Option<f64>,
}

impl QmpEvent {
    /// A `RESET` or `SHUTDOWN` event's `reason` (`guest-reset`, `guest-shutdown`,
    /// `host-qmp-system-reset`, ...); empty when QEMU gave none.
    pub fn reason(&self) -> &str {
        self.data["reason"].as_str().unwrap_or_default()
    }

    /// Whether the guest asked for it (`data.guest`), not the host.
    pub fn by_guest(&self) -> bool {
        self.data["guest"].as_bool().unwrap_or(false)
    }
}

/// Parses one line of the QMP stream: `Some` for an event, `None` for anything else
/// (the greeting, a command's answer, a line that is not JSON).
pub fn parse_event(line: &str) -> Option<QmpEvent> {
    let v: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    let event = v.get("event")?.as_str()?.to_string();
    let data = v.get("data").cloned().unwrap_or(serde_json::Value::Null);
    let ts = &v["timestamp"];
    let timestamp = ts["seconds"]
        .as_u64()
        .map(|s| s as f64 + ts["microseconds"].as_u64().unwrap_or(0) as f64 / 1e6);
    Some(QmpEvent {
        event,
        data,
        timestamp,
    })
}

/// Connects, reads the greeting and leaves capabilities negotiation (after which
/// QEMU sends events). Every read and write is bounded by `timeout`.
fn handshake(
    path: &Path,
    timeout: Duration,
) -> std::io::Result<(UnixStream, BufReader<UnixStream>)> {
    let stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut writer = stream;
    send(&mut writer, &mut reader, "qmp_capabilities")?;
    Ok((writer, reader))
}

/// Sends `{"execute": cmd}` and waits for its answer (an event may come between).
fn send(
    writer: &mut UnixStream,
    reader: &mut BufReader<UnixStream>,
    cmd: &str,
) -> std::io::Result<()> {
    writer.write_all(format!("{{\"execute\":\"{cmd}\"}}\n").as_bytes())?;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other(format!(
                "QMP closed before answering {cmd}"
            )));
        }
        if line.contains("\"error\"") {
            return Err(std::io::Error::other(format!("QMP {cmd}: {}", line.trim())));
        }
        if line.contains("\"return\"") {
            return Ok(());
        }
    }
}

/// Runs one argument-less command (`system_powerdown`, `system_reset`) on the QMP
/// socket at `path`. Returns once QEMU accepted it, not when its effect is done.
pub fn execute(path: &Path, cmd: &str, timeout: Duration) -> std::io::Result<()> {
    let (mut writer, mut reader) = handshake(path, timeout)?;
    send(&mut writer, &mut reader, cmd)
}

/// A QMP connection kept open for its events, read without blocking.
#[derive(Debug)]
pub struct QmpEvents {
    stream: UnixStream,
    /// Bytes of a line not complete yet.
    partial: Vec<u8>,
    closed: bool,
}

impl QmpEvents {
    /// Connects to the socket at `path` and negotiates (bounded by `timeout`); from
    /// then on reads never block.
    pub fn connect(path: &Path, timeout: Duration) -> std::io::Result<Self> {
        let (stream, reader) = handshake(path, timeout)?;
        // Whatever the reader buffered past the answer (an early event) is kept.
        let partial = reader.buffer().to_vec();
        stream.set_nonblocking(true)?;
        Ok(Self {
            stream,
            partial,
            closed: false,
        })
    }

    /// The events that arrived since the last call, in order.
    pub fn drain(&mut self) -> Vec<QmpEvent> {
        let mut buf = [0u8; 4096];
        while !self.closed {
            match self.stream.read(&mut buf) {
                Ok(0) => self.closed = true,
                Ok(n) => self.partial.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => self.closed = true,
            }
        }
        let mut out = Vec::new();
        while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            if let Some(ev) = parse_event(&String::from_utf8_lossy(&line)) {
                out.push(ev);
            }
        }
        out
    }

    /// Whether QEMU closed the connection (it exited, or dropped this client).
    pub fn closed(&self) -> bool {
        self.closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn events_are_parsed_with_their_reason_and_other_lines_are_not_events() {
        let reset = parse_event(
            r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESET", "data": {"guest": true, "reason": "guest-reset"}}"#,
        )
        .unwrap();
        assert_eq!(reset.event, "RESET");
        assert_eq!(reset.timestamp, Some(1.000002));
        assert_eq!(reset.reason(), "guest-reset");
        assert!(reset.by_guest());
        let host = parse_event(
            r#"{"event": "RESET", "data": {"guest": false, "reason": "host-qmp-system-reset"}}"#,
        )
        .unwrap();
        assert!(!host.by_guest());
        let bare = parse_event(r#"{"event": "STOP"}"#).unwrap();
        assert_eq!((bare.reason(), bare.by_guest()), ("", false));
        assert_eq!(bare.timestamp, None);
        for other in [
            r#"{"QMP": {"version": {}, "capabilities": []}}"#,
            r#"{"return": {}}"#,
            "not json",
            "",
            r#"{"event": 7}"#,
        ] {
            assert_eq!(parse_event(other), None, "{other}");
        }
    }

    /// The watcher negotiates, then reads events as they come, split across writes,
    /// without ever blocking; QEMU going away is seen as closed.
    #[test]
    fn the_event_stream_is_read_without_blocking_until_qemu_closes_it() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("events.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<&'static str>();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("qmp_capabilities"), "{line}");
            s.write_all(b"{\"return\": {}}\n").unwrap();
            while let Ok(chunk) = go_rx.recv() {
                s.write_all(chunk.as_bytes()).unwrap();
            }
        });
        let mut events = QmpEvents::connect(&sock, Duration::from_secs(5)).unwrap();
        let t = std::time::Instant::now();
        assert_eq!(events.drain(), []);
        assert!(t.elapsed() < Duration::from_secs(1));
        go_tx
            .send("{\"event\": \"RESET\", \"data\": {\"guest\": true, \"reason\": \"guest-re")
            .unwrap();
        go_tx.send("set\"}}\n{\"event\": \"STOP\"}\n").unwrap();
        let mut got = Vec::new();
        for _ in 0..100 {
            got.extend(events.drain());
            if got.len() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let names: Vec<&str> = got.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(names, ["RESET", "STOP"]);
        assert_eq!(got[0].reason(), "guest-reset");
        assert!(!events.closed());
        drop(go_tx);
        server.join().unwrap();
        for _ in 0..100 {
            events.drain();
            if events.closed() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(events.closed());
    }

    #[test]
    fn no_socket_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(QmpEvents::connect(&dir.path().join("absent"), Duration::from_secs(1)).is_err());
    }
}
