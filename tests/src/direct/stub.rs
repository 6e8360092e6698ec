//! A real `powernode-stub` for the VM tests and the benchmark: started on the host
//! loopback with the URL the guest uses (10.0.2.2), driven through its admin CLI,
//! killed by its own pid on drop (its [`ProcessGuard`]). Started and driven by the
//! same [`spawn_serve`] and [`stub_cli`] as the host tier's [`crate::Server`].

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use powernode_qemu::Vm;
use serde_json::Value;

use crate::{cargo, spawn_serve, stub_cli, target_dir, ProcessGuard};

/// Builds the host `powernode-stub` (debug profile) and returns its path;
/// `POWERNODE_STUB_BIN` points at a prebuilt one instead.
pub fn stub_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("POWERNODE_STUB_BIN") {
        return PathBuf::from(bin);
    }
    let status = cargo()
        .args([
            "build",
            "-q",
            "-p",
            "powernode-stub",
            "--bin",
            "powernode-stub",
        ])
        .status()
        .expect("run cargo");
    assert!(status.success(), "building powernode-stub failed");
    target_dir().join("debug/powernode-stub")
}

/// A running `powernode-stub serve`, killed (by its own pid) on drop.
pub struct Stub {
    _guard: ProcessGuard,
    bin: PathBuf,
    data: PathBuf,
    url: String,
    log: PathBuf,
}

/// A port that was free a moment ago: the guest must be told the server's URL
/// (`--public-url`, put into identity documents) before the server starts.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// How a test's server is started.
#[derive(Debug, Clone)]
pub struct StubOptions {
    /// The host as the guest reaches it (10.0.2.2 on QEMU's user network).
    pub guest_host: String,
    /// The port the guest dials (a proxy's); the server's own when `None`.
    pub public_port: Option<u16>,
    pub heartbeat_interval_seconds: u64,
    /// More `serve` flags (sensor windows, stuck thresholds).
    pub extra: Vec<String>,
}

impl Default for StubOptions {
    fn default() -> Self {
        Self {
            guest_host: "10.0.2.2".into(),
            public_port: None,
            heartbeat_interval_seconds: 2,
            extra: Vec::new(),
        }
    }
}

impl Stub {
    pub fn start(dir: &Path) -> Stub {
        Self::start_with(dir, StubOptions::default())
    }

    /// [`Stub::start`] for guests that reach the host at `guest_host` (e.g.
    /// 169.254.2.2 on the metadata network of `Device::metadata_net`).
    pub fn start_reachable_at(dir: &Path, guest_host: &str) -> Stub {
        Self::start_with(
            dir,
            StubOptions {
                guest_host: guest_host.into(),
                ..StubOptions::default()
            },
        )
    }

