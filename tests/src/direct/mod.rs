//! VMs a test boots itself (direct kernel boot of our initramfs, no provider in
//! between), shared by the VM tests and the benchmarks: build the musl inits and the
//! netboot image, boot them, read the structured console lines back.

pub mod modules;
pub mod rootfs;
pub mod stub;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use powernode_initramfs::modules::Closure;
use powernode_initramfs::{build, cpio, BuildOptions, BuildOutput, Compression, KernelPin};
use powernode_qemu::{Accel, Device, Vm, VmSpec};
use serde_json::Value;

use crate::workspace_root;

/// `target/vm-tests/<name>/`, emptied.
pub fn test_dir(name: &str) -> PathBuf {
    crate::vm::artifacts_dir(name).unwrap()
}

/// Builds `powernode-init` and `powernode-baseline-init` for static musl and returns
/// their paths (a no-op when they are fresh).
pub fn musl_inits() -> (PathBuf, PathBuf) {
    let dir = crate::build_musl_inits().unwrap_or_else(|e| panic!("{e:#}"));
    (
        dir.join("powernode-init"),
        dir.join("powernode-baseline-init"),
    )
}

/// The netboot image (pinned kernel, module closure, our init) into `out`.
pub fn image(out: &Path, init: &Path, compression: Compression) -> BuildOutput {
    image_with_agent(out, init, None, compression)
}

/// [`image`] with the agent binary installed too.
pub fn image_with_agent(
    out: &Path,
    init: &Path,
    agent: Option<&Path>,
    compression: Compression,
) -> BuildOutput {
    image_with(out, init, agent, compression, &[])
}

/// The default netboot image with module trust keys (PEM files) built in: the node
/// pins them, whatever its identity says.
pub fn netboot_pinning(dir: &Path, trust_keys: &[PathBuf]) -> BuildOutput {
    let (init, _) = musl_inits();
    image_with(
        &dir.join("image"),
        &init,
        None,
        Compression::default(),
        trust_keys,
    )
}

