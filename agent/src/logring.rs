//! The agent's last log lines, kept in memory for `collect_diagnostics` when the agent
//! runs as a plain process (as PID 1 the init's logs go to the kernel log, which the
//! diagnostics read instead). [`TeeStderr`] is a log writer that writes to stderr and
//! keeps a copy of each line in a bounded ring.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Mutex;

/// Lines kept; the diagnostics ask for at most a couple of hundred.
const CAPACITY: usize = 500;
/// A longer line is cut: one runaway message must not fill the result.
const MAX_LINE: usize = 2048;

static RING: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());

fn ring() -> std::sync::MutexGuard<'static, VecDeque<String>> {
    RING.lock().unwrap_or_else(|p| p.into_inner())
}

/// Keeps `text`'s lines (without trailing newlines), dropping the oldest past the
/// capacity.
pub fn push(text: &str) {
    let mut r = ring();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut line = line.to_string();
        if line.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
        }
        r.push_back(line);
        if r.len() > CAPACITY {
            r.pop_front();
        }
    }
}

/// The last `n` lines, oldest first.
pub fn tail(n: usize) -> Vec<String> {
    let r = ring();
    r.iter().skip(r.len().saturating_sub(n)).cloned().collect()
}

/// A `tracing_subscriber` writer: stderr, plus a copy in the ring.
#[derive(Debug, Default, Clone, Copy)]
pub struct TeeStderr;

impl Write for TeeStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        push(&String::from_utf8_lossy(buf));
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for TeeStderr {
    type Writer = TeeStderr;
    fn make_writer(&'a self) -> Self::Writer {
        TeeStderr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines_bounded() {
        push("first\nsecond\n\n");
        push(&"x".repeat(MAX_LINE + 10));
        for i in 0..CAPACITY {
            push(&format!("line {i}"));
        }
        let t = tail(3);
        assert_eq!(
            t,
            vec![
                format!("line {}", CAPACITY - 3),
                format!("line {}", CAPACITY - 2),
                format!("line {}", CAPACITY - 1)
            ]
        );
        assert_eq!(tail(usize::MAX).len(), CAPACITY);
        assert!(tail(usize::MAX).iter().all(|l| l.len() <= MAX_LINE));
        assert!(!tail(CAPACITY).contains(&"first".to_string()));
    }
}
