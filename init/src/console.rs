//! The console and `/dev/kmsg` for code that has no [`Sys`](crate::sys::Sys): the
//! logger and the panic hook write here, and `RealSys` writes its console lines
//! through the same function. It sits below both the logger and the syscall seam,
//! so neither has to import the other for it.
//!
//! It also keeps the last [`MAX_CONSOLE_LINES`] console lines (each cut to the boot
//! report's line limit) in a bounded ring, so a failure before enrollment can send
//! them upstream with its boot report ([`recent`]).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Mutex;

use powernode_proto::boot_report::{bound_lines, MAX_CONSOLE_LINES};

/// Prefix of the init's structured console lines (one JSON object each).
pub const EVENT_PREFIX: &str = "POWERNODE-INIT ";

/// Milliseconds since boot, for callers without a `Sys` (the logger, the panic hook).
pub fn boot_ms_now() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1000).saturating_add(nanos / 1_000_000)
}

/// `/dev/kmsg` for the logger; `None` before `/dev` is mounted.
pub fn open_kmsg() -> Option<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .ok()
}

static RECENT: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());

/// Keeps `line` among the recent console lines (the oldest falls out past
/// [`MAX_CONSOLE_LINES`]; a long line is cut).
pub fn remember(line: &str) {
    let (mut cut, _) = bound_lines(std::slice::from_ref(&line.to_string()));
    let Some(line) = cut.pop() else {
        return;
    };
    let mut ring = RECENT.lock().unwrap_or_else(|p| p.into_inner());
    ring.push_back(line);
    while ring.len() > MAX_CONSOLE_LINES {
        ring.pop_front();
    }
}

/// The recent console lines, oldest first.
pub fn recent() -> Vec<String> {
    let ring = RECENT.lock().unwrap_or_else(|p| p.into_inner());
    ring.iter().cloned().collect()
}

/// Writes one line to the console, ignoring errors (there is nowhere else to say so),
/// and keeps it among the [`recent`] lines.
pub fn console_line(line: &str) {
    remember(line);
    // One write with its newline: the kernel prints to the same console whenever it
    // likes, and a separate newline write is where its records slip in.
    let mut text = String::with_capacity(line.len() + 1);
    text.push_str(line);
    text.push('\n');
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_lines_cut_to_the_limit() {
        for i in 0..(MAX_CONSOLE_LINES + 20) {
            remember(&format!("ring line {i}"));
        }
        remember(&"w".repeat(1000));
        let lines = recent();
        assert_eq!(lines.len(), MAX_CONSOLE_LINES);
        let last = format!("ring line {}", MAX_CONSOLE_LINES + 19);
        assert!(lines.contains(&last));
        assert!(
            !lines.contains(&"ring line 0".to_string()),
            "the oldest fell out"
        );
        assert_eq!(
            lines.last().map(String::len),
            Some(powernode_proto::boot_report::MAX_LINE_BYTES)
        );
    }
}