fn image_with(
    out: &Path,
    init: &Path,
    agent: Option<&Path>,
    compression: Compression,
    trust_keys: &[PathBuf],
) -> BuildOutput {
    let root = workspace_root();
    build(&BuildOptions {
        init: init.to_path_buf(),
        agent: agent.map(Path::to_path_buf),
        trust_keys: trust_keys.to_vec(),
        out: out.to_path_buf(),
        cache: std::env::var("POWERNODE_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("cache")),
        debs_script: root.join("scripts/debs"),
        pin: KernelPin::parse(powernode_initramfs::kernel::DEFAULT_PIN).unwrap(),
        compression,
    })
    .unwrap_or_else(|e| panic!("building the image: {:#}", anyhow_chain(&e)))
}

/// The default netboot image (our musl init, default compression) into `dir/image`:
/// the first step of every direct-boot test.
pub fn netboot(dir: &Path) -> BuildOutput {
    let (init, _) = musl_inits();
    image(&dir.join("image"), &init, Compression::default())
}

/// A spec booting [`netboot`]'s image with its serial log in `dir`, as
/// [`poweroff_spec`] does.
pub fn netboot_spec(dir: &Path, args: &[&str]) -> VmSpec {
    poweroff_spec(dir, &netboot(dir), args)
}

/// A spec booting `image` with its serial log in `dir`; the command line is
/// `powernode.on_failure=poweroff` (a failed boot ends the VM) and then `args`.
pub fn poweroff_spec(dir: &Path, image: &BuildOutput, args: &[&str]) -> VmSpec {
    let mut spec = spec(dir, &image.vmlinuz, &image.initramfs);
    spec.kernel_args = std::iter::once("powernode.on_failure=poweroff")
        .chain(args.iter().copied())
        .map(String::from)
        .collect();
    spec
}

/// A provisioned node's VM in `dir` (created): [`poweroff_spec`] with the identity
/// document `doc` by fw_cfg and, when given, `persist` as its persist disk.
pub fn node_spec(
    dir: &Path,
    image: &BuildOutput,
    doc: &Value,
    persist: Option<&Path>,
    args: &[&str],
) -> VmSpec {
    std::fs::create_dir_all(dir).unwrap();
    let mut spec = poweroff_spec(dir, image, args);
    with_identity(&mut spec, dir, &doc.to_string());
    if let Some(path) = persist {
        spec.devices.push(Device::PersistDisk {
            path: path.to_path_buf(),
        });
    }
    spec
}

/// The baseline initramfs: the trivial init alone, no modules, same format.
pub fn baseline_initrd(out: &Path, baseline_init: &Path) -> PathBuf {
    let init = std::fs::read(baseline_init).unwrap();
    let spec = powernode_initramfs::build::initramfs_spec(
        &init,
        None,
        &Closure {
            modules: Vec::new(),
            builtin: Vec::new(),
        },
        &[],
    )
    .unwrap();
    let archive = cpio::write_newc(&spec).unwrap();
    let bytes = powernode_initramfs::compress::compress(&archive, Compression::default()).unwrap();
    let path = out.join("baseline-initramfs.img");
    std::fs::write(&path, bytes).unwrap();
    path
}

fn anyhow_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A valid identity document (version 1) for the fw_cfg entry.
pub fn identity_json(instance_id: &str) -> String {
    serde_json::json!({
        "version": 1,
        "control_plane_url": "https://10.0.2.2:8443",
        "ca_pem": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        "bootstrap_token": "vm-test-token",
        "node_id": "node-vm-test",
        "instance_id": instance_id,
        "hostname": "vm-test-1"
    })
    .to_string()
}

/// A spec for `kernel` + `initrd` with the serial log in `dir`, TCG or KVM as this
/// host allows, 512 MiB.
pub fn spec(dir: &Path, kernel: &Path, initrd: &Path) -> VmSpec {
    let mut spec = VmSpec::new(kernel, initrd, dir.join("serial.log"));
    spec.accel = Accel::detect_for_kernel(&spec.qemu, kernel);
    spec
}

pub fn with_identity(spec: &mut VmSpec, dir: &Path, body: &str) {
    let path = dir.join("identity.json");
    std::fs::write(&path, body).unwrap();
    spec.devices.push(Device::identity(path));
}

/// The outcome of one boot.
pub struct Boot {
    pub elapsed: Duration,
    pub serial: String,
    pub command: String,
}

/// Boots and waits for QEMU to exit (the guest powers off) within `deadline`;
/// panics with the exact command and the serial tail otherwise.
pub fn boot(spec: &VmSpec, deadline: Duration) -> Boot {
    try_boot(spec, deadline).unwrap_or_else(|e| panic!("{e}"))
}

/// [`boot`] that must go through without a failed phase; returns the boot, the
/// init's events (`POWERNODE-INIT ` lines) and what a failed assertion prints (the
/// command and the serial log's path).
pub fn boot_clean(spec: &VmSpec, deadline: Duration) -> (Boot, Vec<Value>, String) {
    let boot = boot(spec, deadline);
    let events = events(&boot.serial, "POWERNODE-INIT ");
    let context = format!(
        "command: {}\nserial: {}",
        boot.command,
        spec.serial_log.display()
    );
    assert!(
        !events.iter().any(|e| e["event"] == "phase_failed"),
        "a phase failed: {events:?}\n{context}"
    );
    (boot, events, context)
}

/// [`boot`] that returns the explanation instead of panicking.
pub fn try_boot(spec: &VmSpec, deadline: Duration) -> Result<Boot, String> {
    let mut vm = Vm::spawn(spec).map_err(|e| e.to_string())?;
    let status = vm.wait_timeout(deadline).map_err(|e| e.to_string())?;
    let elapsed = vm.elapsed();
    let serial = vm.serial();
    let explain = |what: &str| {
        let tail: Vec<&str> = serial.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "{what}\n--- rerun: sh {}\n{}\n--- qemu stderr:\n{}\n--- serial tail ({}):\n{}",
            vm.command_file.display(),
            vm.command,
            vm.stderr(),
            spec.serial_log.display(),
            tail.join("\n")
        )
    };
    match status {
        None => {
            let text = explain(&format!("QEMU still running after {deadline:?}"));
            vm.kill();
            return Err(text);
        }
        Some(s) if !s.success() => return Err(explain(&format!("QEMU exited with {s}"))),
        Some(_) => {}
    }
    let command = vm.command.clone();
    Ok(Boot {
        elapsed,
        serial,
        command,
    })
}

