//! The boot timeline: when each phase was reached, in milliseconds since the kernel
//! started (CLOCK_BOOTTIME, which keeps counting across suspend), so an operator can
//! see where boot time went without SSH. Also the failure report sent upstream.

use powernode_proto::node::{FailureReport, Phase, TimelineEntry};
use powernode_proto::ErrorCode;

/// Milliseconds since boot from CLOCK_BOOTTIME.
pub fn boot_ms() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1000).saturating_add(nanos / 1_000_000)
}

/// Phases in the order they were first reached. A phase is recorded once: the first
/// time counts, so a retried phase does not hide how long the first attempt took.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timeline {
    entries: Vec<TimelineEntry>,
}

impl Timeline {
    pub fn new() -> Self {
        Self::default()
    }

    /// A timeline for a process started after boot: the kernel started at 0 ms.
    pub fn since_boot() -> Self {
        let mut t = Self::new();
        t.mark_at(Phase::KernelStart, 0);
        t
    }

    /// Continues a timeline handed over by an earlier stage (the init).
    pub fn from_entries(entries: Vec<TimelineEntry>) -> Self {
        let mut t = Self::new();
        for e in entries {
            t.mark_at(e.phase, e.at_ms);
        }
        t
    }

    /// Records `phase` now; returns the timestamp used (or the earlier one).
    pub fn mark(&mut self, phase: Phase) -> u64 {
        self.mark_at(phase, boot_ms())
    }

    pub fn mark_at(&mut self, phase: Phase, at_ms: u64) -> u64 {
        if let Some(e) = self.entries.iter().find(|e| e.phase == phase) {
            return e.at_ms;
        }
        self.entries.push(TimelineEntry { phase, at_ms });
        at_ms
    }

    pub fn get(&self, phase: Phase) -> Option<u64> {
        self.entries
            .iter()
            .find(|e| e.phase == phase)
            .map(|e| e.at_ms)
    }

    /// Milliseconds between two recorded phases.
    pub fn between(&self, from: Phase, to: Phase) -> Option<u64> {
        Some(self.get(to)?.saturating_sub(self.get(from)?))
    }

    /// Merges a timeline an earlier stage left in a file (a JSON array of entries,
    /// e.g. the init's `<state-dir>/timeline.json`). A missing file is fine; a broken
    /// one is reported so the caller can log it, and nothing is merged.
    pub fn merge_file(&mut self, path: &std::path::Path) -> Result<usize, TimelineFileError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(TimelineFileError::Read(e)),
        };
        if bytes.len() > 64 * 1024 {
            return Err(TimelineFileError::TooLarge(bytes.len()));
        }
        let entries: Vec<TimelineEntry> =
            serde_json::from_slice(&bytes).map_err(TimelineFileError::Json)?;
        let n = entries.len();
        let mut merged = Self::from_entries(entries);
        for e in &self.entries {
            merged.mark_at(e.phase, e.at_ms);
        }
        merged.entries.sort_by_key(|e| e.at_ms);
        *self = merged;
        Ok(n)
    }

    pub fn entries(&self) -> &[TimelineEntry] {
        &self.entries
    }

    pub fn to_vec(&self) -> Vec<TimelineEntry> {
        self.entries.clone()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TimelineFileError {
    #[error("cannot read the handed-over timeline")]
    Read(#[source] std::io::Error),
    #[error("handed-over timeline is {0} bytes, too large")]
    TooLarge(usize),
    #[error("handed-over timeline is not a JSON list of entries")]
    Json(#[source] serde_json::Error),
}

/// A machine-readable failure for the control plane. The message is the error's
/// whole chain, so the operator sees the cause without the node's console.
pub fn failure_report(
    phase: Phase,
    code: ErrorCode,
    err: &(dyn std::error::Error + 'static),
    attempt: u32,
) -> FailureReport {
    FailureReport {
        phase,
        code,
        message: crate::error_chain(err),
        attempt,
        recovery: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_clock_is_monotonic_and_plausible() {
        let a = boot_ms();
        let b = boot_ms();
        assert!(b >= a);
        // The machine has been up for more than 0 ms and less than ten years.
        assert!(a > 0 && a < 10 * 365 * 24 * 3600 * 1000);
    }

    #[test]
    fn first_mark_wins_and_order_is_kept() {
        let mut t = Timeline::since_boot();
        t.mark_at(Phase::IdentityFound, 1200);
        t.mark_at(Phase::Enrolled, 1500);
        assert_eq!(t.mark_at(Phase::IdentityFound, 9999), 1200);
        let phases: Vec<_> = t.entries().iter().map(|e| e.phase).collect();
        assert_eq!(
            phases,
            vec![Phase::KernelStart, Phase::IdentityFound, Phase::Enrolled]
        );
        assert_eq!(t.between(Phase::IdentityFound, Phase::Enrolled), Some(300));
        assert_eq!(t.between(Phase::Enrolled, Phase::Ready), None);
        let now = t.mark(Phase::Ready);
        assert!(now >= boot_ms().saturating_sub(1000));
        let json = serde_json::to_value(t.entries()).unwrap();
        assert_eq!(
            json[0],
            serde_json::json!({"phase":"kernel_start","at_ms":0})
        );
    }

    #[test]
    fn handed_over_entries_are_continued() {
        let t = Timeline::from_entries(vec![
            TimelineEntry {
                phase: Phase::InitStart,
                at_ms: 800,
            },
            TimelineEntry {
                phase: Phase::InitStart,
                at_ms: 900,
            },
            TimelineEntry {
                phase: Phase::NetworkUp,
                at_ms: 1000,
            },
        ]);
        assert_eq!(t.entries().len(), 2);
        assert_eq!(t.get(Phase::InitStart), Some(800));
    }

    #[test]
    fn handed_over_file_is_merged_earliest_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("timeline.json");
        let mut t = Timeline::since_boot();
        t.mark_at(Phase::AgentStarted, 5000);
        assert_eq!(t.merge_file(&path).unwrap(), 0, "missing file is fine");
        std::fs::write(
            &path,
            r#"[{"phase":"init_start","at_ms":700},{"phase":"network_up","at_ms":2100}]"#,
        )
        .unwrap();
        assert_eq!(t.merge_file(&path).unwrap(), 2);
        let phases: Vec<_> = t.entries().iter().map(|e| e.phase).collect();
        assert_eq!(
            phases,
            vec![
                Phase::KernelStart,
                Phase::InitStart,
                Phase::NetworkUp,
                Phase::AgentStarted
            ]
        );
        std::fs::write(&path, "[{\"phase\":").unwrap();
        assert!(matches!(
            t.merge_file(&path),
            Err(TimelineFileError::Json(_))
        ));
        assert_eq!(t.entries().len(), 4, "nothing merged from a broken file");
    }

    #[test]
    fn failure_report_carries_the_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("enrollment failed")]
        struct Outer(#[source] std::io::Error);
        let err = Outer(std::io::Error::other("connection refused"));
        let r = failure_report(Phase::Enrolled, ErrorCode::Network, &err, 3);
        assert_eq!(r.message, "enrollment failed: connection refused");
        assert_eq!(r.attempt, 3);
        assert_eq!(r.code, ErrorCode::Network);
    }
}
