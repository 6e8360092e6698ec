//! The console and `/dev/kmsg` for code that has no [`Sys`](crate::sys::Sys): the
//! logger and the panic hook write here, and `RealSys` writes its console lines
//! through the same function. It sits below both the logger and the syscall seam,
//! so neither has to import the other for it.

use std::io::Write;

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

/// Writes one line to the console, ignoring errors (there is nowhere else to say so).
pub fn console_line(line: &str) {
    // One write with its newline: the kernel prints to the same console whenever it
    // likes, and a separate newline write is where its records slip in.
    let mut text = String::with_capacity(line.len() + 1);
    text.push_str(line);
    text.push('\n');
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}
