//! The binary as an operator uses it: `serve` as a child process on 127.0.0.1:0, the
//! runbook's client subcommands with `--json`, SIGTERM and SIGKILL restarts.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::process::{cli, ServerProc, BIN};
use common::FakeNode;
use powernode_proto::IdentityDocument;
use reqwest::StatusCode;
use serde_json::Value;

fn cli_json(dir: &Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (ok, out, err) = cli(dir, &all);
    assert!(ok, "{args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|_| panic!("{args:?} printed {out:?}"))
}

fn cli_err(dir: &Path, args: &[&str]) -> Value {
    let (ok, _out, err) = cli(dir, args);
    assert!(!ok, "{args:?} should fail");
    serde_json::from_str(err.trim()).unwrap_or_else(|_| panic!("{args:?} stderr {err:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runbook_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut server = ServerProc::start(dir);
    assert!(server.addr.starts_with("127.0.0.1:"));
    let url = std::fs::read_to_string(dir.join("server-url")).unwrap();
    assert_eq!(url.trim(), format!("https://{}", server.addr));
    let mode = std::fs::metadata(dir.join("admin-token")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    let t = cli_json(dir, &["list-templates"]);
    assert_eq!(t["templates"][0]["id"], "tmpl-edge-base");
    assert_eq!(t["regions"][0], "region-local-qemu");
    let ids: Vec<&str> = t["instance_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["type-qemu-1cpu-512mb", "type-qemu-2cpu-4gb"]);

    let n = cli_json(
        dir,
        &[
            "create-node",
            "--hostname",
            "cli-1",
            "--lifecycle-class",
            "persistent",
            "--label",
            "site=lab",
        ],
    );
    let node = n["node"]["id"].as_str().unwrap().to_string();
    assert_eq!(n["node"]["hostname"], "cli-1");
    assert_eq!(n["node"]["status"], "no_instance");
    assert_eq!(n["node"]["labels"]["site"], "lab");

    let p = cli_json(dir, &["provision-instance", &node]);
    let inst = p["instance"]["id"].as_str().unwrap().to_string();
    assert_eq!(p["instance"]["status"], "provisioning");
    let g = cli_json(dir, &["get-instance", &inst]);
    assert_eq!(g["instance"]["id"], inst.as_str());
    assert_eq!(g["instance"]["task_id"], p["task_id"]);
    let task = cli_json(dir, &["get-task", p["task_id"].as_str().unwrap()]);
    assert_eq!(task["task"]["kind"], "provision");

    // The identity document prints bare, ready for `powernode-agent run --identity`.
    let (ok, doc_text, _) = cli(dir, &["instance-identity", &inst]);
    assert!(ok);
    let doc = IdentityDocument::parse(doc_text.as_bytes()).unwrap();
    assert_eq!(doc.instance_id, inst);
    assert_eq!(doc.control_plane_url, url.trim());

    let e = cli_err(dir, &["update-node", &node, "--lifecycle-class", "spot"]);
    assert_eq!(e["error"]["code"], "lifecycle_class_immutable");

    let mut fake = FakeNode::new(doc.clone(), url.trim());
    fake.enroll().await;
    let (s, _) = fake.heartbeat("ready").await;
    assert_eq!(s, StatusCode::OK);
    let g = cli_json(dir, &["get-instance", &inst]);
    assert_eq!(g["instance"]["status"], "running");
    assert!(g["instance"]["last_heartbeat_at"].is_string());

    let d = cli_json(dir, &["drift-report", &inst]);
    assert_eq!(d["drift"], false);
    assert_eq!(d["instance_id"], inst.as_str());

    // Killed without warning: everything the API confirmed is still there, and the
    // node carries on with its certificate.
    let status = server.signal("-KILL");
    assert!(!status.success());
    let server2 = ServerProc::start(dir);
    let g = cli_json(dir, &["get-instance", &inst]);
    assert_eq!(g["instance"]["status"], "running");
    fake.base = format!("https://{}", server2.addr);
    let (s, v) = fake.heartbeat("ready").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let mut server = server2;

    let e = cli_err(dir, &["terminate-instance", &inst]);
    assert_eq!(e["error"]["code"], "invalid_transition");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("drain first or use --force"));
    let dr = cli_json(dir, &["drain-instance", &inst, "--timeout-seconds", "30"]);
    assert_eq!(dr["status"], "draining");
    assert!(dr["task_id"].is_string());
    let c = cli_json(dir, &["cancel-task", dr["task_id"].as_str().unwrap()]);
    assert_eq!(c["task"]["status"], "cancelled");
    assert_eq!(
        cli_json(dir, &["get-node", &node])["node"]["status"],
        "running"
    );
    let tr = cli_json(dir, &["terminate-instance", &inst, "--force"]);
    assert_eq!(tr["status"], "terminated");
    let (s, v) = fake.heartbeat("ready").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("certificate_revoked"))
    );

    let ev = cli_json(dir, &["recent-events", "--limit", "5", "--instance", &inst]);
    assert_eq!(ev["events"].as_array().unwrap().len(), 5);
    let sig = cli_json(dir, &["recent-signals"]);
    assert!(sig["signals"].is_array());

    // Readable tables without --json.
    let (ok, table, _) = cli(dir, &["get-node", &node]);
    assert!(ok);
    assert!(
        table.contains("no_instance") && table.contains("cli-1"),
        "{table}"
    );
    let (ok, table, _) = cli(dir, &["recent-events", "--limit", "3"]);
    assert!(ok);
    assert!(table.contains("KIND"), "{table}");

    let del = cli_json(dir, &["delete-node", &node]);
    assert_eq!(del["deleted"], true);
    let e = cli_err(dir, &["get-node", &node]);
    assert_eq!(e["error"]["code"], "not_found");

    // A clean stop on SIGTERM, and a wrong admin token is refused.
    assert!(server.signal("-TERM").success());
    let _server3 = ServerProc::start(dir);
    std::fs::write(dir.join("admin-token"), "wrong\n").unwrap();
    let e = cli_err(dir, &["list-templates"]);
    assert_eq!(e["error"]["code"], "admin_token_invalid");
}

/// A folder shaped like `powernode-initramfs build` output, with a kernel QEMU
/// cannot load (so a VM "boots" and exits at once, without a real image).
fn fake_image(dir: &Path) {
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

#[test]
fn real_mode_without_a_published_image_is_missing_netboot_image_error() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let images_arg = images.to_str().unwrap();
    let _server = ServerProc::start_with(tmp.path(), "real", &["--image-base", images_arg]);
    let node = cli_json(
        tmp.path(),
        &[
            "create-node",
            "--hostname",
            "edge-real",
            "--lifecycle-class",
            "ephemeral",
        ],
    );
    let node_id = node["node"]["id"].as_str().unwrap();
    let (ok, _, err) = cli(tmp.path(), &["provision-instance", node_id, "--json"]);
    assert!(!ok);
    let e: Value = serde_json::from_str(err.trim()).unwrap();
    assert_eq!(e["error"]["code"], "missing_netboot_image_error", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("manifest.json"),
        "the answer says why the folder is not an image: {e}"
    );
    // Refused before anything was created.
    let node = cli_json(tmp.path(), &["get-node", node_id]);
    assert_eq!(node["node"]["status"], "no_instance", "{node}");
    let pubs = cli_json(tmp.path(), &["list-disk-image-publications"]);
    assert_eq!(pubs["publications"], serde_json::json!([]));
}

#[test]
fn published_image_boots_and_a_vm_that_exits_fails_the_instance() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let images_arg = images.to_str().unwrap();
    let _server = ServerProc::start_with(tmp.path(), "real", &["--image-base", images_arg]);
    fake_image(&images);
    let p = cli_json(tmp.path(), &["publish-disk-image"]);
    assert_eq!(p["publication"]["platform"], "powernode-netboot");
    assert_eq!(p["publication"]["arch"], "arch-amd64");
    assert_eq!(p["publication"]["kernel_version"], "6.12.0-1");
    // Publishing the same folder again records nothing new.
    let again = cli_json(tmp.path(), &["publish-disk-image"]);
    assert_eq!(again["publication"]["id"], p["publication"]["id"]);
    let pubs = cli_json(tmp.path(), &["list-disk-image-publications"]);
    assert_eq!(pubs["publications"].as_array().unwrap().len(), 1, "{pubs}");

    let node = cli_json(
        tmp.path(),
        &[
            "create-node",
            "--hostname",
            "edge-real",
            "--lifecycle-class",
            "ephemeral",
        ],
    );
    let node_id = node["node"]["id"].as_str().unwrap();
    let prov = cli_json(tmp.path(), &["provision-instance", node_id]);
    let inst = prov["instance"]["id"].as_str().unwrap().to_string();
    let dir = images.join("instances").join(&inst);
    let mode = std::fs::metadata(dir.join("identity.json"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let identity: Value =
        serde_json::from_slice(&std::fs::read(dir.join("identity.json")).unwrap()).unwrap();
    assert!(
        identity["control_plane_url"]
            .as_str()
            .unwrap()
            .starts_with("https://10.0.2.2:"),
        "{identity}"
    );
    let command = std::fs::read_to_string(dir.join("qemu-command.sh")).unwrap();
    assert!(command.contains("-kernel"), "{command}");
    assert!(
        command.contains("name=opt/org.powernode/identity"),
        "{command}"
    );
    // QEMU cannot load the fake kernel and exits: the server notices.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let failed = loop {
        let i = cli_json(tmp.path(), &["get-instance", &inst]);
        if i["instance"]["status"] == "failed" {
            break i;
        }
        assert!(std::time::Instant::now() < deadline, "never failed: {i}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let msg = failed["instance"]["failure"]["message"].as_str().unwrap();
    assert!(msg.contains("exited on its own"), "{failed}");
    let events = cli_json(tmp.path(), &["recent-events", "--instance", &inst]);
    assert!(
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "vm.exited"),
        "{events}"
    );
    // A failed instance terminates without force; there is no VM left to kill.
    let t = cli_json(tmp.path(), &["terminate-instance", &inst]);
    assert_eq!(t["status"], "terminated");
}

/// Whether `pid` is alive (not a zombie).
fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn vm_pid(dir: &Path, inst: &str) -> u64 {
    let events = cli_json(dir, &["recent-events", "--instance", inst]);
    events["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "provider.provision")
        .and_then(|e| e["detail"]["pid"].as_u64())
        .unwrap_or_else(|| panic!("no VM pid in {events}"))
}

/// `real` with a stand-in QEMU (a shell loop named qemu-system-x86_64, first on the
/// server's PATH): the persist disk is made, terminate kills the VM, a clean stop kills
/// it, and after a SIGKILL the restarted server kills the orphan and fails the instance.
/// The test's own guard kills the VMs of a server it drops.
#[test]
fn real_provider_vms_live_and_die_with_the_server() {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    fake_image(&images);
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let fake = bin.join("qemu-system-x86_64");
    std::fs::write(&fake, "#!/bin/sh\nwhile :; do sleep 1; done\n").unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let env = [
        (
            "PATH",
            format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
        ),
        ("POWERNODE_ACCEL", "tcg".to_string()),
    ];
    let images_arg = images.to_str().unwrap();
    let data = tmp.path().join("data");
    let start = || ServerProc::start_env(&data, "real", &["--image-base", images_arg], &env);
    let provision = |hostname: &str, class: &str| {
        let node = cli_json(
            &data,
            &[
                "create-node",
                "--hostname",
                hostname,
                "--lifecycle-class",
                class,
            ],
        );
        let node_id = node["node"]["id"].as_str().unwrap().to_string();
        let prov = cli_json(&data, &["provision-instance", &node_id]);
        let inst = prov["instance"]["id"].as_str().unwrap().to_string();
        (inst.clone(), vm_pid(&data, &inst))
    };
    let status = |inst: &str| cli_json(&data, &["get-instance", inst])["instance"].clone();

    let mut server = start();
    // Persistent: a /persist disk, and terminate kills the VM by its pid.
    let (p_inst, p_pid) = provision("edge-p", "persistent");
    assert!(alive(p_pid));
    let disk = images.join("instances").join(&p_inst).join("persist.img");
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 1024 << 20);
    let cmd = std::fs::read_to_string(disk.with_file_name("qemu-command.sh")).unwrap();
    assert!(cmd.contains("-m 512 -smp 1"), "{cmd}");
    assert!(cmd.contains("id=persist"), "{cmd}");
    let t = cli_json(&data, &["terminate-instance", &p_inst]);
    assert_eq!(t["status"], "terminated");
    assert!(!alive(p_pid), "terminate left the VM running");

    // A clean stop kills the VM; the restarted server fails its instance.
    let (e_inst, e_pid) = provision("edge-e", "ephemeral");
    assert!(alive(e_pid));
    assert_eq!(status(&e_inst)["status"], "provisioning");
    assert!(server.signal("-TERM").success());
    wait_until("VM killed by the clean stop", 10, || !alive(e_pid));
    server = start();
    let i = status(&e_inst);
    assert_eq!(i["status"], "failed", "{i}");
    let msg = i["failure"]["message"].as_str().unwrap();
    assert!(
        msg.contains("restarted") && msg.contains("is gone"),
        "{msg}"
    );

    // After a SIGKILL the VM is an orphan: the restarted server kills it.
    let node_id = cli_json(&data, &["get-instance", &e_inst])["instance"]["node_id"]
        .as_str()
        .unwrap()
        .to_string();
    cli_json(&data, &["terminate-instance", &e_inst]);
    let prov = cli_json(&data, &["provision-instance", &node_id]);
    let k_inst = prov["instance"]["id"].as_str().unwrap().to_string();
    let k_pid = vm_pid(&data, &k_inst);
    assert!(alive(k_pid));
    server.signal("-KILL");
    assert!(alive(k_pid), "a SIGKILLed server cannot take its VM along");
    let server = start();
    wait_until("orphan killed", 10, || !alive(k_pid));
    let i = status(&k_inst);
    assert_eq!(i["status"], "failed", "{i}");
    assert!(
        i["failure"]["message"]
            .as_str()
            .unwrap()
            .contains("has been killed"),
        "{i}"
    );

    // The test guard's promise: a dropped server takes its VMs along (SIGKILL, so
    // the server cannot), also one a SIGKILL of the server left running.
    let (_, d_pid) = provision("edge-d", "ephemeral");
    drop(server);
    assert!(!alive(d_pid), "a VM outlived its dropped server");
    let mut server = start();
    let (_, o_pid) = provision("edge-o", "ephemeral");
    server.signal("-KILL");
    assert!(alive(o_pid));
    drop(server);
    assert!(
        !alive(o_pid),
        "a VM outlived its SIGKILLed and dropped server"
    );
}

#[test]
fn public_url_goes_into_identity_documents_and_bad_ones_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--public-url",
            "http://10.0.2.2:1",
            "--data",
        ])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("https://"));

    let server = ServerProc::start_with(
        tmp.path(),
        "recorder",
        &[
            "--public-url",
            "https://10.0.2.2:8443/",
            "--san",
            "cp.example.test",
        ],
    );
    let dir = tmp.path();
    let n = cli_json(
        dir,
        &[
            "create-node",
            "--hostname",
            "qemu-1",
            "--lifecycle-class",
            "spot",
        ],
    );
    let p = cli_json(
        dir,
        &["provision-instance", n["node"]["id"].as_str().unwrap()],
    );
    let doc = cli_json(
        dir,
        &["instance-identity", p["instance"]["id"].as_str().unwrap()],
    );
    assert_eq!(doc["control_plane_url"], "https://10.0.2.2:8443");
    // The server certificate names the public host and the extra SAN.
    let (ok, _, _) = cli(
        dir,
        &[
            "--server",
            &server.addr.replace("127.0.0.1", "https://localhost"),
            "list-templates",
        ],
    );
    assert!(ok, "localhost is a SAN");
}

