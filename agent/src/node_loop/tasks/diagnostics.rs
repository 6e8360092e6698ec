//! The `collect_diagnostics` task: what an operator needs to see without SSH,
//! bounded in size.

use std::sync::Arc;

use powernode_proto::TaskStatus;

use super::super::shared::{lock, Shared};
use super::{cancelled_result, params, renew_lease, Lease, TaskOutcome};

#[derive(Debug, serde::Deserialize)]
struct DiagnosticsParams {
    #[serde(default = "default_log_lines")]
    log_lines: usize,
}

fn default_log_lines() -> usize {
    50
}

/// Upper bounds of a diagnostics result.
const MAX_LOG_LINES: usize = 200;
const MAX_DIAGNOSTICS_BYTES: usize = 64 * 1024;
const MAX_SERVICE_OUTPUT_LINES: usize = 50;
const MAX_MOUNTS: usize = 100;

pub(crate) async fn collect_diagnostics(shared: &Arc<Shared>, task: &Lease) -> TaskOutcome {
    let p: DiagnosticsParams = match params(task) {
        Ok(p) => p,
        Err(bad) => return Ok((TaskStatus::Failed, bad)),
    };
    if renew_lease(shared, task, "collecting diagnostics").await? {
        return Ok(cancelled_result("before collecting"));
    }
    let lines = p.log_lines.min(MAX_LOG_LINES);
    if !shared.opts.systemd {
        return Ok((TaskStatus::Succeeded, diagnostics(shared, lines, None)));
    }
    // systemctl and journalctl block: off the async thread.
    let this = shared.clone();
    let v = tokio::task::spawn_blocking(move || {
        let systemd = crate::systemd::system_state();
        diagnostics(&this, lines, systemd)
    })
    .await
    .unwrap_or_else(|e| serde_json::json!({"error": "internal", "message": e.to_string()}));
    Ok((TaskStatus::Succeeded, v))
}

/// What an operator needs to see without SSH, bounded to [`MAX_DIAGNOSTICS_BYTES`]:
/// versions, what `/` is, modules, mounts, services, certificate, last log lines.
/// Under systemd, `systemd` is its state (failed units included) and the services'
/// output is their journal lines.
fn diagnostics(
    shared: &Shared,
    log_lines: usize,
    systemd: Option<powernode_proto::node::SystemdState>,
) -> serde_json::Value {
    let status = shared.status();
    let cert = lock(&shared.cert).clone();
    let uname = rustix::system::uname();
    let mounts = read_mounts(&shared.opts.mountinfo, MAX_MOUNTS);
    let (log_source, mut log) = if shared.opts.kmsg_log {
        (
            "kmsg",
            kmsg_tail(std::path::Path::new("/dev/kmsg"), log_lines),
        )
    } else {
        ("agent", crate::logring::tail(log_lines))
    };
    // Each service's last lines (what a crash printed), fewer than the node's log.
    let mut service_output = shared
        .supervisor
        .output(log_lines.min(MAX_SERVICE_OUTPUT_LINES));
    let mut truncated = false;
    loop {
        let v = serde_json::json!({
            "agent_version": crate::AGENT_VERSION,
            "kernel": uname.release().to_string_lossy(),
            "uptime_ms": crate::timeline::boot_ms(),
            "phase": status.phase,
            "cordoned": status.cordoned,
            "root": shared.root,
            "modules": shared.reconciler.running(),
            "last_reconcile": lock(&shared.last_reconcile).clone(),
            "mounts": mounts,
            "services": shared.supervisor.services(),
            "service_output": service_output,
            "systemd": systemd,
            "certificate": {"serial": cert.serial, "not_before": cert.not_before, "not_after": cert.not_after},
            "log_source": log_source,
            "log": log,
            "truncated": truncated,
        });
        let size = serde_json::to_vec(&v).map(|b| b.len()).unwrap_or(0);
        let output_left = service_output.values().any(|l| !l.is_empty());
        if size <= MAX_DIAGNOSTICS_BYTES || (log.is_empty() && !output_left) {
            return v;
        }
        // Drop the oldest half of the log until it fits, then of each service's
        // output.
        if log.is_empty() {
            for lines in service_output.values_mut() {
                let keep = lines.len() / 2;
                lines.drain(..lines.len() - keep);
            }
        } else {
            let keep = log.len() / 2;
            log.drain(..log.len() - keep);
        }
        truncated = true;
    }
}

/// Mount points from mountinfo: `{target, fstype, source}`, at most `max`,
/// unescaped; a malformed line is skipped (this is a report).
fn read_mounts(mountinfo: &std::path::Path, max: usize) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(mountinfo).unwrap_or_default();
    powernode_sysfmt::mountinfo::entries(&text)
        .filter_map(Result::ok)
        .map(|m| serde_json::json!({"target": m.mount_point, "fstype": m.fstype, "source": m.source}))
        .take(max)
        .collect()
}

/// The last `n` messages of the kernel log (where the init logs), read without
/// blocking; each record is `prio,seq,usec,flags;message`.
fn kmsg_tail(path: &std::path::Path, n: usize) -> Vec<String> {
    use rustix::fs::{Mode, OFlags};
    let mut out = std::collections::VecDeque::with_capacity(n + 1);
    if n == 0 {
        return Vec::new();
    }
    let Ok(fd) = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return Vec::new();
    };
    let mut buf = vec![0u8; 8192];
    // Bounded: the ring holds a finite number of records.
    for _ in 0..100_000 {
        match rustix::io::read(&fd, &mut buf) {
            Ok(0) => break,
            Ok(len) => {
                let rec = String::from_utf8_lossy(&buf[..len]);
                let msg = rec
                    .split_once(';')
                    .map(|(_, m)| m)
                    .unwrap_or(&rec)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                out.push_back(msg);
                if out.len() > n {
                    out.pop_front();
                }
            }
            // Records overwritten while reading: go on from the next one.
            Err(rustix::io::Errno::PIPE) => continue,
            Err(_) => break,
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::super::leased;
    use super::*;

    #[test]
    fn diagnostics_params_take_the_log_lines_and_refuse_junk() {
        let p: DiagnosticsParams = params(&leased(serde_json::json!({"log_lines": 5}))).unwrap();
        assert_eq!(p.log_lines, 5);
        let bad =
            params::<DiagnosticsParams>(&leased(serde_json::json!({"log_lines": -1}))).unwrap_err();
        assert_eq!(bad["error"], "bad_params");
    }

    #[test]
    fn mounts_come_from_mountinfo_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mountinfo");
        std::fs::write(
            &path,
            "22 1 0:21 / / rw,relatime - overlay overlay rw,lowerdir=/a\n\
             23 22 0:5 / /dev rw - devtmpfs devtmpfs rw\n\
             garbage line\n\
             24 22 7:0 / /run/powernode/modules/demo ro - overlay composefs:ab ro\n\
             25 22 0:6 / /mnt/a\\040b rw - tmpfs tmpfs rw\n",
        )
        .unwrap();
        let m = read_mounts(&path, 10);
        assert_eq!(m.len(), 4, "{m:?}");
        assert_eq!(m[3]["target"], "/mnt/a b", "unescaped");
        assert_eq!(m[0]["target"], "/");
        assert_eq!(m[2]["target"], "/run/powernode/modules/demo");
        assert_eq!(m[2]["source"], "composefs:ab");
        assert_eq!(read_mounts(&path, 1).len(), 1);
        assert!(read_mounts(&dir.path().join("missing"), 10).is_empty());
        // A missing kernel log is no log, not an error.
        assert!(kmsg_tail(&dir.path().join("missing"), 10).is_empty());
    }
}
