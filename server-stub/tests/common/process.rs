//! `powernode-stub serve` as a child process on 127.0.0.1:0, for the tests of the
//! binary as an operator uses it, and its client subcommands.

use std::path::Path;
use std::process::{Command, Stdio};

use powernode_tests::{spawn_serve, ProcessGuard};

pub const BIN: &str = env!("CARGO_BIN_EXE_powernode-stub");

/// The server process on the workspace's one process guard: killed by its own pid
/// on drop, with what is left of its session (in `real` mode the VMs, stand-in
/// QEMUs, are its children; see `ProcessGuard::spawn_session`).
pub struct ServerProc {
    guard: ProcessGuard,
    pub addr: String,
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
            .stderr(Stdio::null());
        let (guard, addr) = spawn_serve(cmd, dir).expect("powernode-stub serve");
        Self { guard, addr }
    }

    /// Sends `sig` (`-TERM`, `-KILL`) to the server alone and reaps it; what it
    /// started is left running until the drop.
    pub fn signal(&mut self, sig: &str) -> std::process::ExitStatus {
        self.guard.signal_alone(sig).expect("signalling the server")
    }
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
