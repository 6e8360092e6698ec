//! Leaving the disks clean before `reboot(2)`: what systemd-shutdown's umount loop
//! does, for the few mounts a Powernode node has. Without it the `/persist` ext4
//! keeps `needs_recovery` set at every power-off, each boot replays its journal,
//! and a power cut mid-write looks like any other shutdown.
//!
//! The mounts come from `/proc/self/mountinfo`. Only writable mounts that can hold
//! data past the power-off are touched: those backed by a block or loop device
//! (`/persist`), and overlays (a composed root whose upper layer lives on
//! `/persist`). tmpfs, proc, sysfs, devtmpfs and the like are left alone: there is
//! nothing on them to lose. Overlays go first (remounting one read-only makes the
//! kernel sync its upper), then the rest, deepest mount point first.
//!
//! Each mount is remounted read-only first (`MS_REMOUNT|MS_RDONLY`, which makes ext4
//! write its journal out and mark itself clean), then unmounted. Not unmount
//! first: an unmount can succeed while the superblock lives on through another
//! mount of it (an overlay keeps a private clone of its upper's mount), and then
//! nothing could reach it to make it read-only. An unmount that fails after the
//! read-only remount (busy: loop devices backing the composed root, or `/` itself)
//! leaves a clean, read-only filesystem, which is all that matters here.
//!
//! It must never panic and never loop without bound: a few rounds while progress is
//! made, each mount still writable at the end logged once with its errno, and the
//! power-off happens whatever the outcome.

use std::time::Duration;

use powernode_sysfmt::mountinfo::{self, MountEntry};

use crate::layout::{MOUNTINFO, MOUNTINFO_LIMIT};
use crate::sys::{EndSignal, Errno, Sys};

/// Rounds of the loop: a later round only helps when an earlier one made progress
/// (a mount that held another busy went away).
pub const MAX_ROUNDS: u32 = 4;

/// Filesystems with nothing to lose at power-off, never touched.
pub const VIRTUAL_FSTYPES: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "efivarfs",
    "fusectl",
    "hugetlbfs",
    "mqueue",
    "proc",
    "pstore",
    "ramfs",
    "rootfs",
    "securityfs",
    "sysfs",
    "tmpfs",
    "tracefs",
];

/// On a block device (a disk, a partition, a loop device): a real device number,
/// or a `/dev/` source, and not one of [`VIRTUAL_FSTYPES`].
pub fn block_backed(entry: &MountEntry) -> bool {
    !VIRTUAL_FSTYPES.contains(&entry.fstype.as_str())
        && (entry.major != 0 || entry.source.starts_with("/dev/"))
}

/// Whether shutdown must make this mount read-only (or unmount it).
pub fn needs_settling(entry: &MountEntry) -> bool {
    !entry.read_only() && (block_backed(entry) || entry.is_overlay())
}

fn depth(entry: &MountEntry) -> usize {
    entry
        .mount_point
        .split('/')
        .filter(|c| !c.is_empty())
        .count()
}

/// The mounts to settle, in order: overlays first (their upper may sit on one of
/// the others), then the rest; within each, deepest mount point first, and of two
/// at the same depth the later mounted (on top) first.
pub fn plan(entries: &[MountEntry]) -> Vec<MountEntry> {
    let mut chosen: Vec<(usize, &MountEntry)> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| needs_settling(e))
        .collect();
    chosen.sort_by(|(ia, a), (ib, b)| {
        b.is_overlay()
            .cmp(&a.is_overlay())
            .then(depth(b).cmp(&depth(a)))
            .then(ib.cmp(ia))
    });
    chosen.into_iter().map(|(_, e)| e.clone()).collect()
}

/// How one mount was left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Unmounted,
    /// Read-only and still mounted (busy, or `/`).
    ReadOnly,
}

/// The last call that failed on a mount still writable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StillWritable {
    pub mount_point: String,
    pub fstype: String,
    pub source: String,
    pub errno: Errno,
}

