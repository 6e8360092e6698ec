//! `powernode-stub serve` as a child process on 127.0.0.1:0, for the tests of the
//! binary as an operator uses it, and its client subcommands.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_powernode-stub");

/// The server process, killed (by its own pid) on drop.
pub struct ServerProc {
    pub child: Child,
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
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(dir)
            .args(extra)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("POWERNODE_LIBVIRT_MODE", mode)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn powernode-stub serve");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        let v: Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("first line: {line:?}"));
        let addr = v["listening"].as_str().unwrap().to_string();
        Self { child, addr }
    }

    pub fn signal(&mut self, sig: &str) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
        self.child.wait().unwrap()
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
