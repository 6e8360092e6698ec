//! The VM tier's shared pieces for tests that go through the server's real
//! provider: the netboot image build, a server that boots real QEMU VMs (stopped,
//! with its VMs, even when a test fails), the VM's files kept for reading, and the
//! real Debian root with the pinned kernel's modules.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;

use crate::proto::paths;
use crate::{cargo, target_dir, wait_for, Server, ServerOptions};

/// `target/vm-tests/<name>/`, emptied: where the VM's files are kept for reading.
pub fn artifacts_dir(name: &str) -> Result<PathBuf> {
    let dir = target_dir().join("vm-tests").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Builds the static init and the netboot image into `out`; returns `out`.
pub fn build_image(out: &Path) -> Result<PathBuf> {
    let t = Instant::now();
    let init = crate::build_musl_inits()?.join("powernode-init");
    initramfs_tool(
        "build",
        &[
            "--init".as_ref(),
            init.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ],
    )?;
    eprintln!("image built in {:?}: {}", t.elapsed(), out.display());
    Ok(out.to_path_buf())
}

/// The server, stopped even when the test fails: SIGTERM (it leaves its VMs
/// running, for the next server to adopt), then its guard kills what is left of its
/// session, the VMs among them; the guards of servers killed earlier
/// ([`RealServer::kill_and_restart`]) do the same for theirs. A QEMU it started is
/// then killed by its pid if it is somehow still there.
pub struct RealServer {
    pub server: Option<Server>,
    pub qemu_pid: Option<u32>,
    /// Servers SIGKILLed alone, kept for their guards (their sessions hold VMs).
    pub killed: Vec<Server>,
    /// `--provider libvirt`: the domains it started (libvirt's, not in any session
    /// of ours), destroyed by name when the test ends.
    pub domains: Vec<String>,
}

impl Drop for RealServer {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.guard.terminate(Duration::from_secs(10));
        }
        for mut s in self.killed.drain(..) {
            s.guard.kill();
        }
        for name in self.domains.drain(..) {
            let _ = Command::new("virsh")
                .args(["-q", "-c", LIBVIRT_URI, "destroy", &name])
                .stderr(std::process::Stdio::null())
                .status();
        }
        if let Some(pid) = self.qemu_pid.filter(|p| qemu_alive(*p)) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// The libvirt connection the VM tests use.
pub const LIBVIRT_URI: &str = "qemu:///system";

/// libvirt for a test: started by `scripts/libvirtd` when it does not answer, and
/// then stopped by its own pids when dropped; a daemon that already answered is
/// someone else's and is left alone.
pub struct Libvirtd {
    started: Vec<u32>,
}

impl Libvirtd {
    pub fn ensure() -> Result<Self> {
        let script = crate::workspace_root().join("scripts/libvirtd");
        let answers = Command::new(&script).arg("--check").status()?.success();
        if answers {
            return Ok(Self {
                started: Vec::new(),
            });
        }
        let before: Vec<u32> = ["libvirtd", "virtlogd"]
            .iter()
            .filter_map(|n| pid_of(n))
            .collect();
        let out = Command::new(&script)
            .output()
            .context("running scripts/libvirtd")?;
        ensure!(
            out.status.success(),
            "scripts/libvirtd: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let started = ["libvirtd", "virtlogd"]
            .iter()
            .filter_map(|n| pid_of(n))
            .filter(|p| !before.contains(p))
            .collect();
        Ok(Self { started })
    }
}

/// The pid of the running process named `name` (from `pgrep -x`), if one.
fn pid_of(name: &str) -> Option<u32> {
    let out = Command::new("pgrep").args(["-x", name]).output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        for pid in &self.started {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for pid in &self.started {
            let proc = PathBuf::from(format!("/proc/{pid}"));
            while proc.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if proc.exists() {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

pub fn qemu_alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.contains("(qemu-system") && !stat.contains(") Z ")
}

pub fn events(server: &Server, instance: &str) -> Result<Vec<Value>> {
    let v = server.get(&format!(
        "{}?limit=200&instance_id={instance}",
        paths::ADMIN_EVENTS
    ))?;
    Ok(v["events"].as_array().cloned().unwrap_or_default())
}

/// How many `kind` events the instance has (of its newest 200).
pub fn count_events(server: &Server, inst: &str, kind: &str) -> Result<usize> {
    Ok(events(server, inst)?
        .iter()
        .filter(|e| e["kind"] == kind)
        .count())
}

/// Waits (up to 180 s) for `running` with a boot timeline other than `before` (a new
/// boot; `Value::Null` for the first); a failed instance is an error with its failure.
pub fn wait_booted(server: &Server, inst: &str, before: &Value) -> Result<Value> {
    wait_for("running (a new boot)", Duration::from_secs(180), || {
        let i = server.instance(inst)?;
        match i["status"].as_str() {
            Some("failed") => bail!("instance failed: {}", i["failure"]),
            Some("running") if i["boot_timeline"] != *before => Ok(Some(i)),
            _ => Ok(None),
        }
    })
}

/// The instance's `last_heartbeat_at`.
pub fn last_heartbeat(server: &Server, inst: &str) -> Result<String> {
    let i = server.instance(inst)?;
    i["last_heartbeat_at"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no last_heartbeat_at: {i}"))
}

/// Copies what the VM left (serial log, command, QEMU stderr) to `dest`.
pub fn keep_vm_files(instance_dir: &Path, dest: &Path) {
    for f in ["serial.log", "qemu-command.sh", "qemu.stderr"] {
        let _ = std::fs::copy(instance_dir.join(f), dest.join(f));
    }
}

impl RealServer {
    /// `powernode-stub serve --provider real` booting `image`, with `extra` flags.
    pub fn start(data: &Path, image: &Path, extra: &[&str]) -> Result<Self> {
        Self::start_env(data, image, extra, &[])
    }

    /// [`RealServer::start`] with `env` for the server (`POWERNODE_VM_APPEND`: kernel
    /// arguments for every VM).
    pub fn start_env(
        data: &Path,
        image: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::start_provider("real", data, image, extra, env)
    }

    /// [`RealServer::start_env`] with another VM provider (`libvirt`).
    pub fn start_provider(
        provider: &str,
        data: &Path,
        image: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let mut flags = vec![
            "--provider".to_string(),
            provider.into(),
            "--image-base".into(),
            image.to_string_lossy().into_owned(),
        ];
        flags.extend(extra.iter().map(|s| s.to_string()));
        Ok(Self {
            server: Some(Server::start(
                data,
                ServerOptions {
                    heartbeat_interval_seconds: 2,
                    extra: flags,
                    env: env
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    ..ServerOptions::default()
                },
            )?),
            qemu_pid: None,
            killed: Vec::new(),
            domains: Vec::new(),
        })
    }

    /// SIGKILLs the server alone (its VMs live on, as after a crash) and starts a new
    /// one on the same data directory and port.
    pub fn kill_and_restart(&mut self) -> Result<()> {
        let mut old = self.server.take().context("server stopped")?;
        let mut opts = old.opts.clone();
        opts.port = Some(old.port()?);
        let data = old.data.clone();
        old.guard.signal_alone("-KILL")?;
        self.killed.push(old);
        // The port was just freed; retry briefly in case the kernel still holds it.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Server::start(&data, opts.clone()) {
                Ok(s) => {
                    self.server = Some(s);
                    return Ok(());
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("restart failed ({e:#}); retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn server(&self) -> Result<&Server> {
        self.server.as_ref().context("server stopped")
    }

    /// Waits for the provider to start the instance's VM (a later `provider.provision`
    /// than `after` events); records its pid for the guard; returns the pid and the
    /// instance folder (serial log, QEMU command, persist disk).
    pub fn vm_started(&mut self, inst: &str, after: usize) -> Result<(u32, PathBuf)> {
        let server = self.server()?;
        let started = wait_for("the VM to start", Duration::from_secs(120), || {
            let i = server.instance(inst)?;
            if i["status"] == "failed" {
                bail!("provisioning failed: {}", i["failure"]);
            }
            Ok(events(server, inst)?
                .into_iter()
                .filter(|e| e["kind"] == "provider.provision")
                .nth(after))
        })?;
        let pid = started["detail"]["pid"].as_u64().context("no VM pid")? as u32;
        let dir = PathBuf::from(
            started["detail"]["instance_dir"]
                .as_str()
                .context("no instance_dir")?,
        );
        self.qemu_pid = Some(pid);
        if let Some(domain) = started["detail"]["domain"].as_str() {
            self.domains.push(domain.to_string());
        }
        Ok((pid, dir))
    }
}

/// Waits until `inst` has more than `after` `vm.rebooted` events (its VM reset in
/// place: the server's real provider runs QEMU without `-no-reboot`); returns the
/// newest.
pub fn vm_rebooted(server: &Server, inst: &str, after: usize) -> Result<Value> {
    wait_for("the VM to reset", Duration::from_secs(300), || {
        let i = server.instance(inst)?;
        if i["status"] == "failed" {
            bail!("instance failed: {}", i["failure"]);
        }
        let resets: Vec<Value> = events(server, inst)?
            .into_iter()
            .filter(|e| e["kind"] == "vm.rebooted")
            .collect();
        Ok((resets.len() > after).then(|| resets[0].clone()))
    })
}

/// Runs `powernode-initramfs COMMAND ARGS` (release: it hashes and compresses).
fn initramfs_tool(command: &str, args: &[&std::ffi::OsStr]) -> Result<()> {
    let status = cargo()
        .args(["run", "-q", "--release", "-p", "powernode-initramfs", "--"])
        .arg(command)
        .args(args)
        .status()
        .with_context(|| format!("running powernode-initramfs {command}"))?;
    ensure!(status.success(), "powernode-initramfs {command} failed");
    Ok(())
}

/// The template's module flags for the Debian root: the roots `debian` and
/// `kernel-modules`, plus `runtime` if any.
pub fn debian_template(runtime: Option<&str>) -> Vec<&str> {
    let mut args = vec![
        "set-template-modules",
        "tmpl-edge-base",
        "--root",
        "debian",
        "--root",
        "kernel-modules",
    ];
    if let Some(r) = runtime {
        args.extend(["--runtime", r]);
    }
    args
}

/// Publishes the Debian root `root` as `debian` 12.0.0 (owners kept, with `labels`)
/// and the kernel's modules `kmods` as `kernel-modules` 1, both root modules, and
/// makes them the template's roots, through `cli` (a server's admin CLI). Returns
/// the Debian root's publication.
pub fn publish_debian(
    cli: &dyn Fn(&[&str]) -> Result<Value>,
    root: &Path,
    kmods: &Path,
    labels: &[String],
) -> Result<Value> {
    let root = root.to_string_lossy();
    let mut publish = vec![
        "publish-module",
        &root,
        "--name",
        "debian",
        "--version",
        "12.0.0",
        "--kind",
        "root",
        "--preserve-owners",
    ];
    for l in labels {
        publish.extend(["--label", l.as_str()]);
    }
    let published = cli(&publish)?;
    let kmods = kmods.to_string_lossy();
    cli(&[
        "publish-module",
        &kmods,
        "--name",
        "kernel-modules",
        "--version",
        "1",
        "--kind",
        "root",
    ])?;
    cli(&debian_template(None))?;
    Ok(published)
}

/// The real Debian root (`scripts/debian-root`: bookworm, systemd, Docker; built
/// once into `cache/` and shared by every test).
pub fn debian_root() -> Result<PathBuf> {
    let out = Command::new(crate::workspace_root().join("scripts/debian-root"))
        .output()
        .context("running scripts/debian-root")?;
    ensure!(
        out.status.success(),
        "scripts/debian-root: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The pinned kernel's modules as a root module folder (`usr/lib/modules/REL`).
pub fn kernel_modules(out: &Path) -> Result<PathBuf> {
    if out.join("usr/lib/modules").is_dir() {
        return Ok(out.to_path_buf());
    }
    let _ = std::fs::remove_dir_all(out);
    initramfs_tool("kernel-modules", &["--out".as_ref(), out.as_os_str()])?;
    Ok(out.to_path_buf())
}

/// What `dumpe2fs -h` (read-only) says of an ext4 image: `Ok(())` when `clean` with
/// no `needs_recovery`.
pub fn fs_clean(disk: &Path) -> Result<()> {
    let out = Command::new("dumpe2fs").arg("-h").arg(disk).output()?;
    ensure!(
        out.status.success(),
        "dumpe2fs -h {}: {}",
        disk.display(),
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let (state, features) = (field("Filesystem state:"), field("Filesystem features:"));
    ensure!(
        state == "clean" && !features.split_whitespace().any(|f| f == "needs_recovery"),
        "{}: state {state:?}; features {features:?}",
        disk.display()
    );
    Ok(())
}

/// Runs the body of a VM test through the server's provider: `body` gets the
/// artifacts folder (`target/vm-tests/NAME/`, emptied) and records the instance
/// folder once it knows it. Whatever happens, the VM's files are kept in the
/// artifacts folder; a failure prints the QEMU command and the serial tail, then
/// panics with the error.
pub fn vm_test(name: &str, body: impl FnOnce(&Path, &mut Option<PathBuf>) -> Result<()>) {
    let out = artifacts_dir(name).expect("artifacts dir");
    let mut instance_dir = None;
    let result = body(&out, &mut instance_dir);
    if let Some(dir) = &instance_dir {
        keep_vm_files(dir, &out);
    }
    if let Err(e) = result {
        explain_failure(&out);
        panic!("{name}: {e:#}");
    }
}

/// Prints the QEMU command and the serial log's last lines, for a failed test.
pub fn explain_failure(out: &Path) {
    let command = std::fs::read_to_string(out.join("qemu-command.sh")).unwrap_or_default();
    let serial = std::fs::read_to_string(out.join("serial.log")).unwrap_or_default();
    let tail: Vec<&str> = serial.lines().rev().take(40).collect();
    eprintln!(
        "QEMU command ({}):\n{command}",
        out.join("qemu-command.sh").display()
    );
    eprintln!(
        "serial log, last lines ({}):\n{}",
        out.join("serial.log").display(),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}