/// The runtime commands through the binary: reboot-instance, collect-diagnostics,
/// update-modules, get-task with the result, cancel-task, attribute-failure (JSON and
/// table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_task_and_attribution_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let server = ServerProc::start(dir);
    let n = cli_json(
        dir,
        &[
            "create-node",
            "--hostname",
            "cli-rt",
            "--lifecycle-class",
            "ephemeral",
        ],
    );
    let node = n["node"]["id"].as_str().unwrap().to_string();
    let p = cli_json(dir, &["provision-instance", &node]);
    let inst = p["instance"]["id"].as_str().unwrap().to_string();
    // Not running yet: refused with the reason.
    let e = cli_err(dir, &["reboot-instance", &inst]);
    assert_eq!(e["error"]["code"], "invalid_transition");
    let doc = IdentityDocument::from_value(cli_json(dir, &["instance-identity", &inst])).unwrap();
    let mut fake = FakeNode::new(doc, &format!("https://{}", server.addr));
    fake.enroll().await;
    let (s, _) = fake.heartbeat("ready").await;
    assert_eq!(s, StatusCode::OK);

    let r = cli_json(dir, &["reboot-instance", &inst, "--reason", "kernel"]);
    let reboot = r["task_id"].as_str().unwrap().to_string();
    let t = cli_json(dir, &["get-task", &reboot]);
    assert_eq!(
        (&t["task"]["kind"], &t["task"]["params"]["reason"]),
        (&Value::from("reboot"), &Value::from("kernel"))
    );
    let c = cli_json(dir, &["cancel-task", &reboot]);
    assert_eq!(c["task"]["status"], "cancelled");
    let e = cli_err(dir, &["cancel-task", &reboot]);
    assert_eq!(e["error"]["code"], "invalid_transition");

    let d = cli_json(dir, &["collect-diagnostics", &inst, "--log-lines", "5"]);
    let diag = d["task_id"].as_str().unwrap().to_string();
    let (s, v) = fake
        .post(
            powernode_proto::paths::TASK_LEASE,
            serde_json::json!({"instance_id": fake.doc.instance_id, "lease_seconds": 30}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["task"]["params"]["log_lines"], 5);
    let (s, _) = fake
        .post(
            &powernode_proto::paths::task_complete(&diag),
            serde_json::json!({"instance_id": fake.doc.instance_id,
                "lease_token": v["task"]["lease_token"], "status": "succeeded",
                "result": {"versions": {"agent": "test-0.1"}}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let t = cli_json(dir, &["get-task", &diag]);
    assert_eq!(t["task"]["result"]["versions"]["agent"], "test-0.1");
    let u = cli_json(dir, &["update-modules", &inst]);
    assert_eq!(u["status"], "running");

    let a = cli_json(dir, &["attribute-failure", &inst, "--lookback-hours", "3"]);
    assert_eq!(a["lookback_hours"], 3);
    assert_eq!(a["failure"]["source"], "none");
    let (ok, table, err) = cli(dir, &["attribute-failure", &inst, "--lookback-hours", "3"]);
    assert!(ok, "{err}");
    assert!(
        table.contains(&format!("instance {inst}: running")),
        "{table}"
    );
    // Nothing failed yet: the window ends now and holds the tasks just made.
    assert!(
        table.contains("RANK")
            && table.contains("module_update_task")
            && table.contains("reboot_task"),
        "{table}"
    );
    assert!(
        table.contains("reboot task"),
        "reasoning printed in full: {table}"
    );
}

/// `powernode-stub ... | head` where the reader is gone before the answer: the
/// command ends quietly with SIGPIPE's status, no panic and no backtrace.
#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let _server = ServerProc::start(tmp.path());
    for args in [&["list-nodes"][..], &["list-nodes", "--json"][..]] {
        let mut child = Command::new(BIN)
            .arg("--data")
            .arg(tmp.path())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The read end closes before the command has its answer to write.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}

/// `real` with a stand-in QEMU that "reboots" (exits 0, as QEMU under `-no-reboot`
/// does when the guest reboots) once a flag file appears: after the node leased a
/// `reboot` task the provider starts the VM again and the instance lives on; the same
/// clean exit with no reboot asked for fails the instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_reboot_under_the_real_provider_starts_the_vm_again() {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    fake_image(&images);
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let flag = tmp.path().join("reboot-now");
    let fake = bin.join("qemu-system-x86_64");
    std::fs::write(
        &fake,
        "#!/bin/sh\nwhile [ ! -e \"$POWERNODE_TEST_FLAG\" ]; do sleep 0.1; done\nrm -f \"$POWERNODE_TEST_FLAG\"\nexit 0\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let env = [
        (
            "PATH",
            format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
        ),
        ("POWERNODE_ACCEL", "tcg".to_string()),
        ("POWERNODE_TEST_FLAG", flag.to_string_lossy().into_owned()),
    ];
    let data = tmp.path().join("data");
    let server = ServerProc::start_env(
        &data,
        "real",
        &["--image-base", images.to_str().unwrap()],
        &env,
    );
    let provision = |hostname: &str| {
        let node = cli_json(
            &data,
            &[
                "create-node",
                "--hostname",
                hostname,
                "--lifecycle-class",
                "persistent",
            ],
        );
        let node_id = node["node"]["id"].as_str().unwrap().to_string();
        let prov = cli_json(&data, &["provision-instance", &node_id]);
        prov["instance"]["id"].as_str().unwrap().to_string()
    };
    let starts = |inst: &str| -> Vec<Value> {
        cli_json(&data, &["recent-events", "--instance", inst])["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "provider.provision")
            .cloned()
            .collect()
    };
    let status = |inst: &str| cli_json(&data, &["get-instance", inst])["instance"].clone();

    let inst = provision("edge-reboot");
    let (ok, doc_text, _) = cli(&data, &["instance-identity", &inst]);
    assert!(ok);
    let doc = IdentityDocument::parse(doc_text.as_bytes()).unwrap();
    let mut node = FakeNode::new(doc, &format!("https://{}", server.addr));
    node.enroll().await;
    let (s, _) = node.heartbeat("ready").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(status(&inst)["status"], "running");
    let first = starts(&inst)[0]["detail"]["pid"].as_u64().unwrap();

    cli_json(&data, &["reboot-instance", &inst]);
    let (s, v) = node
        .post(
            powernode_proto::paths::TASK_LEASE,
            serde_json::json!({"instance_id": node.doc.instance_id, "lease_seconds": 30}),
        )
        .await;
    assert_eq!(
        (s, v["task"]["kind"].as_str()),
        (StatusCode::OK, Some("reboot")),
        "{v}"
    );
    std::fs::write(&flag, b"").unwrap();
    wait_until("the VM started again", 20, || starts(&inst).len() == 2);
    let again = &starts(&inst)[0];
    assert_eq!(again["detail"]["reboot"], true, "{again}");
    let second = again["detail"]["pid"].as_u64().unwrap();
    assert_ne!(second, first);
    assert!(alive(second));
    let i = status(&inst);
    assert_eq!(i["status"], "running", "{i}");
    let exited = cli_json(&data, &["recent-events", "--instance", &inst])["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "vm.exited")
        .cloned()
        .unwrap();
    assert_eq!(exited["detail"]["reboot"], true, "{exited}");

    // No reboot asked for now (the one above was used up): the same clean exit fails it.
    std::fs::write(&flag, b"").unwrap();
    wait_until("the instance failed", 20, || {
        status(&inst)["status"] == "failed"
    });
    let msg = status(&inst)["failure"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.contains("exited on its own"), "{msg}");
    assert_eq!(starts(&inst).len(), 2);
}
