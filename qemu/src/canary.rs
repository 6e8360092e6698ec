//! The KVM canary: on some nested hosts (this project's build machine among them)
//! `KVM_CREATE_VM` works and the firmware runs, but the kernel's switch to protected
//! mode stops QEMU with "KVM internal error ... emulation failure", and the VM hangs
//! paused. So [`Accel::detect_for_kernel`] also boots the actual kernel under KVM for
//! a moment and takes KVM only if the kernel printed its banner; the answer is cached
//! for the process.
//!
//! It boots a VM, so it sits above `vm`; the [`Accel`] type it answers with stays in
//! `accel`, below the argv builder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::accel::Accel;
use crate::vm::Vm;

impl Accel {
    /// [`Accel::detect`], then, if KVM looks usable, a canary boot of `kernel` under
    /// KVM (up to `CANARY_DEADLINE`): KVM only if the kernel printed its banner.
    pub fn detect_for_kernel(qemu: &Path, kernel: &Path) -> Self {
        if Self::detect() == Self::Tcg {
            return Self::Tcg;
        }
        if std::env::var("POWERNODE_ACCEL").as_deref() == Ok("kvm") {
            return Self::Kvm;
        }
        // The lock is held across the canary: concurrent callers wait for one probe.
        static CACHE: OnceLock<Mutex<BTreeMap<PathBuf, Accel>>> = OnceLock::new();
        let mut cache = match CACHE.get_or_init(|| Mutex::new(BTreeMap::new())).lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(hit) = cache.get(kernel) {
            return *hit;
        }
        let accel = match kvm_canary(qemu, kernel) {
            Ok(()) => Self::Kvm,
            Err(reason) => {
                eprintln!("powernode-qemu: KVM unusable, using TCG: {reason}");
                Self::Tcg
            }
        };
        cache.insert(kernel.to_path_buf(), accel);
        accel
    }
}

const CANARY_DEADLINE: Duration = Duration::from_secs(20);

/// Boots `kernel` (no initramfs) under KVM until its banner appears on the serial
/// console; any KVM error, early exit or timeout is the reason KVM is not usable.
pub fn kvm_canary(qemu: &Path, kernel: &Path) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("powernode-kvm-canary-{}", std::process::id()));
    let serial = dir.join("serial.log");
    let argv: Vec<String> = [
        qemu.to_string_lossy().as_ref(),
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
        "-monitor",
        "none",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-machine",
        "q35",
        "-m",
        "128",
        "-serial",
        &format!("file:{}", serial.to_string_lossy()),
        "-kernel",
        kernel.to_string_lossy().as_ref(),
        "-append",
        "console=ttyS0 panic=-1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let result = (|| {
        let mut vm = Vm::spawn_argv(&argv, &serial, false).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + CANARY_DEADLINE;
        loop {
            if vm.serial().contains("Linux version") {
                return Ok(());
            }
            let stderr = vm.stderr();
            if stderr.contains("KVM internal error") || stderr.contains("emulation failure") {
                return Err(format!(
                    "QEMU: {}",
                    stderr.lines().next().unwrap_or_default()
                ));
            }
            if let Ok(Some(status)) = vm.try_wait() {
                return Err(format!(
                    "QEMU exited with {status} before the kernel banner: {stderr}"
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!("no kernel banner within {CANARY_DEADLINE:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