/// JSON objects from console lines carrying `prefix` (e.g. `POWERNODE-INIT `). The
/// kernel prints its own messages to the same serial port whenever it likes, so one
/// may land inside or right after a line of ours: kernel records that start
/// mid-line are cut out first, and only the first JSON value after the prefix is
/// read.
pub fn events(serial: &str, prefix: &str) -> Vec<Value> {
    without_midline_kernel_records(serial, prefix)
        .lines()
        .filter_map(|l| l.find(prefix).map(|i| &l[i + prefix.len()..]))
        .filter_map(|j| {
            serde_json::Deserializer::from_str(j.trim_start())
                .into_iter::<Value>()
                .next()
                .and_then(Result::ok)
        })
        .collect()
}

/// `serial` without the kernel log records (`[ SECONDS.MICROS] text` up to the end
/// of their line) that begin in the middle of another line. A record that split one
/// of our lines is cut with its newline (the halves join again); one that ended ours
/// (what follows starts a new line: another record or `prefix`) leaves the newline.
fn without_midline_kernel_records(serial: &str, prefix: &str) -> String {
    let bytes = serial.as_bytes();
    let mut out = String::with_capacity(serial.len());
    let mut i = 0;
    let mut copied = 0;
    while i < bytes.len() {
        if bytes[i] == b'[' && i > 0 && bytes[i - 1] != b'\n' {
            if let Some(len) = kernel_stamp_len(&bytes[i..]) {
                let end = bytes[i + len..]
                    .iter()
                    .position(|b| *b == b'\n')
                    .map_or(bytes.len(), |p| i + len + p + 1);
                out.push_str(&serial[copied..i]);
                let rest = &serial[end..];
                if rest.is_empty() || rest.starts_with('[') || rest.starts_with(prefix) {
                    out.push('\n');
                }
                copied = end;
                i = end;
                continue;
            }
        }
        i += 1;
    }
    out.push_str(&serial[copied..]);
    out
}

/// The length of a printk timestamp `[   12.345678] ` at the start of `b`.
fn kernel_stamp_len(b: &[u8]) -> Option<usize> {
    let mut i = 1;
    while b.get(i) == Some(&b' ') {
        i += 1;
    }
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i > start
    };
    (digits(&mut i)
        && b.get(i) == Some(&b'.')
        && {
            i += 1;
            digits(&mut i)
        }
        && b.get(i) == Some(&b']')
        && b.get(i + 1) == Some(&b' '))
    .then_some(i + 2)
}

pub fn event<'a>(events: &'a [Value], key: &str, value: &str) -> Option<&'a Value> {
    events.iter().find(|e| e[key] == value)
}

/// Polls `check` every 250 ms until it returns `Some`; panics with `context()` when
/// QEMU exits first or `timeout` passes. The one wait of the VM tests: a condition
/// the server reports is waited for, never assumed after another one.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    vm: &mut Vm,
    context: &dyn Fn() -> String,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    poll_until(what, timeout, context, || {
        if let Some(v) = check() {
            return Some(v);
        }
        if let Ok(Some(status)) = vm.try_wait() {
            panic!(
                "QEMU exited ({status}) while waiting for {what}\n{}",
                context()
            );
        }
        None
    })
}

/// [`wait_until`] with no VM to watch (it was killed, or its exit is expected).
pub fn poll_until<T>(
    what: &str,
    timeout: Duration,
    context: &dyn Fn() -> String,
    check: impl FnMut() -> Option<T>,
) -> T {
    poll_every(what, timeout, Duration::from_millis(250), context, check)
}

/// [`poll_until`], asking every `every` (a benchmark timing what it waits for).
pub fn poll_every<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    context: &dyn Fn() -> String,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("no {what} after {timeout:?}\n{}", context());
        }
        std::thread::sleep(every);
    }
}

/// Runs `cmd`, which must succeed; its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a failed VM test prints: the QEMU command, its stderr, the server log's
/// path and the serial tail, read when asked (the closure owns copies of the paths).
pub fn vm_context(vm: &Vm, server_log: Option<&Path>) -> impl Fn() -> String {
    let command_file = vm.command_file.clone();
    let stderr_log = vm.stderr_log.clone();
    let serial_log = vm.serial_log.clone();
    let server_log = server_log.map(Path::to_path_buf);
    move || {
        let serial = std::fs::read_to_string(&serial_log).unwrap_or_default();
        let tail: Vec<&str> = serial.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        let server = server_log
            .as_ref()
            .map(|p| format!("\nserver log: {}", p.display()))
            .unwrap_or_default();
        format!(
            "rerun: sh {}\nqemu stderr: {}\nserial: {}{server}\n--- serial tail:\n{}",
            command_file.display(),
            std::fs::read_to_string(&stderr_log).unwrap_or_default(),
            serial_log.display(),
            tail.join("\n")
        )
    }
}

