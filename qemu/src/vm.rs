//! A running QEMU: spawned from a [`VmSpec`], its exact command line kept in a file
//! next to the serial log (so a human can rerun it), killed by its own pid on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::spec::{shell_quote, Firmware, VmSpec};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for QEMU (pid {pid})")]
    Wait {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("no OVMF firmware (install Debian's `ovmf`); looked for {}", searched.join(", "))]
    NoFirmware { searched: Vec<String> },
}

/// OVMF builds to try, in order (Debian's `ovmf`: the 4 MiB build is q35's default).
/// No secure-boot variant: the UKI is not signed.
pub const OVMF_CANDIDATES: &[(&str, &str)] = &[
    ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"),
    ("OVMF_CODE.fd", "OVMF_VARS.fd"),
];
/// Where Debian installs them; `POWERNODE_OVMF_DIR` overrides.
pub const OVMF_DIR: &str = "/usr/share/OVMF";

/// Finds OVMF and copies its variable store to `dir/ovmf-vars.fd` (a fresh copy each
/// call: every VM gets its own, as every machine has its own NVRAM).
pub fn ovmf_firmware(dir: &Path) -> Result<Firmware, VmError> {
    let base = std::env::var_os("POWERNODE_OVMF_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(OVMF_DIR));
    ovmf_firmware_from(&base, dir)
}

/// [`ovmf_firmware`] with OVMF looked up in `base`.
pub fn ovmf_firmware_from(base: &Path, dir: &Path) -> Result<Firmware, VmError> {
    let mut searched = Vec::new();
    for (code, vars) in OVMF_CANDIDATES {
        let (code, vars) = (base.join(code), base.join(vars));
        if code.is_file() && vars.is_file() {
            fs::create_dir_all(dir).map_err(io(dir))?;
            let copy = dir.join("ovmf-vars.fd");
            fs::copy(&vars, &copy).map_err(io(&copy))?;
            return Ok(Firmware { code, vars: copy });
        }
        searched.push(code.display().to_string());
    }
    Err(VmError::NoFirmware { searched })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VmError + '_ {
    move |source| VmError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug)]
pub struct Vm {
    child: Child,
    started: Instant,
    exited: Option<ExitStatus>,
    /// Let go of by [`Vm::detach`]: the drop leaves QEMU running.
    detached: bool,
    pub command: String,
    pub serial_log: PathBuf,
    pub command_file: PathBuf,
    pub stderr_log: PathBuf,
}

impl Vm {
    /// Starts QEMU. Writes `qemu-command.sh` (the exact argv, shell-quoted) and sends
    /// QEMU's own stdout/stderr to `qemu.stderr`, both beside the serial log; an old
    /// serial log is removed first so it never mixes two boots.
    pub fn spawn(spec: &VmSpec) -> Result<Self, VmError> {
        Self::spawn_argv(&spec.argv(), &spec.serial_log, false)
    }

    /// [`Vm::spawn`] for a VM meant to outlive this process ([`Vm::detach`]): QEMU
    /// leads a process group of its own, so a terminal's Ctrl-C (SIGINT to the
    /// foreground group) stops the parent and not the VM. It stays in the parent's
    /// session (no `setsid`): whoever ends the session on purpose still ends it.
    /// No parent-death signal is set: the parent dying leaves QEMU running.
    pub fn spawn_own_group(spec: &VmSpec) -> Result<Self, VmError> {
        Self::spawn_argv(&spec.argv(), &spec.serial_log, true)
    }

