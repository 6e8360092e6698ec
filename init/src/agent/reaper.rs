//! PID 1 inherits every orphan. The reaper waits for exited children that no
//! service monitor waits for, so no zombie piles up and no supervised service's
//! exit status is stolen from its monitor.

/// PID 1 inherits every orphan: reap them on SIGCHLD so no zombie piles up.
pub async fn reap_children() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigchld = match signal(SignalKind::child()) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("cannot listen for SIGCHLD; orphans will not be reaped: {e}");
            return;
        }
    };
    loop {
        reap_all();
        if sigchld.recv().await.is_none() {
            return;
        }
    }
}

/// Reaps every exited child of this process that no service monitor waits for,
/// without blocking. Never `waitpid(-1)`: that would steal a supervised service's
/// exit status from its monitor (which then could not apply its restart policy).
/// The supervised set stays locked while reaping, so no service can start (and be
/// mistaken for an orphan) in between.
pub fn reap_all() -> usize {
    let me = rustix::process::getpid().as_raw_nonzero().get();
    let zombies = zombie_children(std::path::Path::new("/proc"), me);
    if zombies.is_empty() {
        return 0;
    }
    powernode_agent::supervisor::with_supervised(|supervised| {
        let mut reaped = 0;
        for pid in zombies {
            if supervised.contains(&pid) {
                continue;
            }
            let Some(p) = i32::try_from(pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            else {
                continue;
            };
            if let Ok(Some(status)) =
                rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG)
            {
                log::debug!("reaped orphan {pid} ({status:?})");
                reaped += 1;
            }
        }
        reaped
    })
}

/// Children of `parent` that have exited and wait to be reaped (state `Z` in
/// `/proc/PID/stat`).
pub fn zombie_children(proc_root: &std::path::Path, parent: i32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat"))
                .ok()
                .and_then(|stat| parse_stat(&stat))
                .is_some_and(|(state, ppid)| state == 'Z' && ppid == parent)
        })
        .collect()
}

/// `(state, ppid)` from a `/proc/PID/stat` line; the command name may hold spaces
/// and parentheses, so fields are counted after its last `)`.
fn parse_stat(stat: &str) -> Option<(char, i32)> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        assert_eq!(parse_stat("12 (a) b) Z 1 12 12 0"), Some(('Z', 1)));
        assert_eq!(parse_stat("7 (sleep) S 42 7"), Some(('S', 42)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) Z notanumber"), None);
    }

    #[test]
    fn zombie_children_of_a_parent_from_a_proc_tree() {
        let dir = std::env::temp_dir().join(format!("reaper-proc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (pid, stat) in [
            ("10", "10 (x) Z 5 10"),
            ("11", "11 (y) S 5 11"),
            ("12", "12 (z z) Z 6 12"),
            ("self", "1 (me) R 0 1"),
        ] {
            std::fs::create_dir_all(dir.join(pid)).unwrap();
            std::fs::write(dir.join(pid).join("stat"), stat).unwrap();
        }
        assert_eq!(zombie_children(&dir, 5), vec![10]);
        assert_eq!(zombie_children(&dir, 6), vec![12]);
        assert!(zombie_children(&dir.join("missing"), 5).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The fix for PID 1's waitpid(-1): an orphan is reaped, a supervised service's
    /// exit is left to its monitor, which still sees its status and applies its
    /// restart policy.
    #[test]
    fn reaping_leaves_supervised_children_to_their_monitor() {
        use powernode_agent::supervisor::{
            RestartPolicy, ServiceSpec, ServiceSupervisor, Supervisor,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let orphan = std::process::Command::new("true").spawn().unwrap();
            let orphan_pid = orphan.id();
            std::mem::forget(orphan);
            let sup = ServiceSupervisor::default();
            let mut spec = ServiceSpec::new(
                "crasher",
                "m",
                vec!["sh".into(), "-c".into(), "sleep 0.3; exit 3".into()],
            );
            spec.restart = RestartPolicy::Never;
            sup.add(vec![spec]);
            // Reap as eagerly as a SIGCHLD storm would, while the service runs and exits.
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                reap_all();
                let s = sup.services();
                if s[0].state == "failed"
                    && !std::path::Path::new(&format!("/proc/{orphan_pid}")).exists()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let s = sup.services();
            assert_eq!(s[0].state, "failed", "{s:?}");
            assert_eq!(s[0].last_exit.as_deref(), Some("exit 3"), "{s:?}");
            assert!(
                !std::path::Path::new(&format!("/proc/{orphan_pid}")).exists(),
                "the orphan {orphan_pid} was not reaped"
            );
        });
    }
}