/// The agent's credential files under `/persist` (the state dir `/persist/powernode`).
const PERSISTED_CREDENTIALS: &[&str] = &["/powernode/node.key", "/powernode/node.crt"];

/// Waits (up to 60 s) until the ext4 image `disk`, as a hard power loss would leave
/// it now (a copy, its journal replayed by e2fsck), holds the agent's key and
/// certificate. Replaces a fixed sleep for the guest's journal commit (every 5 s of
/// guest time, which a loaded host can stretch). Panics with `context()` otherwise.
pub fn wait_credentials_persisted(disk: &Path, vm: &mut Vm, context: &dyn Fn() -> String) {
    let (what, files, timeout) = (
        "the credentials on the persist disk",
        PERSISTED_CREDENTIALS,
        Duration::from_secs(60),
    );
    let copy = disk.with_extension("probe.img");
    let missing = |copy: &Path| -> Vec<String> {
        if std::fs::copy(disk, copy).is_err() {
            return vec![format!("(cannot copy {})", disk.display())];
        }
        // 0 clean, 1 corrected (a replayed journal), 2 corrected, reboot wanted.
        let fsck = Command::new("e2fsck").args(["-f", "-y"]).arg(copy).output();
        if !fsck.is_ok_and(|o| matches!(o.status.code(), Some(0..=2))) {
            return vec!["(e2fsck failed on the copy)".into()];
        }
        files
            .iter()
            .filter(|f| {
                let stat = Command::new("debugfs")
                    .arg("-R")
                    .arg(format!("stat {f}"))
                    .arg(copy)
                    .output();
                let text = stat
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                // `Size: N` of a regular file that exists.
                text.split_whitespace()
                    .skip_while(|w| *w != "Size:")
                    .nth(1)
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_none_or(|n| n == 0)
            })
            .map(|f| f.to_string())
            .collect()
    };
    let last = std::cell::RefCell::new(Vec::new());
    let explain = || {
        format!(
            "still missing {:?} (checked on a copy of {})\n{}",
            last.borrow(),
            disk.display(),
            context()
        )
    };
    wait_until(what, timeout, vm, &explain, || {
        let m = missing(&copy);
        let done = m.is_empty();
        *last.borrow_mut() = m;
        done.then_some(())
    });
    let _ = std::fs::remove_file(&copy);
}

/// The server's `boot_timeline` of an instance: (phase, ms since kernel start).
pub fn boot_timeline(inst: &Value) -> Vec<(String, u64)> {
    inst["boot_timeline"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["phase"].as_str().unwrap_or("").to_string(),
                        e["at_ms"].as_u64().unwrap_or(u64::MAX),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A cloud identity (metadata service or config drive) is found after DHCP and
/// before enrollment, by the server's `boot_timeline` of `inst`.
pub fn assert_identity_found_after_network(inst: &Value) {
    let names: Vec<String> = boot_timeline(inst).into_iter().map(|(p, _)| p).collect();
    let pos = |p: &str| {
        names
            .iter()
            .position(|n| n == p)
            .unwrap_or_else(|| panic!("{p} missing from {names:?}"))
    };
    assert!(pos("network_up") < pos("identity_found"), "{names:?}");
    assert!(pos("identity_found") < pos("enrolled"), "{names:?}");
}

#[cfg(test)]
mod serial_tests {
    use super::*;

    #[test]
    fn kernel_records_inside_or_after_our_lines_do_not_hide_events() {
        let serial = "[    1.0] boot\r\n\
            POWERNODE-INIT {\"event\":\"a\",\"list\":[1,2]}[    2.079207] tsc: Refined TSC\r\n\
            POWERNODE-INIT {\"event\":\"b\",\"x\":\"y[    2.5] clocksource: switched\r\nz\"}\r\n\
            POWERNODE-INIT {\"event\":\"c\"}\r\n";
        let ev = events(serial, "POWERNODE-INIT ");
        let names: Vec<&str> = ev.iter().filter_map(|e| e["event"].as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(ev[1]["x"], "yz");
        assert_eq!(ev[0]["list"], serde_json::json!([1, 2]));
    }
}
