//! Sensors (silence, stuck states, drift, lease expiry) and task cancellation,
//! driven with the server's test clock instead of real minutes.

mod common;

use common::{code, csr, FakeNode, TestServer};
use powernode_proto::paths;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

async fn signals(ts: &TestServer, inst: &str) -> Vec<Value> {
    let v = ts
        .ok(
            Method::GET,
            &format!("{}?limit=100&instance_id={inst}", paths::ADMIN_SIGNALS),
            None,
        )
        .await;
    v["signals"].as_array().unwrap().clone()
}

fn find<'a>(sigs: &'a [Value], kind: &str) -> Option<&'a Value> {
    sigs.iter().find(|s| s["kind"] == kind)
}

async fn running(ts: &TestServer, host: &str) -> (String, String, FakeNode) {
    let (node, inst, doc) = ts.provisioned(host).await;
    let mut fake = FakeNode::new(doc, &ts.url());
    fake.enroll().await;
    let (s, v) = fake.heartbeat("ready").await;
    assert_eq!(
        (s, v["instance_status"].as_str()),
        (StatusCode::OK, Some("running"))
    );
    (node, inst, fake)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_instance_is_signalled_and_cleared() {
    let ts = TestServer::start().await;
    let (_, inst, fake) = running(&ts, "edge-s").await;
    ts.state().sense().await.unwrap();
    assert!(find(&signals(&ts, &inst).await, "instance.silent").is_none());

    ts.clock.advance_secs(301);
    ts.state().sense().await.unwrap();
    let sigs = signals(&ts, &inst).await;
    let silent = find(&sigs, "instance.silent").expect("instance.silent");
    assert_eq!(silent["active"], true);
    let stuck = find(&sigs, "instance.stuck").expect("instance.stuck");
    assert_eq!(stuck["detail"]["reason"], "running_without_heartbeat");
    let i = ts
        .ok(Method::GET, &paths::admin_instance(&inst), None)
        .await;
    assert_eq!(
        i["instance"]["stuck"]["reason"],
        "running_without_heartbeat"
    );
    assert_eq!(i["instance"]["stuck"]["threshold_seconds"], 300);
    assert!(i["instance"]["stuck"]["recovery"]
        .as_str()
        .unwrap()
        .contains("terminate-instance"));
    // A second pass does not fire again.
    ts.state().sense().await.unwrap();
    let again = signals(&ts, &inst).await;
    assert_eq!(
        again
            .iter()
            .filter(|s| s["kind"] == "instance.silent")
            .count(),
        1
    );

    let (s, _) = fake.heartbeat("ready").await;
    assert_eq!(s, StatusCode::OK);
    ts.state().sense().await.unwrap();
    let sigs = signals(&ts, &inst).await;
    assert_eq!(
        find(&sigs, "instance.silent_cleared").unwrap()["active"],
        false
    );
    assert_eq!(find(&sigs, "instance.silent").unwrap()["active"], false);
    assert_eq!(find(&sigs, "instance.stuck").unwrap()["active"], false);
    let i = ts
        .ok(Method::GET, &paths::admin_instance(&inst), None)
        .await;
    assert!(i["instance"].get("stuck").is_none());
    let ev = ts
        .ok(
            Method::GET,
            &format!("{}?instance_id={inst}", paths::ADMIN_EVENTS),
            None,
        )
        .await;
    assert!(ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["kind"] == "instance.silent"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_provisioning_then_cancel_and_provision_again() {
    let ts = TestServer::start().await;
    let (node, inst, doc) = ts.provisioned("edge-p").await;
    ts.clock.advance_secs(601);
    ts.state().sense().await.unwrap();
    let i = ts
        .ok(Method::GET, &paths::admin_instance(&inst), None)
        .await;
    let stuck = &i["instance"]["stuck"];
    assert_eq!(stuck["reason"], "provisioning_too_long");
    assert_eq!(stuck["status"], "provisioning");
    assert!(stuck["for_seconds"].as_u64().unwrap() >= 601);
    let task = i["instance"]["task_id"].as_str().unwrap().to_string();
    assert!(stuck["recovery"]
        .as_str()
        .unwrap()
        .contains(&format!("cancel-task {task}")));
    assert_eq!(
        find(&signals(&ts, &inst).await, "instance.stuck").unwrap()["active"],
        true
    );

    // Recovery: cancel the provision task -> failed, credentials withdrawn.
    let v = ts
        .ok(
            Method::POST,
            &paths::admin_cancel_task(&task),
            Some(json!({})),
        )
        .await;
    assert_eq!(v["task"]["status"], "cancelled");
    let i = ts
        .ok(Method::GET, &paths::admin_instance(&inst), None)
        .await;
    assert_eq!(i["instance"]["status"], "failed");
    assert_eq!(i["instance"]["failure"]["code"], "task_cancelled");
    let fake = FakeNode::new(doc.clone(), &ts.url());
    let (s, v) = fake
        .post(
            paths::ENROLLMENT,
            fake.enrollment_body(&doc.bootstrap_token, &csr(&inst).1),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNAUTHORIZED, "bootstrap_token_expired")
    );
    ts.state().sense().await.unwrap();
    assert_eq!(
        find(&signals(&ts, &inst).await, "instance.stuck").unwrap()["active"],
        false
    );
    let n = ts.ok(Method::GET, &paths::admin_node(&node), None).await;
    assert_eq!(n["node"]["status"], "no_instance");
    let v = ts
        .ok(
            Method::POST,
            &paths::admin_provision(&node),
            Some(json!({})),
        )
        .await;
    assert_eq!(v["instance"]["status"], "provisioning");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lease_requeues_and_cancel_reaches_the_worker() {
    let ts = TestServer::start().await;
    let (_, inst, fake) = running(&ts, "edge-l").await;
    let v = ts
        .ok(
            Method::POST,
            &paths::admin_drain(&inst),
            Some(json!({"cordon_only": true})),
        )
        .await;
    let task = v["task_id"].as_str().unwrap().to_string();
    let lease = |secs: u64| {
        fake.post(
            paths::TASK_LEASE,
            json!({"instance_id": inst, "lease_seconds": secs}),
        )
    };
    let (_, l1) = lease(5).await;
    let token1 = l1["task"]["lease_token"].as_str().unwrap().to_string();
    assert_eq!(l1["task"]["params"]["cordon_only"], true);

    ts.clock.advance_secs(10);
    ts.state().sense().await.unwrap();
    let t = ts.ok(Method::GET, &paths::admin_task(&task), None).await;
    assert_eq!(t["task"]["status"], "pending");
    assert_eq!(t["task"]["attempts"], 1);
    let (s, v) = fake
        .post(
            &paths::task_renew(&task),
            json!({"instance_id": inst, "lease_token": token1, "lease_seconds": 5}),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "lease_expired"));

    let (_, l2) = lease(30).await;
    assert_eq!(l2["task"]["task_id"], task.as_str());
    let token2 = l2["task"]["lease_token"].as_str().unwrap().to_string();
    let t = ts.ok(Method::GET, &paths::admin_task(&task), None).await;
    assert_eq!(
        (t["task"]["status"].as_str(), t["task"]["attempts"].as_u64()),
        (Some("running"), Some(2))
    );

    // The operator cancels the drain: the instance is uncordoned, the worker told.
    let v = ts
        .ok(
            Method::POST,
            &paths::admin_cancel_task(&task),
            Some(json!({})),
        )
        .await;
    assert_eq!(v["task"]["status"], "cancelled");
    let i = ts
        .ok(Method::GET, &paths::admin_instance(&inst), None)
        .await;
    assert_eq!(i["instance"]["status"], "running");
    let (s, v) = fake
        .post(
            &paths::task_renew(&task),
            json!({"instance_id": inst, "lease_token": token2, "lease_seconds": 5}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["cancelled"], true);
    let (s, v) = fake
        .post(
            &paths::task_complete(&task),
            json!({"instance_id": inst, "lease_token": token2, "status": "cancelled"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["status"].as_str(), v["instance_status"].as_str()),
        (Some("cancelled"), Some("running"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_drift_is_detected_and_reported() {
    let ts = TestServer::start().await;
    let (_, inst, fake) = running(&ts, "edge-d").await;
    ts.state().sense().await.unwrap();
    assert!(find(&signals(&ts, &inst).await, "module.drift_detected").is_none());
    let (s, _) = fake
        .post(
            paths::HEARTBEAT,
            json!({
                "instance_id": inst, "phase": "ready", "uptime_seconds": 9, "agent_version": "t",
                "modules": [{"name": "rogue", "version": "1", "digest": "sha256:abcd"}],
            }),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    ts.state().sense().await.unwrap();
    let sig = find(&signals(&ts, &inst).await, "module.drift_detected")
        .cloned()
        .unwrap();
    assert_eq!(sig["active"], true);
    let d = ts.ok(Method::GET, &paths::admin_drift(&inst), None).await;
    assert_eq!(d["drift"], true);
    assert_eq!(d["items"][0]["module"], "rogue");
    assert_eq!(d["items"][0]["action"], "detach");

    let (s, _) = fake.heartbeat("ready").await;
    assert_eq!(s, StatusCode::OK);
    ts.state().sense().await.unwrap();
    let sig = find(&signals(&ts, &inst).await, "module.drift_detected")
        .cloned()
        .unwrap();
    assert_eq!(sig["active"], false);
    assert_eq!(
        ts.ok(Method::GET, &paths::admin_drift(&inst), None).await["drift"],
        false
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downtime_of_the_server_is_not_silence_of_the_node() {
    let mut ts = TestServer::start().await;
    let (_, inst, _fake) = running(&ts, "edge-down").await;
    ts.stop().await;
    // The server was down for ten minutes; the node could not reach it.
    ts.clock.advance_secs(600);
    ts.restart().await;
    ts.state().sense().await.unwrap();
    let sigs = signals(&ts, &inst).await;
    assert!(find(&sigs, "instance.silent").is_none());
    assert!(find(&sigs, "instance.stuck").is_none());
    // Silence is counted from the restart on.
    ts.clock.advance_secs(301);
    ts.state().sense().await.unwrap();
    assert!(find(&signals(&ts, &inst).await, "instance.silent").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_systemd_root_with_a_failed_unit_is_signalled_with_recovery_and_cleared() {
    let ts = TestServer::start().await;
    let (_, inst, fake) = running(&ts, "edge-sd").await;
    let (s, _) = fake
        .post(
            paths::HANDSHAKE,
            json!({
                "instance_id": inst, "phase": "ready", "agent_version": "test-0.1",
                "timeline": [], "root": {"fstype": "overlay", "options": "ro", "init": "systemd"},
            }),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let heartbeat = |state: &str, failed: Value| {
        json!({
            "instance_id": inst, "phase": "ready", "uptime_seconds": 9,
            "agent_version": "test-0.1",
            "systemd": {"state": state, "failed_units": failed, "multi_user": true},
        })
    };
    let (s, _) = fake
        .post(
            paths::HEARTBEAT,
            heartbeat("degraded", json!(["docker.service"])),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let i = ts
        .ok(Method::GET, &paths::admin_instance(&inst), None)
        .await;
    assert_eq!(i["instance"]["root"]["init"], "systemd");
    assert_eq!(i["instance"]["systemd"]["state"], "degraded");
    let d = &i["instance"]["systemd_degraded"];
    assert_eq!(d["reason"], "systemd_degraded");
    assert_eq!(d["failed_units"], json!(["docker.service"]));
    assert!(d["recovery"].as_str().unwrap().starts_with(&format!(
        "collect-diagnostics {inst}; the failed units are listed"
    )));
    // The table shows it too.
    let table = powernode_stub::cli::render_table(&i["instance"]);
    assert!(
        table.contains("init") && table.contains("docker.service"),
        "{table}"
    );

    ts.state().sense().await.unwrap();
    ts.state().sense().await.unwrap();
    let sigs = signals(&ts, &inst).await;
    let fired: Vec<&Value> = sigs
        .iter()
        .filter(|s| s["kind"] == "instance.systemd_degraded")
        .collect();
    assert_eq!(fired.len(), 1, "fires once: {sigs:?}");
    assert_eq!(fired[0]["active"], true);
    assert_eq!(
        fired[0]["detail"]["failed_units"],
        json!(["docker.service"])
    );

    let (s, _) = fake
        .post(paths::HEARTBEAT, heartbeat("running", json!([])))
        .await;
    assert_eq!(s, StatusCode::OK);
    ts.state().sense().await.unwrap();
    let sigs = signals(&ts, &inst).await;
    assert_eq!(
        find(&sigs, "instance.systemd_degraded").unwrap()["active"],
        false
    );
    assert!(find(&sigs, "instance.systemd_degraded_cleared").is_some());
    let i = ts
        .ok(Method::GET, &paths::admin_instance(&inst), None)
        .await;
    assert!(i["instance"].get("systemd_degraded").is_none());
    assert_eq!(i["instance"]["systemd"]["state"], "running");
}