    /// Starts an argv that already names `serial_log` (the KVM canary builds its own).
    pub(crate) fn spawn_argv(
        argv: &[String],
        serial_log: &Path,
        own_group: bool,
    ) -> Result<Self, VmError> {
        let dir = serial_log
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let command = shell_quote(argv);
        let command_file = dir.join("qemu-command.sh");
        fs::write(&command_file, format!("#!/bin/sh\nexec {command}\n"))
            .map_err(io(&command_file))?;
        if serial_log.exists() {
            fs::remove_file(serial_log).map_err(io(serial_log))?;
        }
        let stderr_log = dir.join("qemu.stderr");
        let stderr = fs::File::create(&stderr_log).map_err(io(&stderr_log))?;
        let stdout = stderr.try_clone().map_err(io(&stderr_log))?;
        let (program, args) = argv.split_first().ok_or_else(|| VmError::Spawn {
            command: command.clone(),
            source: std::io::Error::other("empty argv"),
        })?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        if own_group {
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        let child = cmd.spawn().map_err(|source| VmError::Spawn {
            command: command.clone(),
            source,
        })?;
        Ok(Self {
            child,
            started: Instant::now(),
            exited: None,
            detached: false,
            command,
            serial_log: serial_log.to_path_buf(),
            command_file,
            stderr_log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Time since spawn.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits for QEMU to exit, up to `timeout`; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, VmError> {
        if self.exited.is_none() {
            let pid = self.pid();
            self.exited = self
                .child
                .try_wait()
                .map_err(|source| VmError::Wait { pid, source })?;
        }
        Ok(self.exited)
    }

    /// The serial console so far (lossy UTF-8; empty before QEMU wrote anything).
    pub fn serial(&self) -> String {
        fs::read(&self.serial_log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// QEMU's own diagnostics.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Presses the ACPI power button over the QMP socket at `qmp` (see
    /// [`crate::Device::Qmp`]): the guest's init (systemd-logind) shuts down cleanly.
    /// Returns once QEMU accepted the command, not when the guest is off.
    pub fn power_button(qmp: &Path, timeout: Duration) -> std::io::Result<()> {
        crate::qmp::execute(qmp, "system_powerdown", timeout)
    }

    /// Lets go of QEMU without killing it (it keeps running, e.g. past the server
    /// that started it, for the next one to adopt); returns its pid.
    pub fn detach(mut self) -> u32 {
        self.detached = true;
        self.pid()
    }

    /// Kills QEMU (SIGKILL to its own pid) and reaps it.
    pub fn kill(&mut self) {
        if self.exited.is_none() && !self.detached {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guard kills by pid on drop, and the command line is kept.
    #[test]
    fn drop_kills_the_process_and_the_command_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = VmSpec::new("/k", "/i", dir.path().join("serial.log"));
        // A stand-in QEMU that accepts any arguments and runs until killed.
        spec.qemu = dir.path().join("fake-qemu");
        fs::write(&spec.qemu, "#!/bin/sh\nexec sleep 600\n").unwrap();
        fs::set_permissions(
            &spec.qemu,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let mut vm = Vm::spawn(&spec).unwrap();
        let pid = vm.pid();
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        assert_eq!(vm.wait_timeout(Duration::from_millis(100)).unwrap(), None);
        let cmd = fs::read_to_string(&vm.command_file).unwrap();
        assert!(cmd.contains("-kernel /k -initrd /i"), "{cmd}");
        assert!(cmd.contains("fake-qemu"), "{cmd}");
        drop(vm);
        // Reaped: the pid is gone (or reused by something that is not our child).
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        assert!(
            !status.contains("fake-qemu") && !status.contains("sleep"),
            "{status}"
        );
    }

    /// A detached VM outlives its guard; one spawned in its own group leads it.
    #[test]
    fn a_detached_vm_keeps_running_in_its_own_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = VmSpec::new("/k", "/i", dir.path().join("serial.log"));
        spec.qemu = dir.path().join("fake-qemu");
        fs::write(&spec.qemu, "#!/bin/sh\nexec sleep 600\n").unwrap();
        fs::set_permissions(
            &spec.qemu,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let vm = Vm::spawn_own_group(&spec).unwrap();
        let pid = vm.detach();
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
        assert_eq!(fields[2], pid.to_string(), "process group: {stat}");
        assert!(!stat.contains(") Z "), "{stat}");
        let p = rustix::process::Pid::from_raw(pid as i32).unwrap();
        rustix::process::kill_process(p, rustix::process::Signal::KILL).unwrap();
        let _ = rustix::process::waitpid(Some(p), rustix::process::WaitOptions::empty());
    }

    #[test]
    fn exit_status_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = VmSpec::new("/k", "/i", dir.path().join("serial.log"));
        spec.qemu = PathBuf::from("/bin/false");
        let mut vm = Vm::spawn(&spec).unwrap();
        let status = vm.wait_timeout(Duration::from_secs(10)).unwrap().unwrap();
        assert!(!status.success());
    }

    #[test]
    fn ovmf_vars_are_copied_per_vm_and_absence_is_named() {
        let fake = tempfile::tempdir().unwrap();
        fs::write(fake.path().join("OVMF_CODE_4M.fd"), b"code").unwrap();
        fs::write(fake.path().join("OVMF_VARS_4M.fd"), b"vars").unwrap();
        let vm_dir = tempfile::tempdir().unwrap();
        let fw = ovmf_firmware_from(fake.path(), vm_dir.path()).unwrap();
        assert_eq!(fw.code, fake.path().join("OVMF_CODE_4M.fd"));
        assert_eq!(fw.vars, vm_dir.path().join("ovmf-vars.fd"));
        assert_eq!(fs::read(&fw.vars).unwrap(), b"vars");
        let err = ovmf_firmware_from(&vm_dir.path().join("none"), vm_dir.path()).unwrap_err();
        assert!(
            matches!(&err, VmError::NoFirmware { searched } if searched.len() == 2),
            "{err}"
        );
    }

    #[test]
    fn missing_qemu_is_a_spawn_error_with_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = VmSpec::new("/k", "/i", dir.path().join("serial.log"));
        spec.qemu = PathBuf::from("/nonexistent/qemu");
        let err = Vm::spawn(&spec).unwrap_err();
        assert!(
            matches!(&err, VmError::Spawn { command, .. } if command.contains("/nonexistent/qemu"))
        );
    }

    /// A stand-in QMP server: greets, answers each command, and records them.
    fn fake_qmp(
        path: &Path,
        answer_powerdown: &'static str,
    ) -> std::thread::JoinHandle<Vec<String>> {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut w = stream.try_clone().unwrap();
            let mut r = BufReader::new(stream);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            let mut got = Vec::new();
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                got.push(line.trim().to_string());
                let reply = if line.contains("system_powerdown") {
                    answer_powerdown
                } else {
                    "{\"return\": {}}\n"
                };
                w.write_all(b"{\"event\": \"NOTHING\"}\n").unwrap();
                w.write_all(reply.as_bytes()).unwrap();
                line.clear();
            }
            got
        })
    }

    #[test]
    fn the_power_button_is_pressed_over_qmp_after_the_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let server = fake_qmp(&sock, "{\"return\": {}}\n");
        Vm::power_button(&sock, Duration::from_secs(5)).unwrap();
        let got = server.join().unwrap();
        assert_eq!(
            got,
            [
                "{\"execute\":\"qmp_capabilities\"}",
                "{\"execute\":\"system_powerdown\"}"
            ]
        );
    }

    #[test]
    fn a_qmp_error_or_no_socket_is_an_error_naming_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let server = fake_qmp(
            &sock,
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no ACPI\"}}\n",
        );
        let err = Vm::power_button(&sock, Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("system_powerdown"), "{err}");
        drop(server);
        assert!(Vm::power_button(&dir.path().join("absent.sock"), Duration::from_secs(1)).is_err());
    }
}
