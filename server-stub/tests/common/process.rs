//! `powernode-stub serve` as a child process on 127.0.0.1:0, for the tests of the
//! binary as an operator uses it, and its client subcommands.

use std::path::Path;
use std::process::{Command, Stdio};

use powernode_tests::{spawn_serve, ProcessGuard};
use serde_json::Value;

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

/// Runs a client subcommand with `--json`; its answer, or a panic naming the failure.
pub fn cli_json(dir: &Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (ok, out, err) = cli(dir, &all);
    assert!(ok, "{args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|_| panic!("{args:?} printed {out:?}"))
}

/// A folder shaped like `powernode-initramfs build` output, with a kernel QEMU
/// cannot load (so a VM "boots" and exits at once, without a real image).
pub fn fake_image(dir: &Path) {
    use sha2::Digest as _;
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("vmlinuz"), b"not a kernel").unwrap();
    std::fs::write(dir.join("initramfs.img"), b"not an initramfs").unwrap();
    std::fs::write(dir.join("cmdline"), "powernode.test=1\n").unwrap();
    let m = serde_json::json!({
        "kernel_package": "linux-image-6.12.0-cloud-amd64",
        "kernel_version": "6.12.0-1",
        "kernel_release": "6.12.0-cloud-amd64",
        "vmlinuz_sha256": hex::encode(sha2::Sha256::digest(b"not a kernel")),
        "initramfs_sha256": hex::encode(sha2::Sha256::digest(b"not an initramfs")),
    });
    std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
}

/// Whether `pid` is alive (not a zombie).
pub fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

pub fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The QEMU pid of the instance's first `provider.provision` event.
pub fn vm_pid(dir: &Path, inst: &str) -> u64 {
    let events = cli_json(dir, &["recent-events", "--instance", inst]);
    events["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "provider.provision")
        .and_then(|e| e["detail"]["pid"].as_u64())
        .unwrap_or_else(|| panic!("no VM pid in {events}"))
}
