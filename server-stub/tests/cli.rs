//! The binary as an operator uses it: `serve` as a child process on 127.0.0.1:0, the
//! runbook's client subcommands with `--json`, SIGTERM and SIGKILL restarts.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::process::{cli, cli_json, fake_image, ServerProc, BIN};
use common::FakeNode;
use powernode_proto::IdentityDocument;
use reqwest::StatusCode;
use serde_json::Value;

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

/// `provision-cluster`: N Nodes and their instances in one call, the cap of 50 and a
/// bad template refused before anything is made.
#[test]
fn provision_cluster_makes_nodes_and_instances_in_one_call() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _server = ServerProc::start(dir);
    let c = cli_json(
        dir,
        &[
            "provision-cluster",
            "--count",
            "3",
            "--hostname-prefix",
            "rack7",
            "--label",
            "rack=7",
        ],
    );
    assert!(c["error"].is_null(), "{c}");
    let members = c["members"].as_array().unwrap();
    assert_eq!(members.len(), 3, "{c}");
    for (i, m) in members.iter().enumerate() {
        assert_eq!(m["hostname"], format!("rack7-{}", i + 1));
        let node = cli_json(dir, &["get-node", m["node_id"].as_str().unwrap()]);
        assert_eq!(node["node"]["labels"]["rack"], "7", "{node}");
        assert_eq!(node["node"]["lifecycle_class"], "ephemeral", "{node}");
        assert_eq!(
            node["node"]["current_instance_id"], m["instance_id"],
            "{node}"
        );
        let task = cli_json(dir, &["get-task", m["task_id"].as_str().unwrap()]);
        assert_eq!(task["task"]["kind"], "provision", "{task}");
    }
    let nodes_before = cli_json(dir, &["list-nodes"])["nodes"]
        .as_array()
        .unwrap()
        .len();
    for (args, code, says) in [
        (vec!["--count", "51"], "bad_request", "1 to 50"),
        (vec!["--count", "0"], "bad_request", "1 to 50"),
        (
            vec!["--count", "2", "--template", "tmpl-nope"],
            "unknown_template",
            "tmpl-nope",
        ),
        (
            vec!["--count", "2", "--hostname-prefix", "bad name"],
            "bad_request",
            "hostname_prefix",
        ),
    ] {
        let mut all = vec!["provision-cluster"];
        all.extend(args);
        let e = cli_err(dir, &all);
        assert_eq!(e["error"]["code"], code, "{all:?}: {e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(says),
            "{all:?}: {e}"
        );
    }
    let nodes_after = cli_json(dir, &["list-nodes"])["nodes"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(nodes_before, nodes_after, "a refused call made nothing");
}
