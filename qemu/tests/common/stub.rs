//! A real `powernode-stub` for the VM tests and the benchmark: started on the host
//! loopback with the URL the guest uses (10.0.2.2), driven through its admin CLI,
//! killed by its own pid on drop.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::{target_dir, workspace_root};

/// Builds the host `powernode-stub` (debug profile) and returns its path;
/// `POWERNODE_STUB_BIN` points at a prebuilt one instead.
pub fn stub_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("POWERNODE_STUB_BIN") {
        return PathBuf::from(bin);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace_root())
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
    child: Child,
    bin: PathBuf,
    data: PathBuf,
    url: String,
}

impl Drop for Stub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago: the guest must be told the server's URL
/// (`--public-url`, put into identity documents) before the server starts.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

impl Stub {
    pub fn start(dir: &Path) -> Stub {
        Self::start_reachable_at(dir, "10.0.2.2")
    }

    /// [`Stub::start`] for guests that reach the host at `guest_host` (e.g.
    /// 169.254.2.2 on the metadata network of `Device::metadata_net`).
    pub fn start_reachable_at(dir: &Path, guest_host: &str) -> Stub {
        let bin = stub_binary();
        let data = dir.join("server-data");
        let mut last = String::new();
        // The free port may be taken between probe and bind: try a few.
        for _ in 0..5 {
            let port = free_port();
            let log = std::fs::File::create(dir.join("server.log")).unwrap();
            let mut child = Command::new(&bin)
                .arg("serve")
                .arg("--data")
                .arg(&data)
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--public-url", &format!("https://{guest_host}:{port}")])
                .args(["--heartbeat-interval-seconds", "2"])
                .args(["--provider", "recorder"])
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(log)
                .spawn()
                .expect("spawn powernode-stub");
            let stdout = child.stdout.take().unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stdout);
                let mut line = String::new();
                let _ = reader.read_line(&mut line);
                let _ = tx.send(line);
                let mut sink = Vec::new();
                let _ = reader.read_to_end(&mut sink);
            });
            let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
            let listening = serde_json::from_str::<Value>(line.trim())
                .ok()
                .and_then(|v| v["listening"].as_str().map(str::to_string));
            match listening {
                Some(addr) => {
                    return Stub {
                        child,
                        bin,
                        data,
                        url: format!("https://{addr}"),
                    }
                }
                None => {
                    last = line;
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        panic!(
            "powernode-stub did not start (last stdout {last:?}); see {}",
            dir.join("server.log").display()
        );
    }

    /// Runs the admin CLI with `--json` and parses its answer.
    pub fn cli(&self, args: &[&str]) -> Value {
        let out = Command::new(&self.bin)
            .args(args)
            .arg("--data")
            .arg(&self.data)
            .args(["--server", &self.url, "--json"])
            .stdin(Stdio::null())
            .output()
            .expect("run powernode-stub CLI");
        assert!(
            out.status.success(),
            "powernode-stub {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "powernode-stub {args:?} printed non-JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
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
    let timeline = running["boot_timeline"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["phase"].as_str().unwrap_or("").to_string(),
                        e["at_ms"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
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
