//! Runtime on loopback with a fake node: node-side tasks of every kind (lease, renew,
//! cancel in every state, requeue with history, bounded results), drain timeout,
//! every stuck row, decommission refusal, reboot re-enrollment, module updates and
//! drift verbs, and attribute-failure. Time is the server's test clock.

mod common;

use common::{code, csr, FakeNode, TestServer};
use powernode_proto::paths;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

async fn signals(ts: &TestServer, inst: &str) -> Vec<Value> {
    let v = ts
        .ok(
            Method::GET,
            &format!("{}?limit=200&instance_id={inst}", paths::ADMIN_SIGNALS),
            None,
        )
        .await;
    v["signals"].as_array().unwrap().clone()
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

async fn lease(fake: &FakeNode, secs: u64) -> Value {
    let (s, v) = fake
        .post(
            paths::TASK_LEASE,
            json!({"instance_id": fake.doc.instance_id, "lease_seconds": secs}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["task"].clone()
}

async fn renew(fake: &FakeNode, t: &Value, progress: &str) -> (StatusCode, Value) {
    fake.post(
        &paths::task_renew(t["task_id"].as_str().unwrap()),
        json!({"instance_id": fake.doc.instance_id, "lease_token": t["lease_token"],
               "lease_seconds": 30, "progress": progress}),
    )
    .await
}

async fn complete(fake: &FakeNode, t: &Value, status: &str, result: Value) -> (StatusCode, Value) {
    fake.post(
        &paths::task_complete(t["task_id"].as_str().unwrap()),
        json!({"instance_id": fake.doc.instance_id, "lease_token": t["lease_token"],
               "status": status, "result": result}),
    )
    .await
}

async fn task(ts: &TestServer, id: &str) -> Value {
    ts.ok(Method::GET, &paths::admin_task(id), None).await["task"].clone()
}

async fn instance(ts: &TestServer, id: &str) -> Value {
    ts.ok(Method::GET, &paths::admin_instance(id), None).await["instance"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_tasks_of_every_kind_lease_cancel_and_keep_bounded_results() {
    let ts = TestServer::start().await;
    let (_, inst, fake) = running(&ts, "edge-tasks").await;

    // collect-diagnostics: leased with its params, a large result is bounded.
    let v = ts
        .ok(
            Method::POST,
            &paths::admin_collect_diagnostics(&inst),
            Some(json!({"log_lines": 20})),
        )
        .await;
    assert_eq!(v["status"], "running");
    let diag = v["task_id"].as_str().unwrap().to_string();
    let (s, v) = fake.heartbeat("ready").await;
    assert_eq!((s, &v["tasks_pending"]), (StatusCode::OK, &json!(true)));
    let t = lease(&fake, 30).await;
    assert_eq!(t["kind"], "collect_diagnostics");
    assert_eq!(t["params"]["log_lines"], 20);
    assert_eq!(t["params"]["max_bytes"], 65536);
    let (s, v) = renew(&fake, &t, "reading mounts").await;
    assert_eq!((s, &v["cancelled"]), (StatusCode::OK, &json!(false)), "{v}");
    assert_eq!(task(&ts, &diag).await["progress"], "reading mounts");
    let big = json!({"log": "x".repeat(200_000), "mounts": ["/"]});
    let (s, v) = complete(&fake, &t, "succeeded", big).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let done = task(&ts, &diag).await;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["result"]["truncated"], true);
    assert!(done["result"]["original_bytes"].as_u64().unwrap() > 200_000);
    let small = json!({"versions": {"agent": "t"}, "modules": []});
    // A small result is kept as is (second diagnostics task).
    let v = ts
        .ok(
            Method::POST,
            &paths::admin_collect_diagnostics(&inst),
            Some(json!({})),
        )
        .await;
    let diag2 = v["task_id"].as_str().unwrap().to_string();
    let t = lease(&fake, 30).await;
    assert_eq!(t["params"]["log_lines"], 100);
    complete(&fake, &t, "succeeded", small.clone()).await;
    assert_eq!(task(&ts, &diag2).await["result"], small);

    // Cancel a pending task: never leased.
    let v = ts
        .ok(Method::POST, &paths::admin_reboot(&inst), Some(json!({})))
        .await;
    let reboot = v["task_id"].as_str().unwrap().to_string();
    assert_eq!(task(&ts, &reboot).await["params"]["reason"], "operator");
    // A second reboot while one is open is refused with the task named.
    let (s, v) = ts
        .call(Method::POST, &paths::admin_reboot(&inst), Some(json!({})))
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "invalid_transition"));
    assert!(v["error"]["message"].as_str().unwrap().contains(&reboot));
    let c = ts
        .ok(
            Method::POST,
            &paths::admin_cancel_task(&reboot),
            Some(json!({})),
        )
        .await;
    assert_eq!(c["task"]["status"], "cancelled");
    assert!(
        lease(&fake, 30).await.is_null(),
        "a cancelled task is not leased"
    );
    // Cancel a final task: a clear error.
    let (s, v) = ts
        .call(
            Method::POST,
            &paths::admin_cancel_task(&reboot),
            Some(json!({})),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "invalid_transition"));
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("already cancelled"));

    // Cancel a leased (running) task: renew says so, the agent's answer is kept.
    let v = ts
        .ok(
            Method::POST,
            &paths::admin_module_update(&inst),
            Some(json!({})),
        )
        .await;
    let mu = v["task_id"].as_str().unwrap().to_string();
    let t = lease(&fake, 30).await;
    assert_eq!(t["kind"], "module_update");
    assert_eq!(t["params"]["trigger"], "operator");
    assert_eq!(t["params"]["reboot_required"], false);
    ts.ok(
        Method::POST,
        &paths::admin_cancel_task(&mu),
        Some(json!({})),
    )
    .await;
    let (s, v) = renew(&fake, &t, "x").await;
    assert_eq!((s, &v["cancelled"]), (StatusCode::OK, &json!(true)));
    let (s, v) = complete(&fake, &t, "cancelled", json!({"stopped": "at step 2"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let t = task(&ts, &mu).await;
    assert_eq!(t["status"], "cancelled");
    assert_eq!(t["result"]["agent_result"]["stopped"], "at step 2");

    // A drain cancels what a cordoned node will not take: a pending reboot.
    let v = ts
        .ok(Method::POST, &paths::admin_reboot(&inst), Some(json!({})))
        .await;
    let moot = v["task_id"].as_str().unwrap().to_string();
    // Kinds need an agent in the right state: no reboot while draining.
    ts.ok(
        Method::POST,
        &paths::admin_drain(&inst),
        Some(json!({"timeout_seconds": 600})),
    )
    .await;
    let t = task(&ts, &moot).await;
    assert_eq!(t["status"], "cancelled");
    assert!(t["result"]["reason"].as_str().unwrap().contains("draining"));
    let (s, v) = ts
        .call(Method::POST, &paths::admin_reboot(&inst), Some(json!({})))
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "invalid_transition"));
    // Diagnostics still work while draining.
    ts.ok(
        Method::POST,
        &paths::admin_collect_diagnostics(&inst),
        Some(json!({})),
    )
    .await;
    let (s, v) = ts
        .call(
            Method::POST,
            &paths::admin_reboot("inst-nope"),
            Some(json!({})),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "not_found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_agents_lease_expires_the_task_is_requeued_with_its_first_attempt_kept() {
    let ts = TestServer::start().await;
    let (_, inst, fake) = running(&ts, "edge-requeue").await;
    let v = ts
        .ok(Method::POST, &paths::admin_reboot(&inst), Some(json!({})))
        .await;
    let id = v["task_id"].as_str().unwrap().to_string();
    let t1 = lease(&fake, 10).await;
    renew(&fake, &t1, "stopping services").await;
    // The agent dies: no renew. The sensor requeues after the lease.
    ts.clock.advance_secs(31);
    ts.state().sense().await.unwrap();
    let t = task(&ts, &id).await;
    assert_eq!(t["status"], "pending");
    assert_eq!(t["attempts"], 1);
    let h = &t["history"][0];
    assert_eq!(h["attempt"], 1);
    assert_eq!(h["outcome"], "lease_expired");
    assert_eq!(h["progress"], "stopping services");
    // The old lease token is refused with lease_expired; a new lease is attempt 2.
    let (s, v) = complete(&fake, &t1, "succeeded", json!({})).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "lease_expired"));
    let t2 = lease(&fake, 10).await;
    assert_eq!(t2["task_id"], id.as_str());
    let (s, _) = complete(&fake, &t2, "succeeded", json!({"rebooting": true})).await;
    assert_eq!(s, StatusCode::OK);
    let t = task(&ts, &id).await;
    assert_eq!(
        (t["status"].as_str(), t["attempts"].as_u64()),
        (Some("succeeded"), Some(2))
    );
    assert_eq!(t["history"].as_array().unwrap().len(), 1);
    assert_eq!(t["result"]["rebooting"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_past_its_timeout_is_stuck_and_terminate_force_ends_it() {
    let ts = TestServer::start().await;
    let (node, inst, fake) = running(&ts, "edge-drain").await;
    let v = ts
        .ok(
            Method::POST,
            &paths::admin_drain(&inst),
            Some(json!({"timeout_seconds": 20})),
        )
        .await;
    let drain = v["task_id"].as_str().unwrap().to_string();
    let t = lease(&fake, 60).await;
    assert_eq!(t["params"]["timeout_seconds"], 20);
    ts.clock.advance_secs(20);
    ts.state().sense().await.unwrap();
    assert!(instance(&ts, &inst).await.get("stuck").is_none(), "grace");
    // The service will not stop: the agent reports the drain failed.
    let (s, _) = complete(
        &fake,
        &t,
        "failed",
        json!({"error": {"code": "internal", "message": "service svc ignored TERM"},
               "services_not_stopped": ["svc"]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    ts.clock.advance_secs(6);
    ts.state().sense().await.unwrap();
    let i = instance(&ts, &inst).await;
    assert_eq!(i["status"], "draining");
    let stuck = &i["stuck"];
    assert_eq!(stuck["reason"], "drain_timeout");
    assert_eq!(stuck["threshold_seconds"], 20);
    let rec = stuck["recovery"].as_str().unwrap();
    assert!(
        rec.contains(&format!("terminate-instance {inst} --force")) && rec.contains(&drain),
        "{rec}"
    );
    let sig = signals(&ts, &inst).await;
    let s = sig
        .iter()
        .find(|s| s["kind"] == "instance.stuck")
        .expect("stuck signal");
    assert_eq!(
        (&s["detail"]["reason"], &s["active"]),
        (&json!("drain_timeout"), &json!(true))
    );
    // Without --force terminate is refused (not drained); with it, it ends.
    let (s, v) = ts
        .call(
            Method::POST,
            &paths::admin_terminate(&inst),
            Some(json!({"force": false})),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "invalid_transition"));
    let v = ts
        .ok(
            Method::POST,
            &paths::admin_terminate(&inst),
            Some(json!({"force": true})),
        )
        .await;
    assert_eq!(v["status"], "terminated");
    ts.state().sense().await.unwrap();
    let sig = signals(&ts, &inst).await;
    assert!(sig
        .iter()
        .filter(|s| s["kind"] == "instance.stuck")
        .all(|s| s["active"] == false));
    let n = ts.ok(Method::GET, &paths::admin_node(&node), None).await;
    assert_eq!(n["node"]["status"], "no_instance");
}

/// Every row of the recovery table a fake node can drive on loopback: bootstrapping,
/// running without heartbeats, draining (the drain itself within its timeout),
/// plus provisioning; pending and terminating are in the service's unit tests
/// (they need a provider that hangs or fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_rows_are_data_in_get_instance_and_signals() {
    let ts = TestServer::start_with(|c| {
        c.stuck = powernode_stub::StuckThresholds::parse(
            "provisioning=5,bootstrapping=5,running=5,draining=5",
        )
        .unwrap()
    })
    .await;
    let (_, prov, _) = ts.provisioned("edge-prov").await;
    let (_, boot, doc) = ts.provisioned("edge-boot").await;
    let mut bootf = FakeNode::new(doc, &ts.url());
    bootf.enroll().await;
    let (_, run, _run_fake) = running(&ts, "edge-run").await;
    let (_, drain, _drain_fake) = running(&ts, "edge-drn").await;
    ts.ok(
        Method::POST,
        &paths::admin_drain(&drain),
        Some(json!({"timeout_seconds": 3600})),
    )
    .await;
    ts.clock.advance_secs(7);
    ts.state().sense().await.unwrap();
    for (id, reason, recovery) in [
        (&prov, "provisioning_too_long", "cancel-task"),
        (
            &boot,
            "bootstrapping_too_long",
            "terminate-instance --force",
        ),
        (
            &run,
            "running_without_heartbeat",
            "terminate-instance --force",
        ),
        (&drain, "draining_too_long", "terminate-instance --force"),
    ] {
        let i = instance(&ts, id).await;
        assert_eq!(i["stuck"]["reason"], reason, "{i}");
        assert!(
            i["stuck"]["recovery"].as_str().unwrap().contains(recovery),
            "{reason}: {}",
            i["stuck"]["recovery"]
        );
        let s = signals(&ts, id).await;
        let stuck = s
            .iter()
            .find(|s| s["kind"] == "instance.stuck")
            .unwrap_or_else(|| panic!("no stuck signal for {reason}: {s:?}"));
        assert_eq!(stuck["detail"]["reason"], reason);
        assert_eq!(stuck["detail"]["recovery"], i["stuck"]["recovery"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decommissioned_node_coming_back_is_refused_and_the_refusal_is_a_signal() {
    let ts = TestServer::start().await;
    let (node, inst, fake) = running(&ts, "edge-gone").await;
    let v = ts
        .ok(
            Method::POST,
            &paths::admin_terminate(&inst),
            Some(json!({"force": true})),
        )
        .await;
    assert_eq!(v["status"], "terminated");
    // The Node row stays, with its history.
    let n = ts.ok(Method::GET, &paths::admin_node(&node), None).await;
    assert_eq!(n["node"]["status"], "no_instance");
    assert_eq!(n["node"]["instance_history"][0], inst.as_str());
    // Old certificate: refused with a stable code, on every node call.
    let (s, v) = fake.heartbeat("ready").await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNAUTHORIZED, "certificate_revoked")
    );
    let (s, v) = fake.handshake("agent_started", None).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNAUTHORIZED, "certificate_revoked")
    );
    let sig = signals(&ts, &inst).await;
    let refused: Vec<&Value> = sig
        .iter()
        .filter(|s| s["kind"] == "instance.refused")
        .collect();
    assert_eq!(refused.len(), 1, "one signal a minute: {sig:?}");
    assert_eq!(refused[0]["detail"]["code"], "certificate_revoked");
    assert_eq!(refused[0]["detail"]["path"], paths::HEARTBEAT);
    assert_eq!(refused[0]["detail"]["instance_status"], "terminated");
    // Its bootstrap token too (a node without state), recorded a minute later.
    ts.clock.advance_secs(61);
    let (s, v) = fake
        .post(
            paths::ENROLLMENT,
            fake.enrollment_body(&fake.doc.bootstrap_token, &csr(&inst).1),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNAUTHORIZED, "bootstrap_token_used")
    );
    let sig = signals(&ts, &inst).await;
    assert!(
        sig.iter().any(|s| s["kind"] == "instance.refused"
            && s["detail"]["path"] == paths::ENROLLMENT
            && s["detail"]["code"] == "bootstrap_token_used"),
        "{sig:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_task_lets_an_ephemeral_node_enroll_once_more() {
    let ts = TestServer::start().await;
    let (_, inst, fake) = running(&ts, "edge-reboot").await;
    // Without a reboot task the spent token is refused.
    let (s, v) = fake
        .post(
            paths::ENROLLMENT,
            fake.enrollment_body(&fake.doc.bootstrap_token, &csr(&inst).1),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNAUTHORIZED, "bootstrap_token_used")
    );
    let v = ts
        .ok(
            Method::POST,
            &paths::admin_reboot(&inst),
            Some(json!({"reason": "kernel update"})),
        )
        .await;
    let reboot = v["task_id"].as_str().unwrap().to_string();
    let t = lease(&fake, 30).await;
    assert_eq!(t["params"]["reason"], "kernel update");
    // The node reboots before completing: it comes back with only its identity.
    let mut again = FakeNode::new(fake.doc.clone(), &ts.url());
    again.enroll().await;
    let t = task(&ts, &reboot).await;
    assert_eq!(
        (t["status"].as_str(), &t["result"]),
        (Some("succeeded"), &json!({"re_enrolled": true}))
    );
    assert_eq!(instance(&ts, &inst).await["status"], "running");
    // The old certificate (the key died with the reboot) is revoked; the new works.
    let (s, v) = fake.heartbeat("ready").await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNAUTHORIZED, "certificate_revoked")
    );
    let (s, _) = again.heartbeat("ready").await;
    assert_eq!(s, StatusCode::OK);
    // Once only.
    let (s, v) = again
        .post(
            paths::ENROLLMENT,
            again.enrollment_body(&again.doc.bootstrap_token, &csr(&inst).1),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNAUTHORIZED, "bootstrap_token_used")
    );
}

