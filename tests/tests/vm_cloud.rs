//! VM tier: the published UEFI disk image (GPT + ESP + UKI, no `-kernel`) boots under
//! OVMF, with no fw_cfg identity and nothing on the command line but the failure
//! policy, and learns who it is from a mock cloud metadata service on the host's
//! loopback, reached from the guest at 169.254.169.254 through QEMU user networking
//! (`guestfwd`, on the link-local user network: libslirp forwards only addresses
//! inside its virtual network). It must reach `running` in a real `powernode-stub`;
//! everything asserted about the node comes from the server (get-instance), plus
//! what the mock saw the guest ask.
//!
//! Ignored unless built with `POWERNODE_VM_TESTS=1`. Files under
//! `target/vm-tests/<test>/`: `serial.log`, `qemu-command.sh`, `server.log`,
//! `metadata.log` (the mock's requests) and the disk image.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use powernode_initramfs::disk::{build_disk, DiskOptions};
use powernode_initramfs::stub::{ensure_stub, StubPin, DEFAULT_STUB_PIN};
use powernode_qemu::spec::HOST_FROM_GUEST_METADATA_NET;
use powernode_qemu::{ovmf_firmware, Accel, Device, Vm, VmSpec};
use powernode_tests::direct::stub::Stub;
use powernode_tests::direct::*;
use powernode_tests::workspace_root;
use serde_json::Value;

const TO_RUNNING: Duration = Duration::from_secs(180);
const TO_EXIT: Duration = Duration::from_secs(60);

/// One request the mock metadata service answered.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    status: u16,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

type Route = dyn Fn(&str, &str, &[(String, String)]) -> (u16, String) + Send + Sync;

/// A small HTTP/1.1 server on 127.0.0.1:0 answering like a provider's metadata
/// service. Keep-alive, one thread per connection: QEMU's `guestfwd` to a TCP
/// chardev is a single host connection carrying the guest's requests in turn.
struct MockMetadata {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
}

impl Drop for MockMetadata {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Method, path (with query), headers.
type Request = (String, String, Vec<(String, String)>);

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = Vec::new();
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            let (k, v) = (k.trim().to_string(), v.trim().to_string());
            if k.eq_ignore_ascii_case("content-length") {
                length = v.parse().unwrap_or(0);
            }
            headers.push((k, v));
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).ok()?;
    Some((method, path, headers))
}

