//! The failure policy (`powernode.on_failure=poweroff|reboot|retry`), the retry
//! backoff, and the panic hook that applies the same policy if a bug panics anyway.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use powernode_agent::backoff::Backoff;

use crate::cmdline::FailurePolicy;
use crate::console;
use crate::sys::{Errno, RealSys, RebootKind, Sys};

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

/// Delay before retry number `attempt` (1-based): 1 s, 2 s, 4 s ... capped at 60 s,
/// the agent's [`Backoff`] without jitter (one machine retrying alone has no herd
/// to spread).
pub fn backoff(attempt: u32) -> Duration {
    Backoff::new(Duration::from_secs(1), Duration::from_secs(60)).nominal(attempt.saturating_sub(1))
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

/// How long the shutdown steps (sync, settling the mounts) may take before a
/// watchdog thread calls `reboot(2)` anyway. Under TCG they take well under a second.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(20);

/// The one place a boot ends (both PID-1 modes, the failure policies, the panic
/// hook). The caller has stopped the services; any process still there is ended
/// (SIGTERM, then SIGKILL). Flushes logs and file systems, leaves every
/// disk-backed mount read-only or unmounted ([`crate::shutdown`]),
/// then powers off or reboots, whatever the unmounting managed.
pub fn reset(sys: &mut dyn Sys, kind: RebootKind) -> Outcome {
    sys.arm_watchdog(SHUTDOWN_DEADLINE, kind);
    crate::logger::flush();
    let processes = crate::shutdown::end_processes(sys);
    sys.sync();
    let mut report = crate::shutdown::settle_mounts(sys);
    report.processes = processes;
    sys.console(&format!(
        "{}{}",
        crate::console::EVENT_PREFIX,
        report.event()
    ));
    crate::logger::flush();
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
            "at_ms": console::boot_ms_now(),
        });
        console::console_line(&format!("{}{line}", console::EVENT_PREFIX));
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
    use crate::sys::EndSignal;

    #[test]
    fn backoff_doubles_and_caps() {
        let secs: Vec<u64> = (1..=8).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(backoff(200).as_secs(), 60);
        assert_eq!(backoff(0).as_secs(), 1);
    }

    /// Agent mode in a composed root: `/` an overlay whose upper is on /persist,
    /// the root's EROFS images on loop devices under /persist (read-only), a
    /// writable scratch filesystem on a loop device inside /persist, tmpfs and the
    /// kernel's virtual filesystems.
    const COMPOSED_ROOT_MOUNTS: &str = "\
21 1 0:31 / / rw,relatime - overlay overlay rw,lowerdir=/a,upperdir=/persist/powernode/root/upper,workdir=/persist/powernode/root/work,verity=require
22 21 0:5 / /dev rw,nosuid shared:2 - devtmpfs devtmpfs rw,size=1000k,mode=755
23 21 0:22 / /proc rw,nosuid,nodev,noexec - proc proc rw
24 21 0:21 / /sys rw,nosuid,nodev,noexec - sysfs sysfs rw
25 21 0:24 / /run rw,nosuid,nodev shared:1 - tmpfs tmpfs rw,mode=755
26 21 254:0 / /persist rw,relatime - ext4 /dev/vda rw
27 26 7:0 / /persist/powernode/compose/images/ab12 ro,relatime - erofs /dev/loop0 ro
28 26 7:1 / /persist/scratch rw,relatime - ext4 /dev/loop1 rw
29 22 0:25 / /dev/pts rw,nosuid,noexec - devpts devpts rw,mode=620
";

    fn composed_root() -> FakeSys {
        FakeSys::default().with_file(crate::layout::MOUNTINFO, COMPOSED_ROOT_MOUNTS)
    }

    fn shutdown_event(sys: &FakeSys) -> serde_json::Value {
        sys.console_lines()
            .iter()
            .find_map(|l| l.strip_prefix(crate::console::EVENT_PREFIX))
            .map(|j| serde_json::from_str(j).unwrap())
            .unwrap()
    }

    #[test]
    fn reset_syncs_then_settles_the_disks_deepest_first_then_reboots() {
        let mut sys = composed_root();
        // /persist is busy (the loop devices under the root hold files on it).
        sys.umount_errors.insert("/persist".into(), Errno::BUSY);
        assert_eq!(
            reset(&mut sys, RebootKind::PowerOff),
            Outcome::Reset(RebootKind::PowerOff)
        );
        let calls: Vec<Call> = sys
            .calls
            .iter()
            .filter(|c| !matches!(c, Call::Console(_)))
            .cloned()
            .collect();
        assert_eq!(
            calls,
            [
                Call::Watchdog(SHUTDOWN_DEADLINE, RebootKind::PowerOff),
                Call::SignalAll(EndSignal::Term),
                Call::Sync,
                Call::Read(crate::layout::MOUNTINFO.into()),
                // The overlay root first: its upper lives on /persist.
                Call::RemountReadOnly("/".into()),
                Call::RemountReadOnly("/persist/scratch".into()),
                Call::Umount("/persist/scratch".into()),
                Call::RemountReadOnly("/persist".into()),
                Call::Umount("/persist".into()),
                Call::Reboot(RebootKind::PowerOff),
            ]
        );
        let event = shutdown_event(&sys);
        assert_eq!(event["unmounted"], serde_json::json!(["/persist/scratch"]));
        assert_eq!(event["read_only"], serde_json::json!(["/", "/persist"]));
        assert_eq!(event["failed"], serde_json::json!([]));
        assert_eq!(event["rounds"], 1);
        // The event is the last thing said before the reboot.
        assert!(matches!(
            &sys.calls[sys.calls.len() - 2..],
            [Call::Console(_), Call::Reboot(RebootKind::PowerOff)]
        ));
    }

    #[test]
    fn a_failing_remount_is_reported_once_and_the_power_still_goes_off() {
        let mut sys = composed_root();
        sys.remount_errors.insert("/persist".into(), Errno::IO);
        sys.umount_errors.insert("/persist".into(), Errno::BUSY);
        sys.remount_errors.insert("/".into(), Errno::BUSY);
        assert_eq!(
            reset(&mut sys, RebootKind::Restart),
            Outcome::Reset(RebootKind::Restart)
        );
        assert!(sys.ends_with_reset(RebootKind::Restart), "{:?}", sys.calls);
        let event = shutdown_event(&sys);
        assert_eq!(event["unmounted"], serde_json::json!(["/persist/scratch"]));
        let failed = event["failed"].as_array().unwrap();
        let named: Vec<(&str, &str)> = failed
            .iter()
            .map(|f| {
                (
                    f["mount_point"].as_str().unwrap(),
                    f["errno"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            named,
            [
                ("/", Errno::BUSY.to_string().as_str()),
                ("/persist", Errno::IO.to_string().as_str())
            ]
        );
        // Round 1 made progress (scratch went), round 2 did not: no third try.
        assert_eq!(event["rounds"], 2);
        let persist_tries = sys
            .calls
            .iter()
            .filter(|c| **c == Call::RemountReadOnly("/persist".into()))
            .count();
        assert_eq!(persist_tries, 2);
    }

    #[test]
    fn without_a_mount_table_reset_still_syncs_and_reboots() {
        let mut sys = FakeSys::default();
        assert_eq!(
            reset(&mut sys, RebootKind::PowerOff),
            Outcome::Reset(RebootKind::PowerOff)
        );
        assert!(sys.ends_with_reset(RebootKind::PowerOff), "{:?}", sys.calls);
        assert_eq!(
            shutdown_event(&sys)["mountinfo_error"],
            Errno::NOENT.to_string()
        );
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