/// What [`settle_mounts`] did, for the log and the console event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub unmounted: Vec<String>,
    pub read_only: Vec<String>,
    pub failed: Vec<StillWritable>,
    /// The mount table could not be read (nothing was tried).
    pub mountinfo_error: Option<String>,
    pub rounds: u32,
    pub ms: u64,
    /// What [`end_processes`] did first.
    pub processes: Processes,
}

/// What [`end_processes`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Processes {
    /// Reaped after SIGTERM.
    pub terminated: u32,
    /// Reaped after SIGKILL.
    pub killed: u32,
    /// Some were still there when the grace after SIGKILL ran out (uninterruptible
    /// sleep), or they could not be signalled.
    pub left: bool,
    pub ms: u64,
}

impl Report {
    /// The console event (`shutdown_mounts`).
    pub fn event(&self) -> serde_json::Value {
        serde_json::json!({
            "event": "shutdown_mounts",
            "unmounted": self.unmounted,
            "read_only": self.read_only,
            "failed": self.failed.iter().map(|f| serde_json::json!({
                "mount_point": f.mount_point,
                "fstype": f.fstype,
                "source": f.source,
                "errno": f.errno.to_string(),
            })).collect::<Vec<_>>(),
            "mountinfo_error": self.mountinfo_error,
            "rounds": self.rounds,
            "ms": self.ms,
            "processes": {
                "terminated": self.processes.terminated,
                "killed": self.processes.killed,
                "left": self.processes.left,
                "ms": self.processes.ms,
            },
        })
    }
}

/// How long leftover processes get to exit after SIGTERM, then to be reaped after
/// SIGKILL. The agent has already stopped its services with their own timeouts:
/// what is left here escaped them.
pub const TERM_GRACE: Duration = Duration::from_secs(3);
pub const KILL_GRACE: Duration = Duration::from_secs(1);
const REAP_POLL: Duration = Duration::from_millis(20);

/// Ends every process but PID 1 before the disks go read-only: one the agent left
/// (a service that left its process group, a shell) could hold a file open for
/// writing on `/persist`, and its remount would then fail busy. SIGTERM, a grace,
/// then SIGKILL, reaping meanwhile (as PID 1 every orphan is ours). With nothing
/// left it costs one `kill(2)`.
pub fn end_processes(sys: &mut dyn Sys) -> Processes {
    let started = sys.boot_ms();
    let mut done = Processes::default();
    match sys.signal_all(EndSignal::Term) {
        Ok(()) => {
            if !reap_for(sys, TERM_GRACE, &mut done.terminated) {
                let _ = sys.signal_all(EndSignal::Kill);
                done.left = !reap_for(sys, KILL_GRACE, &mut done.killed);
            }
        }
        Err(Errno::SRCH) => {}
        Err(errno) => {
            log::error!("shutdown: cannot signal the remaining processes: {errno}");
            done.left = true;
        }
    }
    done.ms = sys.boot_ms().saturating_sub(started);
    if done.terminated + done.killed > 0 || done.left {
        log::warn!(
            "shutdown: ended leftover processes: {} on SIGTERM, {} on SIGKILL{} in {} ms",
            done.terminated,
            done.killed,
            if done.left { ", some still there" } else { "" },
            done.ms
        );
    }
    done
}

/// Reaps until no child is left (`true`) or `grace` has passed (`false`).
fn reap_for(sys: &mut dyn Sys, grace: Duration, reaped: &mut u32) -> bool {
    let deadline = sys
        .boot_ms()
        .saturating_add(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX));
    loop {
        match sys.reap_any() {
            Ok(Some(_)) => *reaped += 1,
            Ok(None) if sys.boot_ms() < deadline => sys.sleep(REAP_POLL),
            Ok(None) => return false,
            // ECHILD: nothing left to wait for.
            Err(_) => return true,
        }
    }
}