    pub fn start_with(dir: &Path, opts: StubOptions) -> Stub {
        let bin = stub_binary();
        let data = dir.join("server-data");
        let log = dir.join("server.log");
        let mut last = String::new();
        // The free port may be taken between probe and bind: try a few.
        for _ in 0..5 {
            let port = free_port();
            let public = opts.public_port.unwrap_or(port);
            let mut cmd = Command::new(&bin);
            cmd.arg("serve")
                .arg("--data")
                .arg(&data)
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args([
                    "--public-url",
                    &format!("https://{}:{public}", opts.guest_host),
                ])
                .args([
                    "--heartbeat-interval-seconds",
                    &opts.heartbeat_interval_seconds.to_string(),
                ])
                .args(["--provider", "recorder"])
                .args(&opts.extra)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap());
            match spawn_serve(cmd, &log) {
                Ok((guard, addr)) => {
                    return Stub {
                        _guard: guard,
                        bin,
                        data,
                        url: format!("https://{addr}"),
                        log,
                    }
                }
                Err(e) => last = format!("{e:#}"),
            }
        }
        panic!(
            "powernode-stub did not start (last: {last}); see {}",
            log.display()
        );
    }

    /// The server's data folder (admin token, CA).
    pub fn data(&self) -> &Path {
        &self.data
    }

    /// `https://127.0.0.1:PORT`, as the host reaches it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {}", self.url))
    }

    /// The server's stderr log.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The admin CLI with `--json`; `Err(stderr)` on a failed call.
    pub fn try_cli(&self, args: &[&str]) -> Result<Value, String> {
        stub_cli(&self.bin, &self.data, Some(&self.url), args).map_err(|e| format!("{e:#}"))
    }

    /// terminate-instance (`--force` when `force`: the node was not drained), then up
    /// to `timeout` for QEMU to exit by itself; panics with `context()` unless it did.
    /// Its exit status.
    pub fn terminate(
        &self,
        instance_id: &str,
        force: bool,
        vm: &mut Vm,
        timeout: Duration,
        context: &dyn Fn() -> String,
    ) -> ExitStatus {
        let mut args = vec!["terminate-instance", instance_id];
        if force {
            args.push("--force");
        }
        self.cli(&args);
        match vm.wait_timeout(timeout) {
            Ok(Some(status)) => status,
            other => panic!(
                "QEMU did not exit after terminate: {other:?}\n{}",
                context()
            ),
        }
    }

    /// The instance's signals, newest first (up to 200).
    pub fn signals(&self, instance_id: &str) -> Vec<Value> {
        self.cli(&[
            "recent-signals",
            "--instance",
            instance_id,
            "--limit",
            "200",
        ])["signals"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Runs the admin CLI with `--json` and parses its answer; panics on failure.
    pub fn cli(&self, args: &[&str]) -> Value {
        self.try_cli(args)
            .unwrap_or_else(|e| panic!("powernode-stub {args:?}: {e}"))
    }

    /// `publish-module` of an OCI layout or a root tree; returns the pinned manifest
    /// digest of the publication.
    pub fn publish_module(&self, source: &Path, name: &str, version: &str, kind: &str) -> String {
        let source = source.to_str().expect("a UTF-8 path");
        let p = self.cli(&[
            "publish-module",
            source,
            "--name",
            name,
            "--version",
            version,
            "--kind",
            kind,
        ]);
        p["publication"]["digest"]
            .as_str()
            .unwrap_or_else(|| panic!("no digest in {p}"))
            .to_string()
    }

    pub fn instance(&self, id: &str) -> Value {
        let v = self.cli(&["get-instance", id]);
        v.get("instance").cloned().unwrap_or(v)
    }

    /// create-node + provision-instance (recorder provider); the identity document
    /// the provider would hand the VM.
    pub fn provision(&self, hostname: &str) -> (String, Value) {
        self.provision_class(hostname, "ephemeral")
    }

    /// [`Stub::provision`] with a lifecycle class (`ephemeral`, `persistent`, `spot`).
    pub fn provision_class(&self, hostname: &str, class: &str) -> (String, Value) {
        let node = self.cli(&[
            "create-node",
            "--hostname",
            hostname,
            "--lifecycle-class",
            class,
        ]);
        let node_id = node["node"]["id"].as_str().expect("node id").to_string();
        let prov = self.cli(&["provision-instance", &node_id]);
        let instance_id = prov["instance"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no instance id in {prov}"))
            .to_string();
        let ident = self.cli(&["instance-identity", &instance_id]);
        let doc = match ident.get("identity") {
            Some(d) if d.is_object() => d.clone(),
            _ => ident,
        };
        (instance_id, doc)
    }
}

/// After [`Stub::terminate`]: the guest powered off cleanly (QEMU exit status 0).
pub fn assert_powered_off(exit: ExitStatus, context: &dyn Fn() -> String) {
    assert!(
        exit.success(),
        "QEMU did not power off cleanly after terminate: {exit}\n{}",
        context()
    );
}

/// One boot to `running` as the server saw it.
#[derive(Debug, Clone)]
pub struct ReadyRun {
    /// The server's `boot_timeline`: (phase, ms since kernel start).
    pub timeline: Vec<(String, u64)>,
    /// Wall time from QEMU start until get-instance said `running`.
    pub wall_to_running: Duration,
    /// Wall time from terminate-instance until QEMU exited (the agent powered off).
    pub wall_to_exit: Duration,
}

impl ReadyRun {
    pub fn at(&self, phase: &str) -> Option<u64> {
        self.timeline
            .iter()
            .find(|(p, _)| p == phase)
            .map(|(_, t)| *t)
    }
}

/// Provisions an instance, boots `spec` with its identity by fw_cfg, waits until
/// the server reports `running`, then terminates it and waits for QEMU to exit.
pub fn ready_run(
    stub: &Stub,
    spec: &powernode_qemu::VmSpec,
    hostname: &str,
    timeout: Duration,
) -> Result<ReadyRun, String> {
    let (instance_id, doc) = stub.provision(hostname);
    let mut spec = spec.clone();
    let dir = spec
        .serial_log
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let _ = std::fs::create_dir_all(&dir);
    super::with_identity(&mut spec, &dir, &doc.to_string());
    let mut vm = powernode_qemu::Vm::spawn(&spec).map_err(|e| e.to_string())?;
    let start = std::time::Instant::now();
    let running = loop {
        let inst = stub.instance(&instance_id);
        if inst["status"] == "running" {
            break inst;
        }
        if let Ok(Some(s)) = vm.try_wait() {
            return Err(format!(
                "QEMU exited ({s}); see {}",
                spec.serial_log.display()
            ));
        }
        if start.elapsed() > timeout {
            return Err(format!(
                "not running after {timeout:?}; see {}",
                spec.serial_log.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let wall_to_running = start.elapsed();
    let timeline = super::boot_timeline(&running);
    // Not drained: terminate must be forced.
    stub.cli(&["terminate-instance", &instance_id, "--force"]);
    let t = std::time::Instant::now();
    match vm.wait_timeout(Duration::from_secs(60)) {
        Ok(Some(_)) => {}
        other => return Err(format!("QEMU did not exit after terminate: {other:?}")),
    }
    Ok(ReadyRun {
        timeline,
        wall_to_running,
        wall_to_exit: t.elapsed(),
    })
}
