//! `powernode-stub serve` as a child process on 127.0.0.1:0, for the tests of the
//! binary as an operator uses it, and its client subcommands.

use std::io::BufRead;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_powernode-stub");

/// The server process, killed (by its own pid) on drop with what is left of its
/// session.
///
/// The server leads a session of its own because in `real` mode the VMs (stand-in
/// QEMUs) are its children and a SIGKILLed server cannot take them along: the session
/// id is inherited by them, outlives the server, and is found in `/proc` without
/// asking the server. The number cannot be reused while the unreaped server or any
/// process of the session holds it, so the session is read before the server is reaped.
pub struct ServerProc {
    child: Child,
    pub addr: String,
    /// The session's processes when the server was reaped by [`ServerProc::signal`]
    /// (VMs a test means to outlive it), killed on drop if still in the session.
    left: Vec<u32>,
    reaped: bool,
}

impl ServerProc {
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, "recorder", &[])
    }

    pub fn start_with(dir: &Path, mode: &str, extra: &[&str]) -> Self {
        Self::start_env(dir, mode, extra, &[])
    }

    pub fn start_env(dir: &Path, mode: &str, extra: &[&str], env: &[(&str, String)]) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(dir)
            .args(extra)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("POWERNODE_LIBVIRT_MODE", mode)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and only calls
        // setsid(2), which is async-signal-safe and touches no memory of the parent.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(|| {
                rustix::process::setsid()
                    .map(drop)
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().expect("spawn powernode-stub serve");
        let stdout = child.stdout.take().unwrap();
        let mut server = Self {
            child,
            addr: String::new(),
            left: Vec::new(),
            reaped: false,
        };
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        let v: Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("first line: {line:?}"));
        server.addr = v["listening"].as_str().unwrap().to_string();
        server
    }

    /// Sends `sig` (`-TERM`, `-KILL`) to the server alone and reaps it; what it
    /// started is left running until the drop.
    pub fn signal(&mut self, sig: &str) -> std::process::ExitStatus {
        let pid = self.child.id();
        assert!(Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success());
        let deadline = Instant::now() + Duration::from_secs(30);
        while stat(pid).is_some_and(|f| f.state != "Z") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.left = self.members().into_iter().map(|(p, _)| p).collect();
        self.reaped = true;
        self.child.wait().unwrap()
    }

    /// The live processes of the server's session, with their process groups: all of
    /// them while the server is unreaped, else those seen when it was reaped.
    fn members(&self) -> Vec<(u32, i32)> {
        let sid = self.child.id();
        let live = |pid: u32| {
            stat(pid)
                .filter(|f| f.state != "Z" && f.session == sid)
                .map(|f| (pid, f.pgrp))
        };
        if self.reaped {
            return self.left.iter().copied().filter_map(live).collect();
        }
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter_map(live)
            .collect()
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        use rustix::process::{kill_process, kill_process_group, Pid, Signal};
        if !self.reaped {
            let _ = self.child.kill();
        }
        // Until nothing of the session lives (a process may fork meanwhile).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let members = self.members();
            if members.is_empty() || Instant::now() > deadline {
                break;
            }
            for (pid, pgrp) in members {
                let pid = i32::try_from(pid).ok().and_then(Pid::from_raw);
                let _ = Pid::from_raw(pgrp).map(|g| kill_process_group(g, Signal::KILL));
                let _ = pid.map(|p| kill_process(p, Signal::KILL));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !self.reaped {
            let _ = self.child.wait();
        }
    }
}

struct Stat {
    state: String,
    pgrp: i32,
    session: u32,
}

/// `/proc/PID/stat` read after the command name (which may hold spaces).
fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = text.rsplit_once(") ")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        state: f.first()?.to_string(),
        pgrp: f.get(2)?.parse().ok()?,
        session: f.get(3)?.parse().ok()?,
    })
}

/// Runs a client subcommand; returns (exit ok, stdout, stderr).
pub fn cli(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("--data")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