async fn publish(ts: &TestServer, name: &str, version: &str, kind: &str) -> Value {
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("etc")).unwrap();
    std::fs::write(
        src.path().join("etc/release"),
        format!("{name} {version}\n"),
    )
    .unwrap();
    let http = powernode_stub::cli::client::pinned_client(&ts.ca_pem(), None).unwrap();
    let args = powernode_stub::cli::publish::PublishArgs {
        source: src.path().to_path_buf(),
        name: name.into(),
        version: version.into(),
        kind: kind.into(),
        registry: None,
        folder: Default::default(),
    };
    powernode_stub::cli::publish::publish_module(
        &ts.admin,
        http,
        &ts.url(),
        &ts.admin_token(),
        &args,
    )
    .await
    .unwrap()["publication"]
        .clone()
}

async fn heartbeat_modules(fake: &FakeNode, modules: Value) {
    let (s, v) = fake
        .post(
            paths::HEARTBEAT,
            json!({"instance_id": fake.doc.instance_id, "phase": "ready", "uptime_seconds": 9,
                   "agent_version": "t", "modules": modules}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_changes_make_update_tasks_drift_verbs_and_an_attribution() {
    let ts = TestServer::start().await;
    let base1 = publish(&ts, "base", "1.0.0", "root").await;
    let svc1 = publish(&ts, "svc", "1.0.0", "runtime").await;
    ts.ok(
        Method::PUT,
        "/api/v1/system/templates/tmpl-edge-base/modules",
        Some(json!({"root_modules": ["base"], "runtime_modules": ["svc"]})),
    )
    .await;
    ts.state().sense().await.unwrap();
    let (_, inst, fake) = running(&ts, "edge-mods").await;
    let m = |p: &Value| json!({"name": p["name"], "version": p["version"], "digest": p["digest"]});
    heartbeat_modules(&fake, json!([m(&base1), m(&svc1)])).await;
    ts.state().sense().await.unwrap();
    let d = ts.ok(Method::GET, &paths::admin_drift(&inst), None).await;
    assert_eq!(
        (d["drift"].as_bool(), d.get("recovery")),
        (Some(false), None),
        "{d}"
    );

    // A template change: a runtime module added -> module_update task + drift attach.
    let extra = publish(&ts, "extra", "0.1.0", "runtime").await;
    ts.ok(
        Method::PUT,
        "/api/v1/system/templates/tmpl-edge-base/modules",
        Some(json!({"root_modules": ["base"], "runtime_modules": ["svc", "extra"]})),
    )
    .await;
    ts.state().sense().await.unwrap();
    let t = lease(&fake, 30).await;
    assert_eq!(t["kind"], "module_update");
    assert_eq!(t["params"]["trigger"], "template_modules_changed");
    assert_eq!(t["params"]["reboot_required"], false);
    assert_eq!(
        t["params"]["changes"],
        json!([{"module": "extra", "action": "attach", "kind": "runtime",
                "desired_digest": extra["digest"], "reboot_required": false}])
    );
    let sig = signals(&ts, &inst).await;
    let drift = sig
        .iter()
        .find(|s| s["kind"] == "module.drift_detected" && s["active"] == true)
        .expect("drift signal");
    assert_eq!(drift["detail"]["summary"], "attach extra");
    // The agent attaches it live and reports so.
    heartbeat_modules(&fake, json!([m(&base1), m(&svc1), m(&extra)])).await;
    complete(
        &fake,
        &t,
        "succeeded",
        json!({"applied": [{"module": "extra", "action": "attach"}]}),
    )
    .await;
    ts.state().sense().await.unwrap();
    assert!(signals(&ts, &inst)
        .await
        .iter()
        .filter(|s| s["kind"] == "module.drift_detected")
        .all(|s| s["active"] == false));

    // A new runtime version and a new root version: update verbs, reboot for root.
    ts.clock.advance_secs(120);
    let svc2 = publish(&ts, "svc", "2.0.0", "runtime").await;
    let base2 = publish(&ts, "base", "2.0.0", "root").await;
    ts.state().sense().await.unwrap();
    let d = ts.ok(Method::GET, &paths::admin_drift(&inst), None).await;
    assert_eq!(d["reboot_required"], true, "{d}");
    assert!(d["recovery"]
        .as_str()
        .unwrap()
        .contains(&format!("reboot-instance {inst}")));
    let items = d["items"].as_array().unwrap();
    let find = |m: &str| items.iter().find(|i| i["module"] == m).unwrap().clone();
    let (b, s) = (find("base"), find("svc"));
    assert_eq!(
        (&b["action"], &b["kind"], &b["reboot_required"]),
        (&json!("update"), &json!("root"), &json!(true))
    );
    assert_eq!(
        (&b["desired_digest"], &b["running_digest"]),
        (&base2["digest"], &base1["digest"])
    );
    assert_eq!(
        (&s["action"], &s["reboot_required"]),
        (&json!("update"), &json!(false))
    );
    assert_eq!(s["desired_digest"], svc2["digest"]);
    let t = lease(&fake, 30).await;
    assert_eq!(t["params"]["trigger"], "module_published");
    assert_eq!(t["params"]["reboot_required"], true);
    let sig = signals(&ts, &inst).await;
    let drift = sig
        .iter()
        .find(|s| s["kind"] == "module.drift_detected" && s["active"] == true)
        .expect("drift signal");
    assert_eq!(drift["detail"]["summary"], "update base, update svc");
    assert_eq!(drift["detail"]["reboot_required"], true);

    // The agent's last reconcile is shown, with the root modules awaiting a reboot.
    let (s, v) = fake
        .post(
            paths::HEARTBEAT,
            json!({"instance_id": fake.doc.instance_id, "phase": "ready", "uptime_seconds": 9,
                   "agent_version": "t", "modules": [m(&base1), m(&svc2), m(&extra)],
                   "last_reconcile": {"at": "2026-01-01T00:00:00Z", "ok": true,
                                      "reboot_required": ["base"]}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let i = instance(&ts, &inst).await;
    assert_eq!(i["last_reconcile"]["reboot_required"], json!(["base"]));
    let d = ts.ok(Method::GET, &paths::admin_drift(&inst), None).await;
    assert_eq!(
        (&d["reboot_required"], d["items"].as_array().unwrap().len()),
        (&json!(true), 1)
    );

    // A detach: the template drops extra.
    ts.ok(
        Method::PUT,
        "/api/v1/system/templates/tmpl-edge-base/modules",
        Some(json!({"root_modules": ["base"], "runtime_modules": ["svc"]})),
    )
    .await;
    let d = ts.ok(Method::GET, &paths::admin_drift(&inst), None).await;
    assert!(d["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["module"] == "extra" && i["action"] == "detach" && i["kind"] == "runtime"));

    // The node then fails with digest_mismatch on base: attribution ranks base's
    // publication first, with reasoning.
    ts.clock.advance_secs(600);
    let (s, _) = fake
        .handshake(
            "modules_verified",
            Some(
                json!({"phase": "modules_verified", "code": "digest_mismatch",
                        "message": "module base: layer digest does not match", "attempt": 1}),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let a = ts
        .ok(
            Method::GET,
            &format!("{}?lookback_hours=2", paths::admin_attribute_failure(&inst)),
            None,
        )
        .await;
    assert_eq!(a["failure"]["source"], "failure_report");
    assert_eq!(a["failure"]["code"], "digest_mismatch");
    let c = a["candidates"].as_array().unwrap();
    assert!(c.len() >= 3, "{a}");
    assert_eq!(c[0]["change"], "module_published", "{a}");
    assert_eq!(c[0]["module"], "base");
    assert_eq!(c[0]["version"], "2.0.0");
    assert_eq!(c[0]["kind"], "root");
    assert_eq!(c[0]["minutes_before_failure"], 10);
    let why = c[0]["reasoning"].as_str().unwrap();
    assert!(
        why.contains("root module base 2.0.0 was published 10 min before the failure")
            && why.contains("digest_mismatch concerns module content")
            && why.contains("names base"),
        "{why}"
    );
    let ranks: Vec<u64> = c.iter().map(|c| c["rank"].as_u64().unwrap()).collect();
    assert_eq!(ranks, (1..=c.len() as u64).collect::<Vec<_>>());
    let scores: Vec<u64> = c.iter().map(|c| c["score"].as_u64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    assert!(c
        .iter()
        .any(|c| c["change"] == "template_modules_changed" && c["module"] == "extra"));
    assert!(c.iter().any(|c| c["change"] == "module_update_task"));
    assert!(c.iter().any(|c| c["change"] == "drift_detected"));
    // A short window sees only what came just before.
    let a = ts
        .ok(
            Method::GET,
            &format!("{}?lookback_hours=1", paths::admin_attribute_failure(&inst)),
            None,
        )
        .await;
    assert!(a["candidates"].as_array().unwrap().len() >= 2);
    let (s, v) = ts
        .call(
            Method::GET,
            &format!("{}?lookback_hours=0", paths::admin_attribute_failure(&inst)),
            None,
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "bad_request"));
}

/// A publication or a template change schedules the affected nodes' module_update
/// task at once: the agent can lease it before any sensor pass (the sensor timer is
/// an hour in these tests and `sense()` is never called here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_changes_schedule_update_tasks_without_a_sensor_pass() {
    let ts = TestServer::start().await;
    let svc1 = publish(&ts, "svc", "1.0.0", "runtime").await;
    let (_, inst, fake) = running(&ts, "edge-now").await;
    let m = |p: &Value| json!({"name": p["name"], "version": p["version"], "digest": p["digest"]});
    assert!(lease(&fake, 30).await.is_null(), "nothing desired yet");

    // Template change: attach svc.
    ts.ok(
        Method::PUT,
        "/api/v1/system/templates/tmpl-edge-base/modules",
        Some(json!({"root_modules": [], "runtime_modules": ["svc"]})),
    )
    .await;
    let t = lease(&fake, 30).await;
    assert_eq!(t["kind"], "module_update", "{t}");
    assert_eq!(t["params"]["trigger"], "template_modules_changed", "{t}");
    assert_eq!(t["params"]["changes"][0]["action"], "attach", "{t}");
    heartbeat_modules(&fake, json!([m(&svc1)])).await;
    let (s, v) = complete(&fake, &t, "succeeded", json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");

    // Publication: update svc.
    let svc2 = publish(&ts, "svc", "2.0.0", "runtime").await;
    let t = lease(&fake, 30).await;
    assert_eq!(t["kind"], "module_update", "{t}");
    assert_eq!(t["params"]["trigger"], "module_published", "{t}");
    assert_eq!(
        t["params"]["changes"][0]["desired_digest"], svc2["digest"],
        "{t}"
    );
    let events = ts
        .ok(
            Method::GET,
            &format!("{}?limit=200&instance_id={inst}", paths::ADMIN_EVENTS),
            None,
        )
        .await;
    let created = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "task.created" && e["detail"]["kind"] == "module_update")
        .count();
    assert_eq!(created, 2, "{events}");
}

/// The window a leased reboot task opens for the spent token lasts only as long as
/// the reboot may still happen: a task the agent fails, or the operator cancels,
/// closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_or_cancelled_reboot_task_closes_the_reenrollment_window() {
    let ts = TestServer::start().await;
    let (_, inst, fake) = running(&ts, "edge-reboot-ends").await;
    let enroll_again = || async {
        let again = FakeNode::new(fake.doc.clone(), &ts.url());
        again
            .post(
                paths::ENROLLMENT,
                again.enrollment_body(&again.doc.bootstrap_token, &csr(&inst).1),
            )
            .await
    };
    // The agent fails the reboot (a unit would not stop, say).
    let v = ts
        .ok(Method::POST, &paths::admin_reboot(&inst), Some(json!({})))
        .await;
    let reboot = v["task_id"].as_str().unwrap().to_string();
    let t = lease(&fake, 30).await;
    let (s, _) = complete(&fake, &t, "failed", json!({"error": "busy"})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(task(&ts, &reboot).await["status"], "failed");
    let (s, v) = enroll_again().await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNAUTHORIZED, "bootstrap_token_used"),
        "{v}"
    );
    // The operator cancels a leased reboot.
    let v = ts
        .ok(Method::POST, &paths::admin_reboot(&inst), Some(json!({})))
        .await;
    let reboot = v["task_id"].as_str().unwrap().to_string();
    lease(&fake, 30).await;
    ts.ok(Method::POST, &paths::admin_cancel_task(&reboot), None)
        .await;
    assert_eq!(task(&ts, &reboot).await["status"], "cancelled");
    let (s, v) = enroll_again().await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNAUTHORIZED, "bootstrap_token_used"),
        "{v}"
    );
    assert_eq!(instance(&ts, &inst).await["status"], "running");
}