/// Remounts `entry` read-only, then unmounts it (never `/`). `Err` is the errno of
/// the remount when neither worked.
fn settle_one(sys: &mut dyn Sys, entry: &MountEntry) -> Result<Settled, Errno> {
    let at = entry.mount_point.as_str();
    let remount = sys.remount_read_only(at);
    if at == "/" {
        return remount.map(|()| Settled::ReadOnly);
    }
    match (remount, sys.umount(at)) {
        (_, Ok(())) => Ok(Settled::Unmounted),
        (Ok(()), Err(errno)) => {
            log::info!("{at} stays mounted read-only (unmount: {errno})");
            Ok(Settled::ReadOnly)
        }
        (Err(errno), Err(_)) => Err(errno),
    }
}

/// Makes every writable disk-backed mount read-only or unmounts it (see the
/// module doc). Call after `sync` and before `reboot(2)`; it never fails, it
/// reports.
pub fn settle_mounts(sys: &mut dyn Sys) -> Report {
    let started = sys.boot_ms();
    let mut report = Report::default();
    let text = match sys.read_file(MOUNTINFO, MOUNTINFO_LIMIT) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(errno) => {
            log::error!("shutdown: cannot read {MOUNTINFO}: {errno}; no mount made read-only");
            report.mountinfo_error = Some(errno.to_string());
            return report;
        }
    };
    // A line we cannot read must not keep the others from being settled.
    let entries: Vec<MountEntry> = mountinfo::entries(&text)
        .filter_map(|entry| match entry {
            Ok(e) => Some(e),
            Err(e) => {
                log::error!("shutdown: skipping a mount: {e}");
                None
            }
        })
        .collect();
    let mut pending: Vec<(MountEntry, Option<Errno>)> =
        plan(&entries).into_iter().map(|e| (e, None)).collect();
    while !pending.is_empty() && report.rounds < MAX_ROUNDS {
        report.rounds += 1;
        let before = pending.len();
        let mut left = Vec::with_capacity(before);
        for (entry, _) in pending {
            match settle_one(sys, &entry) {
                Ok(Settled::Unmounted) => report.unmounted.push(entry.mount_point),
                Ok(Settled::ReadOnly) => report.read_only.push(entry.mount_point),
                Err(errno) => left.push((entry, Some(errno))),
            }
        }
        pending = left;
        if pending.len() == before {
            break; // no progress: another round would fail the same way
        }
    }
    for (entry, errno) in pending {
        let errno = errno.unwrap_or(Errno::AGAIN);
        log::error!(
            "shutdown: {} ({} on {}) stays writable: remount read-only failed: {errno}",
            entry.mount_point,
            entry.fstype,
            entry.source
        );
        report.failed.push(StillWritable {
            mount_point: entry.mount_point,
            fstype: entry.fstype,
            source: entry.source,
            errno,
        });
    }
    report.ms = sys.boot_ms().saturating_sub(started);
    log::info!(
        "shutdown: {} unmounted, {} read-only, {} still writable in {} ms ({} round(s))",
        report.unmounted.len(),
        report.read_only.len(),
        report.failed.len(),
        report.ms,
        report.rounds
    );
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::{Call, FakeSys};

    fn signals(sys: &FakeSys) -> Vec<EndSignal> {
        sys.calls
            .iter()
            .filter_map(|c| match c {
                Call::SignalAll(s) => Some(*s),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn with_nothing_left_ending_processes_is_one_signal() {
        let mut sys = FakeSys::default();
        assert_eq!(end_processes(&mut sys), Processes::default());
        assert_eq!(sys.calls, [Call::SignalAll(EndSignal::Term)]);
    }

    #[test]
    fn leftovers_that_obey_sigterm_are_reaped_without_sigkill() {
        let mut sys = FakeSys {
            strays_on_term: 2,
            ..FakeSys::default()
        };
        let done = end_processes(&mut sys);
        assert_eq!((done.terminated, done.killed, done.left), (2, 0, false));
        assert_eq!(signals(&sys), [EndSignal::Term]);
        assert!(!sys.calls.iter().any(|c| matches!(c, Call::Sleep(_))));
    }

    #[test]
    fn a_leftover_that_ignores_sigterm_gets_sigkill_after_the_grace() {
        let mut sys = FakeSys {
            strays_on_term: 1,
            strays_on_kill: 1,
            ..FakeSys::default()
        };
        let done = end_processes(&mut sys);
        assert_eq!((done.terminated, done.killed, done.left), (1, 1, false));
        assert_eq!(signals(&sys), [EndSignal::Term, EndSignal::Kill]);
        let grace = u64::try_from(TERM_GRACE.as_millis()).unwrap();
        assert!((grace..grace + 100).contains(&done.ms), "{done:?}");
    }

    #[test]
    fn processes_that_cannot_be_signalled_are_reported_not_waited_for() {
        // What a process that is not PID 1 gets: nothing is sent.
        let mut sys = FakeSys {
            strays_on_term: 1,
            signal_error: Some(Errno::PERM),
            ..FakeSys::default()
        };
        let done = end_processes(&mut sys);
        assert!(done.left, "{done:?}");
        assert_eq!(signals(&sys), [EndSignal::Term]);
        assert!(!sys.calls.iter().any(|c| matches!(c, Call::Sleep(_))));
    }

    #[test]
    fn a_writable_disk_mount_needs_settling() {
        let e = mountinfo::parse_line(
            1,
            "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue",
        )
        .unwrap();
        assert!(needs_settling(&e));
    }

    fn table(lines: &[&str]) -> Vec<MountEntry> {
        mountinfo::parse(&lines.join("\n")).unwrap()
    }

    #[test]
    fn only_writable_disks_and_overlays_are_settled_overlays_then_deepest_first() {
        let entries = table(&[
            "1 0 0:2 / / rw - rootfs rootfs rw",
            "2 1 0:5 / /dev rw - devtmpfs devtmpfs rw",
            "3 1 0:20 / /proc rw - proc proc rw",
            "4 1 0:21 / /sys rw - sysfs sysfs rw",
            "5 1 0:22 / /run rw - tmpfs tmpfs rw",
            "6 1 254:0 / /persist rw - ext4 /dev/vda rw",
            "7 6 7:0 / /persist/p/images/a ro - erofs /dev/loop0 ro",
            // Read-only by its superblock alone still counts as read-only.
            "8 1 254:16 / /config rw - vfat /dev/vdb ro",
            "9 6 7:1 / /persist/deep/er rw - ext4 /dev/loop1 rw",
            "10 1 0:40 / /sysroot rw - overlay overlay rw,upperdir=/persist/u",
            "11 6 254:32 / /persist/side rw - xfs /dev/vdc rw",
            // Mounted on top of 11: goes before it.
            "12 6 254:48 / /persist/side rw - ext4 /dev/vdd rw",
            "13 5 0:41 / /run/tmp rw - ramfs none rw",
        ]);
        let planned = plan(&entries);
        let order: Vec<(&str, &str)> = planned
            .iter()
            .map(|e| (e.mount_point.as_str(), e.source.as_str()))
            .collect();
        assert_eq!(
            order,
            [
                ("/sysroot", "overlay"),
                ("/persist/deep/er", "/dev/loop1"),
                ("/persist/side", "/dev/vdd"),
                ("/persist/side", "/dev/vdc"),
                ("/persist", "/dev/vda"),
            ]
        );
    }

    fn machine(lines: &[&str]) -> FakeSys {
        FakeSys::default().with_file(MOUNTINFO, lines.join("\n"))
    }

    const PERSIST: &str = "6 1 254:0 / /persist rw - ext4 /dev/vda rw";

    #[test]
    fn a_busy_mount_stays_mounted_read_only() {
        let mut sys = machine(&[PERSIST]);
        sys.umount_errors.insert("/persist".into(), Errno::BUSY);
        let report = settle_mounts(&mut sys);
        assert_eq!(report.read_only, ["/persist"]);
        assert!(report.unmounted.is_empty() && report.failed.is_empty());
        assert_eq!(
            sys.calls[1..],
            [
                Call::RemountReadOnly("/persist".into()),
                Call::Umount("/persist".into())
            ]
        );
    }

    #[test]
    fn an_unmount_that_works_counts_even_when_the_remount_did_not() {
        let mut sys = machine(&[PERSIST]);
        sys.remount_errors.insert("/persist".into(), Errno::BUSY);
        let report = settle_mounts(&mut sys);
        assert_eq!(report.unmounted, ["/persist"]);
        assert!(report.failed.is_empty());
    }

    #[test]
    fn a_mount_busy_until_another_went_is_retried_in_the_next_round() {
        let mut sys = machine(&[PERSIST, "9 6 7:1 / /persist/x rw - ext4 /dev/loop1 rw"]);
        // The outer mount comes later in the round than the inner one, so only a
        // second round can show this: make /persist fail once in round 1.
        sys.remount_busy_left.insert("/persist".into(), 1);
        sys.umount_errors.insert("/persist".into(), Errno::BUSY);
        let report = settle_mounts(&mut sys);
        assert_eq!(report.rounds, 2);
        assert_eq!(report.unmounted, ["/persist/x"]);
        assert_eq!(report.read_only, ["/persist"]);
        assert!(report.failed.is_empty());
    }

    #[test]
    fn the_loop_is_bounded_and_names_each_failure_once() {
        let lines: Vec<String> = (0..6)
            .map(|i| format!("{} 1 7:{i} / /m{i} rw - ext4 /dev/loop{i} rw", 10 + i))
            .collect();
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let mut sys = machine(&refs);
        // /mN stays busy for N rounds: every round makes progress, so only the
        // round limit stops the loop.
        for i in 0..6u32 {
            let at = format!("/m{i}");
            sys.remount_busy_left.insert(at.clone(), i);
            sys.umount_errors.insert(at, Errno::BUSY);
        }
        let report = settle_mounts(&mut sys);
        assert_eq!(report.rounds, MAX_ROUNDS);
        assert_eq!(report.read_only, ["/m0", "/m1", "/m2", "/m3"]);
        let failed: Vec<(&str, Errno)> = report
            .failed
            .iter()
            .map(|f| (f.mount_point.as_str(), f.errno))
            .collect();
        // Same depth: the later mounted first.
        assert_eq!(failed, [("/m5", Errno::BUSY), ("/m4", Errno::BUSY)]);
        let tries = |at: &str| {
            sys.calls
                .iter()
                .filter(|c| **c == Call::RemountReadOnly(at.into()))
                .count()
        };
        assert_eq!((tries("/m0"), tries("/m3"), tries("/m5")), (1, 4, 4));
    }

    #[test]
    fn without_progress_there_is_no_second_round() {
        let mut sys = machine(&[PERSIST, "9 1 7:1 / /x rw - ext4 /dev/loop1 rw"]);
        sys.remount_errors.insert("/persist".into(), Errno::IO);
        sys.umount_errors.insert("/persist".into(), Errno::BUSY);
        sys.remount_errors.insert("/x".into(), Errno::ROFS);
        sys.umount_errors.insert("/x".into(), Errno::BUSY);
        let report = settle_mounts(&mut sys);
        assert_eq!(report.rounds, 1);
        assert_eq!(report.failed.len(), 2);
        assert_eq!(sys.calls.len(), 5); // the read, then one remount + unmount each
    }

    #[test]
    fn a_bad_line_does_not_keep_the_others_from_being_settled() {
        let mut sys = machine(&["garbage", PERSIST]);
        let report = settle_mounts(&mut sys);
        assert_eq!(report.unmounted, ["/persist"]);
    }

    #[test]
    fn the_root_is_only_remounted_never_unmounted() {
        let mut sys = machine(&["1 0 254:0 / / rw - ext4 /dev/vda rw"]);
        let report = settle_mounts(&mut sys);
        assert_eq!(report.read_only, ["/"]);
        assert!(!sys.calls.iter().any(|c| matches!(c, Call::Umount(_))));
    }
}
