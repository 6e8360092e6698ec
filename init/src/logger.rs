//! `log` backend for PID 1: each record goes to `/dev/kmsg` (so it lands in the
//! kernel ring buffer with the kernel's timestamp, and on the console at the
//! console log level), and straight to the console when the kernel will not show it
//! there (`quiet`) or when `/dev/kmsg` is unavailable.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::console;

struct Logger {
    kmsg: Mutex<Option<std::fs::File>>,
    echo: AtomicBool,
    /// Under systemd: lines go to stderr, which the journal keeps under the unit.
    stderr: AtomicBool,
}

static LOGGER: Logger = Logger {
    kmsg: Mutex::new(None),
    echo: AtomicBool::new(false),
    stderr: AtomicBool::new(false),
};

/// kmsg priority of a level (`<3>` err ... `<7>` debug).
pub fn kmsg_priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// One kmsg record: priority, our name, the message on one line.
pub fn kmsg_line(level: log::Level, msg: &str) -> String {
    format!(
        "<{}>powernode-init: {}\n",
        kmsg_priority(level),
        msg.replace('\n', " ")
    )
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let msg = record.args().to_string();
        if self.stderr.load(Ordering::Relaxed) {
            // `<N>` is the sd-daemon priority prefix journald reads from stderr.
            let line = format!(
                "<{}>{}\n",
                kmsg_priority(record.level()),
                msg.replace('\n', " ")
            );
            let _ = std::io::stderr().write_all(line.as_bytes());
            return;
        }
        let mut wrote_kmsg = false;
        if let Ok(mut kmsg) = self.kmsg.lock() {
            if let Some(file) = kmsg.as_mut() {
                wrote_kmsg = file
                    .write_all(kmsg_line(record.level(), &msg).as_bytes())
                    .is_ok();
            }
        }
        // `quiet` sets the console log level to 4: the kernel still prints errors
        // (priority 3) but no longer warnings or info.
        let kernel_shows = wrote_kmsg
            && (record.level() <= log::Level::Error || !self.echo.load(Ordering::Relaxed));
        let line = format!(
            "[{:>7}ms] powernode-init {}: {msg}",
            console::boot_ms_now(),
            record.level()
        );
        if kernel_shows {
            // The kernel prints it; a boot report still wants it among the recent lines.
            console::remember(&line);
        } else {
            console::console_line(&line);
        }
    }

    fn flush(&self) {
        if let Ok(mut kmsg) = self.kmsg.lock() {
            if let Some(file) = kmsg.as_mut() {
                let _ = file.flush();
            }
        }
        let _ = std::io::stdout().flush();
    }
}

/// Installs the logger, writing to `/dev/kmsg` when it can be opened. Called once
/// `/dev` is mounted; calling it again reopens `/dev/kmsg`.
pub fn start() {
    if let Ok(mut kmsg) = LOGGER.kmsg.lock() {
        *kmsg = console::open_kmsg();
    }
    // Only the first call installs; later ones just reopened kmsg above.
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}

/// Installs the logger writing to stderr only (the agent as a systemd service).
pub fn start_stderr() {
    LOGGER.stderr.store(true, Ordering::Relaxed);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}

/// `quiet` on the command line: echo info lines to the console ourselves.
pub fn set_console_echo(echo: bool) {
    LOGGER.echo.store(echo, Ordering::Relaxed);
}

pub fn flush() {
    log::logger().flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kmsg_lines_carry_priority_and_stay_on_one_line() {
        assert_eq!(
            kmsg_line(log::Level::Error, "a\nb"),
            "<3>powernode-init: a b\n"
        );
        assert_eq!(kmsg_priority(log::Level::Info), 6);
    }
}