impl MockMetadata {
    fn start(log: PathBuf, route: Box<Route>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the mock");
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let route: Arc<Route> = Arc::from(route);
        let (seen2, stop2) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (seen, route, log) = (seen2.clone(), route.clone(), log.clone());
                std::thread::spawn(move || {
                    let mut writer = conn.try_clone().unwrap();
                    let mut reader = BufReader::new(conn);
                    while let Some((method, path, headers)) = read_request(&mut reader) {
                        let (status, body) = route(&method, &path, &headers);
                        let reason = match status {
                            200 => "OK",
                            401 => "Unauthorized",
                            404 => "Not Found",
                            _ => "Error",
                        };
                        let resp = format!(
                            "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n\
                             Content-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if let Ok(mut f) = std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(&log)
                        {
                            let _ = writeln!(f, "{method} {path} {headers:?} -> {status}");
                        }
                        seen.lock().unwrap().push(Seen {
                            method,
                            path,
                            headers,
                            status,
                        });
                        if writer.write_all(resp.as_bytes()).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Self { port, seen, stop }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

const AWS_TOKEN: &str = "AQAEAMockTokenForPowernodeVmTests==";
const AWS_INSTANCE: &str = "i-0a1b2c3d4e5f60718";

/// AWS IMDSv2 as documented: a session token from `PUT /latest/api/token` (with the
/// TTL header), then every GET with `X-aws-ec2-metadata-token`; 401 without it. The
/// first token request gets a 503, as a metadata service still starting does: the
/// node, which knows from DMI that it is on EC2, must retry it.
fn aws_routes(user_data: String) -> Box<Route> {
    let first_token = AtomicBool::new(true);
    Box::new(move |method, path, headers| {
        let has = |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name));
        if path == "/latest/api/token" && first_token.swap(false, Ordering::SeqCst) {
            return (503, String::new());
        }
        if path == "/latest/api/token" {
            return match (method, has("x-aws-ec2-metadata-token-ttl-seconds")) {
                ("PUT", Some(_)) => (200, AWS_TOKEN.to_string()),
                ("PUT", None) => (400, String::new()),
                _ => (405, String::new()),
            };
        }
        if method != "GET"
            || has("x-aws-ec2-metadata-token").map(|(_, v)| v.as_str()) != Some(AWS_TOKEN)
        {
            return (401, String::new());
        }
        match path {
            "/latest/user-data" => (200, user_data.clone()),
            "/latest/meta-data/instance-id" => (200, AWS_INSTANCE.to_string()),
            "/latest/meta-data/placement/region" => (200, "eu-central-1".to_string()),
            "/latest/meta-data/placement/availability-zone" => (200, "eu-central-1b".to_string()),
            "/latest/meta-data/local-ipv4" => (200, "169.254.2.15".to_string()),
            _ => (404, String::new()),
        }
    })
}

const GCP_INSTANCE: &str = "4520031799277581759";

/// GCE's metadata server as documented: every request needs `Metadata-Flavor:
/// Google` (403 without, which is also what the other clouds' first requests get);
/// the identity in the `user-data` attribute (no `powernode-identity` attribute).
fn gcp_routes(user_data: String) -> Box<Route> {
    Box::new(move |method, path, headers| {
        let flavor = headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("metadata-flavor") && v == "Google");
        if !flavor {
            return (403, "Missing Metadata-Flavor:Google header.".to_string());
        }
        if method != "GET" {
            return (405, String::new());
        }
        let nics = r#"[{"ip":"169.254.2.15","accessConfigs":[{"externalIp":"34.76.1.2","type":"ONE_TO_ONE_NAT"}],"network":"projects/123456789/networks/default"}]"#;
        match path.strip_prefix("/computeMetadata/v1/").unwrap_or("") {
            "instance/id" => (200, GCP_INSTANCE.to_string()),
            "instance/attributes/user-data" => (200, user_data.clone()),
            "instance/zone" => (200, "projects/123456789/zones/europe-west1-b".to_string()),
            "instance/network-interfaces/?recursive=true" => (200, nics.to_string()),
            _ => (404, String::new()),
        }
    })
}

/// The disk image from the netboot folder `image_dir`, with `cmdline` baked into the
/// UKI, written to `out` (not recorded in the image's manifest).
fn disk_from(image_dir: &Path, out: &Path, cmdline: &[String]) -> PathBuf {
    let root = workspace_root();
    let cache = std::env::var("POWERNODE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("cache"));
    let pin = StubPin::parse(DEFAULT_STUB_PIN).unwrap();
    let stub = ensure_stub(&pin, &cache, &root.join("scripts/debs")).expect("the EFI stub");
    let m = build_disk(&DiskOptions {
        image_dir: image_dir.to_path_buf(),
        stub,
        extra_cmdline: cmdline.to_vec(),
        out: Some(out.to_path_buf()),
        min_mib: 0,
        record_in_manifest: false,
    })
    .expect("building the disk image");
    eprintln!(
        "disk image: {} bytes (UKI {} bytes), cmdline {} bytes",
        m.bytes,
        m.uki_bytes,
        m.cmdline.len()
    );
    out.to_path_buf()
}

const TEST_CMDLINE: &[&str] = &["powernode.on_failure=poweroff", "powernode.attempts=5"];

fn test_cmdline() -> Vec<String> {
    TEST_CMDLINE.iter().map(|s| s.to_string()).collect()
}

fn wait_running(stub: &Stub, id: &str, vm: &mut Vm) -> (Value, Duration) {
    let context = vm_context(vm, Some(stub.log()));
    let explain = || format!("instance: {}\n{}", stub.instance(id), context());
    let start = Instant::now();
    let inst = wait_until("status running", TO_RUNNING, vm, &explain, || {
        let inst = stub.instance(id);
        (inst["status"] == "running").then_some(inst)
    });
    (inst, start.elapsed())
}

/// Boots the disk image on OVMF with the metadata network to `running`, checks the
/// server's view, terminates. Returns the running instance.
fn boot_disk_with_metadata(
    test: &str,
    route: impl FnOnce(String) -> Box<Route>,
    smbios: Option<Device>,
    check: impl FnOnce(&Value, &[Seen]),
) -> Value {
    let dir = test_dir(test);
    let stub = Stub::start_reachable_at(&dir, HOST_FROM_GUEST_METADATA_NET);
    let (instance_id, doc) = stub.provision(&format!("{test}-1").replace('_', "-"));
    let mock = MockMetadata::start(dir.join("metadata.log"), route(doc.to_string()));
    let built = netboot(&dir);
    let disk = disk_from(
        built.vmlinuz.parent().unwrap(),
        &dir.join("disk.raw"),
        &test_cmdline(),
    );
    let firmware = ovmf_firmware(&dir).expect("OVMF (scripts/setup installs ovmf)");
    let mut spec = VmSpec::disk(firmware, &disk, dir.join("serial.log"));
    spec.devices[0] = Device::metadata_net("n0", mock.port);
    spec.devices.extend(smbios);
    spec.accel = Accel::detect_for_kernel(&spec.qemu, &dir.join("image/vmlinuz"));
    let mut vm = Vm::spawn(&spec).expect("spawn QEMU");
    let (running, wall) = wait_running(&stub, &instance_id, &mut vm);
    let tl = boot_timeline(&running);
    eprintln!(
        "{test}: running after {:.1} s wall (QEMU start), timeline {tl:?}",
        wall.as_secs_f64()
    );
    assert_eq!(running["status"], "running");
    check(&running, &mock.seen());
    assert_identity_found_after_network(&running);

    stub.terminate(&instance_id, true, &mut vm, TO_EXIT, &String::new);
    running
}

#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: set POWERNODE_VM_TESTS=1")]
fn uefi_disk_image_with_aws_imdsv2_reaches_running() {
    // EC2's DMI, so the node asks AWS patiently (and retries the 503).
    let ec2 = Device::SmbiosSystem {
        fields: vec![
            ("manufacturer".into(), "Amazon EC2".into()),
            ("product".into(), "t3.micro".into()),
        ],
    };
    boot_disk_with_metadata("cloud_aws", aws_routes, Some(ec2), |inst, seen| {
        assert_eq!(inst["identity_source"], "aws", "{inst}");
        let facts = &inst["provider_facts"];
        assert_eq!(facts["provider"], "aws", "{inst}");
        assert_eq!(facts["instance_id"], AWS_INSTANCE, "{inst}");
        assert_eq!(facts["region"], "eu-central-1", "{inst}");
        // IMDSv2: the token first, then user data with the token. (Providers probed
        // earlier in guess order, e.g. OpenStack's paths, were refused.)
        // Detected by DMI, AWS is the only provider asked: no guessing at others.
        assert!(
            seen.iter().all(|s| s.path.starts_with("/latest/")),
            "{seen:?}"
        );
        let tokens: Vec<u16> = seen
            .iter()
            .take_while(|s| s.path == "/latest/api/token")
            .map(|s| s.status)
            .collect();
        assert_eq!(tokens, [503, 200], "{seen:?}");
        assert!(seen[0].method == "PUT");
        assert!(seen[0]
            .header("x-aws-ec2-metadata-token-ttl-seconds")
            .is_some());
        let ud = seen
            .iter()
            .find(|s| s.path == "/latest/user-data")
            .expect("user data asked");
        assert_eq!(ud.header("x-aws-ec2-metadata-token"), Some(AWS_TOKEN));
        assert_eq!(ud.status, 200);
    });
}

#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: set POWERNODE_VM_TESTS=1")]
fn uefi_disk_image_with_gcp_metadata_reaches_running() {
    // QEMU's own DMI: nothing says GCE, so the node guesses (OpenStack and AWS are
    // refused with 403 first, as GCE refuses requests without its header).
    boot_disk_with_metadata("cloud_gcp", gcp_routes, None, |inst, seen| {
        assert_eq!(inst["identity_source"], "gcp", "{inst}");
        let facts = &inst["provider_facts"];
        assert_eq!(facts["provider"], "gcp", "{inst}");
        assert_eq!(facts["instance_id"], GCP_INSTANCE, "{inst}");
        assert_eq!(facts["region"], "europe-west1", "{inst}");
        assert_eq!(
            facts["addresses"],
            serde_json::json!(["169.254.2.15", "34.76.1.2"]),
            "{inst}"
        );
        let ud = seen
            .iter()
            .find(|s| s.path == "/computeMetadata/v1/instance/attributes/user-data")
            .expect("user data asked");
        assert_eq!(ud.header("metadata-flavor"), Some("Google"));
        assert_eq!(ud.status, 200);
    });
}

/// Figures: the same image booted direct-kernel (fw_cfg identity, as `real`
/// provisioning does) and as the UEFI disk under OVMF (identity baked into the UKI's
/// command line, so no metadata service is involved), each to `running` in one
/// server. Proves the disk boot path on its own and prints both times.
#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: set POWERNODE_VM_TESTS=1")]
fn uefi_disk_vs_direct_kernel_boot_to_running() {
    use base64::Engine as _;
    let dir = test_dir("cloud_figures");
    let stub = Stub::start(&dir);
    let built = netboot(&dir);

    let mut direct = spec(&dir.join("direct"), &built.vmlinuz, &built.initramfs);
    direct.kernel_args = test_cmdline();
    let d = powernode_tests::direct::stub::ready_run(&stub, &direct, "fig-direct", TO_RUNNING)
        .unwrap_or_else(|e| panic!("direct-kernel boot: {e}"));

    let (instance_id, doc) = stub.provision("fig-uefi");
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(doc.to_string());
    let mut cmdline = test_cmdline();
    cmdline.push(format!("powernode.identity={b64}"));
    cmdline.push("powernode.identity_source=cmdline".into());
    let uefi_dir = dir.join("uefi");
    std::fs::create_dir_all(&uefi_dir).unwrap();
    let disk = disk_from(
        built.vmlinuz.parent().unwrap(),
        &uefi_dir.join("disk.raw"),
        &cmdline,
    );
    let firmware = ovmf_firmware(&uefi_dir).expect("OVMF (scripts/setup installs ovmf)");
    let mut uefi = VmSpec::disk(firmware, &disk, uefi_dir.join("serial.log"));
    uefi.accel = direct.accel;
    let mut vm = Vm::spawn(&uefi).expect("spawn QEMU");
    let (running, wall) = wait_running(&stub, &instance_id, &mut vm);
    assert_eq!(running["identity_source"], "cmdline", "{running}");
    let tl = boot_timeline(&running);
    stub.terminate(&instance_id, true, &mut vm, TO_EXIT, &String::new);

    let ready = |tl: &[(String, u64)]| {
        tl.iter()
            .find(|(p, _)| p == "ready")
            .map(|(_, t)| *t)
            .unwrap_or(0)
    };
    let figures = serde_json::json!({
        "accel": format!("{:?}", direct.accel),
        "direct_kernel": {"wall_to_running_ms": d.wall_to_running.as_millis() as u64,
                          "kernel_to_ready_ms": ready(&d.timeline), "timeline": d.timeline},
        "uefi_disk": {"wall_to_running_ms": wall.as_millis() as u64,
                      "kernel_to_ready_ms": ready(&tl), "timeline": tl,
                      "disk_bytes": std::fs::metadata(&disk).unwrap().len()},
    });
    eprintln!("figures: {figures}");
    std::fs::write(dir.join("figures.json"), figures.to_string()).unwrap();
}
