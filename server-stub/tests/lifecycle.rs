//! The runbook's lifecycle against a real server on 127.0.0.1:0 with a fake node:
//! create -> provision -> enroll -> handshake -> heartbeat ready -> running -> drain
//! (lease / renew / complete) -> terminate -> refused -> provision again.

mod common;

use common::{code, FakeNode, TestServer};
use powernode_proto::paths;
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle_with_a_fake_node() {
    let mut ts = TestServer::start().await;
    let (node_id, inst, doc) = ts.provisioned("edge-1").await;
    assert_eq!(doc.instance_id, inst);
    assert_eq!(doc.node_id, node_id);
    assert_eq!(doc.control_plane_url, ts.url());
    assert_eq!(doc.ca_pem, ts.ca_pem());
    assert_eq!(doc.heartbeat_interval_seconds, 2);

    let node = ts.ok(Method::GET, &paths::admin_node(&node_id), None).await;
    assert_eq!(node["node"]["status"], "provisioning");
    assert_eq!(node["node"]["lifecycle_class_locked"], true);

    // Phase 3: enroll, handshake.
    let mut fake = FakeNode::new(doc.clone(), &ts.url());
    fake.provider =
        Some(json!({"provider": "aws", "region": "eu-west-1", "addresses": ["10.1.2.3"]}));
    let enr = fake.enroll().await;
    assert_eq!(enr["instance_id"], inst.as_str());
    assert_eq!(enr["heartbeat_interval_seconds"], 2);
    let i = ts
        .ok(Method::GET, &paths::admin_instance(&inst), None)
        .await;
    assert_eq!(i["instance"]["status"], "bootstrapping");
    assert_eq!(i["instance"]["identity_source"], "file");
    assert_eq!(i["instance"]["agent_version"], "test-0.1");
    assert_eq!(i["instance"]["provider_facts"]["region"], "eu-west-1");
    let provision_task = i["instance"]["task_id"].as_str().unwrap().to_string();

    let (s, v) = fake.handshake("agent_started", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["instance_status"], "bootstrapping");

    // Phase 4: heartbeat with phase ready -> running, provision task succeeded.
    let (s, v) = fake.heartbeat("ready").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["instance_status"], "running");
    assert_eq!(v["tasks_pending"], false);
    assert_eq!(v["renew_certificate"], false);
    let t = ts
        .ok(Method::GET, &paths::admin_task(&provision_task), None)
        .await;
    assert_eq!(t["task"]["status"], "succeeded");
    let i = ts
        .ok(Method::GET, &paths::admin_instance(&inst), None)
        .await;
    assert_eq!(i["instance"]["status"], "running");
    assert!(i["instance"]["last_heartbeat_at"].is_string());
    assert_eq!(i["instance"]["boot_timeline"][1]["at_ms"], 1234);
    let d = ts.ok(Method::GET, &paths::admin_drift(&inst), None).await;
    assert_eq!(
        d,
        json!({"drift": false, "instance_id": inst, "items": [], "reboot_required": false})
    );
    let (s, v) = fake.get(paths::DESIRED_MODULES).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["modules"], json!([]));

    // A routine heartbeat stays in memory until the flusher writes it.
    let (s, _) = fake.heartbeat("ready").await;
    assert_eq!(s, StatusCode::OK);
    assert!(ts.state().flush_dirty().await.unwrap() >= 1);

    // Terminating a running instance needs a drain or --force.
    let (s, v) = ts
        .call(
            Method::POST,
            &paths::admin_terminate(&inst),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(code(&v), "invalid_transition");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("drain first or use --force"));

    // Phase 5: drain; the node leases, renews, completes.
    let v = ts
        .ok(
            Method::POST,
            &paths::admin_drain(&inst),
            Some(json!({"timeout_seconds": 60, "cordon_only": false})),
        )
        .await;
    assert_eq!(v["status"], "draining");
    let drain_task = v["task_id"].as_str().unwrap().to_string();
    let (_, hb) = fake.heartbeat("ready").await;
    assert_eq!(hb["instance_status"], "draining");
    assert_eq!(hb["tasks_pending"], true);
    let (s, lease) = fake
        .post(
            paths::TASK_LEASE,
            json!({"instance_id": inst, "lease_seconds": 30}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{lease}");
    assert_eq!(lease["task"]["task_id"], drain_task.as_str());
    assert_eq!(lease["task"]["kind"], "drain");
    assert_eq!(lease["task"]["params"]["timeout_seconds"], 60);
    let token = lease["task"]["lease_token"].as_str().unwrap().to_string();
    let (s, again) = fake
        .post(
            paths::TASK_LEASE,
            json!({"instance_id": inst, "lease_seconds": 30}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(again["task"].is_null(), "the task is held: {again}");
    let (s, r) = fake
        .post(
            &paths::task_renew(&drain_task),
            json!({"instance_id": inst, "lease_token": token, "lease_seconds": 30, "progress": "stopping services"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["cancelled"], false);
    let (s, r) = fake
        .post(
            &paths::task_renew(&drain_task),
            json!({"instance_id": inst, "lease_token": "wrong", "lease_seconds": 30}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(code(&r), "task_not_leased");
    let (s, c) = fake
        .post(
            &paths::task_complete(&drain_task),
            json!({"instance_id": inst, "lease_token": token, "status": "succeeded", "result": {"stopped": 0}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!(c["status"], "succeeded");
    assert_eq!(c["instance_status"], "draining");
    let t = ts
        .ok(Method::GET, &paths::admin_task(&drain_task), None)
        .await;
    assert_eq!(t["task"]["status"], "succeeded");
    assert_eq!(t["task"]["progress"], "stopping services");
    assert_eq!(t["task"]["attempts"], 1);

    // Phase 6: drained, so terminate works without --force.
    let v = ts
        .ok(
            Method::POST,
            &paths::admin_terminate(&inst),
            Some(json!({})),
        )
        .await;
    assert_eq!(v["status"], "terminated");
    let (s, v) = fake.heartbeat("ready").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(code(&v), "certificate_revoked");
    let node = ts.ok(Method::GET, &paths::admin_node(&node_id), None).await;
    assert_eq!(node["node"]["status"], "no_instance");
    assert_eq!(node["node"]["instance_history"], json!([inst]));
    let i = ts
        .ok(Method::GET, &paths::admin_instance(&inst), None)
        .await;
    assert_eq!(i["instance"]["status"], "terminated");
    assert!(i["instance"]["terminated_at"].is_string());
    // The identity's token is now expired too.
    let (s, v) = FakeNode::new(doc.clone(), &ts.url())
        .post(
            paths::ENROLLMENT,
            fake.enrollment_body(&doc.bootstrap_token, &common::csr(&inst).1),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(code(&v), "bootstrap_token_used");

    // The Node can be provisioned again; history keeps both.
    let v = ts
        .ok(
            Method::POST,
            &paths::admin_provision(&node_id),
            Some(json!({"instance_type": "type-qemu-2cpu-4gb"})),
        )
        .await;
    let inst2 = v["instance"]["id"].as_str().unwrap().to_string();
    assert_eq!(v["instance"]["instance_type"], "type-qemu-2cpu-4gb");
    let node = ts.ok(Method::GET, &paths::admin_node(&node_id), None).await;
    assert_eq!(node["node"]["instance_history"], json!([inst2, inst]));
    assert_eq!(node["node"]["current_instance_id"], inst2.as_str());

    // Lifecycle class is fixed now; delete refuses a live instance.
    let (s, v) = ts
        .call(
            Method::PATCH,
            &paths::admin_node(&node_id),
            Some(json!({"lifecycle_class": "persistent"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(code(&v), "lifecycle_class_immutable");
    let (s, v) = ts
        .call(Method::DELETE, &paths::admin_node(&node_id), None)
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(code(&v), "node_has_live_instance");
    let (s, v) = ts
        .call(
            Method::POST,
            &paths::admin_provision(&node_id),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(code(&v), "node_already_has_instance");

    // A provisioning instance terminates without --force; then delete works.
    let v = ts
        .ok(
            Method::POST,
            &paths::admin_terminate(&inst2),
            Some(json!({})),
        )
        .await;
    assert_eq!(v["status"], "terminated");
    let v = ts
        .ok(Method::DELETE, &paths::admin_node(&node_id), None)
        .await;
    assert_eq!(v, json!({"deleted": true, "node_id": node_id}));
    let (s, v) = ts
        .call(Method::GET, &paths::admin_node(&node_id), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(code(&v), "not_found");
    // The instance rows are kept.
    ts.ok(Method::GET, &paths::admin_instance(&inst), None)
        .await;

    let ev = ts
        .ok(
            Method::GET,
            &format!("{}?limit=200&instance_id={inst}", paths::ADMIN_EVENTS),
            None,
        )
        .await;
    let kinds: Vec<&str> = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for k in [
        "instance.enrolled",
        "instance.drained",
        "credentials.revoked",
        "provider.destroy",
    ] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_on_the_same_dir_keeps_ca_token_rows_and_the_node_carries_on() {
    let mut ts = TestServer::start().await;
    let ca_before = ts.ca_pem();
    let token_before = std::fs::read_to_string(ts.dir.path().join("admin-token")).unwrap();
    let (node_id, inst, doc) = ts.provisioned("edge-r").await;
    let mut fake = FakeNode::new(doc, &ts.url());
    fake.enroll().await;
    let (s, _) = fake.heartbeat("ready").await;
    assert_eq!(s, StatusCode::OK);
    // A routine heartbeat that only the flusher (or the shutdown flush) persists;
    // five seconds later, so it is told apart from the one that made it running.
    ts.clock.advance_secs(5);
    let (s, _) = fake.heartbeat("ready").await;
    assert_eq!(s, StatusCode::OK);
    let hb_before = ts
        .ok(Method::GET, &paths::admin_instance(&inst), None)
        .await["instance"]["last_heartbeat_at"]
        .clone();

    ts.restart().await;
    assert_eq!(ts.ca_pem(), ca_before);
    assert_eq!(
        std::fs::read_to_string(ts.dir.path().join("admin-token")).unwrap(),
        token_before
    );
    let node = ts.ok(Method::GET, &paths::admin_node(&node_id), None).await;
    assert_eq!(node["node"]["status"], "running");
    let i = ts
        .ok(Method::GET, &paths::admin_instance(&inst), None)
        .await;
    assert_eq!(i["instance"]["last_heartbeat_at"], hb_before);
    // The node's certificate still works against the restarted server (new port).
    fake.base = ts.url();
    let (s, v) = fake.heartbeat("ready").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["instance_status"], "running");
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_failure_is_recorded_with_a_signal() {
    let ts = TestServer::start().await;
    let (_, inst, doc) = ts.provisioned("edge-f").await;
    let mut fake = FakeNode::new(doc, &ts.url());
    fake.enroll().await;
    let (s, v) = fake
        .handshake(
            "modules_verified",
            Some(json!({"phase": "modules_verified", "code": "signature_mismatch", "message": "bad sig", "attempt": 2})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let i = ts
        .ok(Method::GET, &paths::admin_instance(&inst), None)
        .await;
    assert_eq!(i["instance"]["failure"]["code"], "signature_mismatch");
    assert_eq!(i["instance"]["status"], "bootstrapping");
    let sig = ts
        .ok(
            Method::GET,
            &format!("{}?instance_id={inst}", paths::ADMIN_SIGNALS),
            None,
        )
        .await;
    let s0 = &sig["signals"][0];
    assert_eq!(s0["kind"], "bootstrap.failed");
    assert_eq!(s0["active"], true);
    assert_eq!(s0["detail"]["code"], "signature_mismatch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_renewal_issues_a_new_working_certificate() {
    let ts = TestServer::start_with(|c| c.cert_ttl_seconds = 90).await;
    let (_, inst, doc) = ts.provisioned("edge-c").await;
    let mut fake = FakeNode::new(doc.clone(), &ts.url());
    let enr = fake.enroll().await;
    let (_, v) = fake.heartbeat("ready").await;
    assert_eq!(v["renew_certificate"], false);
    // Less than a third of the 90 s lifetime left (the backdating does not count).
    ts.clock.advance_secs(65);
    let (_, v) = fake.heartbeat("ready").await;
    assert_eq!(v["renew_certificate"], true);
    let (key, csr) = common::csr(&inst);
    let (s, r) = fake
        .post(
            paths::CERTIFICATE_RENEW,
            json!({"instance_id": inst, "csr_pem": csr}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_ne!(r["serial"], enr["serial"]);
    let renewed = FakeNode::with_cert(
        doc,
        &ts.url(),
        r["certificate_pem"].as_str().unwrap(),
        &key.serialize_pem(),
    );
    let (s, v) = renewed.heartbeat("ready").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["renew_certificate"], false);
    // Past the old certificate's end it is refused as expired, the new one works.
    ts.clock.advance_secs(40);
    let (s, v) = fake.heartbeat("ready").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(code(&v), "certificate_expired");
    let (s, _) = renewed.heartbeat("ready").await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_http1_keep_alive_both_work() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioIo;

    let ts = TestServer::start().await;
    // reqwest offers h2 first (ALPN) and gets it.
    let token = std::fs::read_to_string(ts.dir.path().join("admin-token")).unwrap();
    let http = powernode_stub::cli::client::pinned_client(&ts.ca_pem(), None).unwrap();
    let r = http
        .get(format!("{}{}", ts.url(), paths::ADMIN_TEMPLATES))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), StatusCode::OK);

    // An HTTP/1.1-only client keeps one connection for several requests.
    let mut roots = rustls::RootCertStore::empty();
    for c in powernode_stub::ca::pem_certs(&ts.ca_pem()) {
        roots.add(c).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let addr = ts.server.as_ref().unwrap().addr;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(
            rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        sender.ready().await.unwrap();
        let req = hyper::Request::get(paths::ADMIN_TEMPLATES)
            .header("host", "127.0.0.1")
            .header("authorization", format!("Bearer {}", token.trim()))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.version(), hyper::Version::HTTP_11);
        assert_eq!(resp.status(), StatusCode::OK);
        resp.into_body().collect().await.unwrap();
    }
}

/// A bootstrap token is a secret: the identity document that holds it lives in a
/// 0600 file under a 0700 folder of the data directory while the instance lives,
/// and the provision record (history, kept and shown) holds only its hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_documents_are_private_files_and_records_keep_no_token() {
    use std::os::unix::fs::PermissionsExt as _;
    let ts = TestServer::start().await;
    let (_, inst, doc) = ts.provisioned("edge-secret").await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let file = ts
        .dir
        .path()
        .join("identities")
        .join(format!("{inst}.json"));
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(&ts.dir.path().join("identities")), 0o700);
    assert_eq!(mode(ts.dir.path()), 0o700);
    assert_eq!(mode(&ts.dir.path().join("powernode.sqlite")), 0o600);

    let db = rusqlite::Connection::open(ts.dir.path().join("powernode.sqlite")).unwrap();
    let docs: Vec<String> = db
        .prepare("SELECT doc FROM provider_records WHERE instance_id = ?1")
        .unwrap()
        .query_map([&inst], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(!docs.is_empty());
    for d in &docs {
        assert!(!d.contains(&doc.bootstrap_token), "a token in clear: {d}");
    }
    let rec: serde_json::Value = serde_json::from_str(&docs[0]).unwrap();
    assert_eq!(rec["identity"]["bootstrap_token"], "(not kept)");
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        doc.bootstrap_token.as_bytes(),
    ));
    assert_eq!(rec["identity"]["bootstrap_token_sha256"], hash);

    // Terminated: the token is withdrawn and its document is gone.
    ts.ok(
        Method::POST,
        &paths::admin_terminate(&inst),
        Some(json!({"force": true})),
    )
    .await;
    assert!(!file.exists(), "{} kept after terminate", file.display());
    let (s, v) = ts
        .call(Method::GET, &paths::admin_instance_identity(&inst), None)
        .await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "not_found"), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("only while the instance lives"),
        "{v}"
    );
}

/// A long-polled lease: held while nothing is queued, answered as soon as a task is
/// queued for the node (not at its next heartbeat), empty when the wait runs out, and
/// at once when the server stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_polled_lease_answers_when_a_task_is_queued() {
    use std::time::{Duration, Instant};
    let mut ts = TestServer::start().await;
    let (_, inst, doc) = ts.provisioned("edge-lp").await;
    let mut fake = FakeNode::new(doc, &ts.url());
    fake.enroll().await;
    fake.heartbeat("ready").await;
    let fake = std::sync::Arc::new(fake);
    let lease = |wait: u64| {
        let fake = fake.clone();
        let inst = inst.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let r = fake
                .post(
                    paths::TASK_LEASE,
                    json!({"instance_id": inst, "lease_seconds": 30, "wait_seconds": wait}),
                )
                .await;
            (r, t.elapsed())
        })
    };

    // Nothing queued: held for the wait, then empty.
    let ((s, v), took) = lease(1).await.unwrap();
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["task"].is_null(), "{v}");
    assert!(
        took >= Duration::from_millis(900),
        "answered after {took:?}"
    );

    // Queued while the lease is held: answered at once with it.
    let held = lease(20);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let queued = Instant::now();
    let drain = ts
        .ok(
            Method::POST,
            &paths::admin_drain(&inst),
            Some(json!({"timeout_seconds": 60, "cordon_only": false})),
        )
        .await;
    let ((s, v), _) = held.await.unwrap();
    let reached = queued.elapsed();
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["task"]["task_id"], drain["task_id"], "{v}");
    assert!(
        reached < Duration::from_secs(2),
        "the task reached the node after {reached:?}"
    );
    eprintln!("drain queued -> leased by the held long poll: {reached:?}");

    // A server that stops answers the held poll rather than waiting it out.
    let held = lease(20);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped = Instant::now();
    ts.stop().await;
    let ((s, v), _) = held.await.unwrap();
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["task"].is_null(), "{v}");
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopped.elapsed()
    );
}
