//! The failure policy (`powernode.on_failure=poweroff|reboot|retry`), the retry
//! backoff, and the panic hook that applies the same policy if a bug panics anyway.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use crate::cmdline::FailurePolicy;
use crate::sys::{self, Errno, RealSys, RebootKind, Sys};

/// The policy the panic hook applies; set once the command line is read. Until then
/// a panic reboots (what `retry` means for a process that cannot continue).
static POLICY: AtomicU8 = AtomicU8::new(2);

pub fn set_policy(policy: FailurePolicy) {
    POLICY.store(
        match policy {
            FailurePolicy::Poweroff => 0,
            FailurePolicy::Reboot => 1,
            FailurePolicy::Retry => 2,
        },
        Ordering::Relaxed,
    );
}

pub fn policy() -> FailurePolicy {
    match POLICY.load(Ordering::Relaxed) {
        0 => FailurePolicy::Poweroff,
        1 => FailurePolicy::Reboot,
        _ => FailurePolicy::Retry,
    }
}

/// Delay before retry number `attempt` (1-based): 1 s, 2 s, 4 s ... capped at 60 s.
pub fn backoff(attempt: u32) -> Duration {
    let secs = 1u64
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u64::MAX);
    Duration::from_secs(secs.min(60))
}

/// How the boot ended, when it ends at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `reboot(2)` was called (on a real kernel it does not return).
    Reset(RebootKind),
    /// `reboot(2)` failed; the caller parks.
    ResetFailed(RebootKind, Errno),
    /// All phases done and nothing to hand off to yet.
    Idle,
}

/// Flushes logs and file systems, then powers off or reboots.
pub fn reset(sys: &mut dyn Sys, kind: RebootKind) -> Outcome {
    crate::logger::flush();
    sys.sync();
    match sys.reboot(kind) {
        Ok(()) => Outcome::Reset(kind),
        Err(errno) => {
            log::error!("reboot({kind:?}) failed: {errno}");
            Outcome::ResetFailed(kind, errno)
        }
    }
}

/// PID 1 must never exit: sleep forever.
pub fn park(sys: &mut dyn Sys) -> ! {
    loop {
        sys.sleep(Duration::from_secs(3600));
    }
}

/// Logs the panic to the console and kmsg, then powers off or reboots by policy.
/// With `panic = "abort"` the process ends right after this hook; should the reboot
/// call fail, the abort kills PID 1 and `panic=-1` makes the kernel reboot.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let policy = policy();
        let line = serde_json::json!({
            "event": "panic",
            "message": message,
            "location": location,
            "on_failure": policy.as_str(),
            "at_ms": sys::boot_ms_now(),
        });
        sys::console_line(&format!("POWERNODE-INIT {line}"));
        log::error!("panic at {location}: {message}");
        let kind = match policy {
            FailurePolicy::Poweroff => RebootKind::PowerOff,
            FailurePolicy::Reboot | FailurePolicy::Retry => RebootKind::Restart,
        };
        reset(&mut RealSys::new(), kind);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::{Call, FakeSys};

    #[test]
    fn backoff_doubles_and_caps() {
        let secs: Vec<u64> = (1..=8).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(backoff(200).as_secs(), 60);
        assert_eq!(backoff(0).as_secs(), 1);
    }

    #[test]
    fn reset_syncs_before_reboot() {
        let mut sys = FakeSys::default();
        assert_eq!(
            reset(&mut sys, RebootKind::PowerOff),
            Outcome::Reset(RebootKind::PowerOff)
        );
        assert_eq!(sys.calls, [Call::Sync, Call::Reboot(RebootKind::PowerOff)]);
    }

    #[test]
    fn policy_round_trips() {
        for p in [
            FailurePolicy::Poweroff,
            FailurePolicy::Reboot,
            FailurePolicy::Retry,
        ] {
            set_policy(p);
            assert_eq!(policy(), p);
        }
    }
}
