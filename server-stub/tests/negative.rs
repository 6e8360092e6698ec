//! Every refusal the runbook names: a 4xx with its stable code, and the server still
//! serving the next request.

mod common;

use common::{code, csr, FakeNode, TestServer};
use powernode_proto::paths;
use powernode_stub::cli::client::pinned_client;
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_missing_or_wrong() {
    let ts = TestServer::start().await;
    let http = pinned_client(&ts.ca_pem(), None).unwrap();
    let url = format!("{}{}", ts.url(), paths::ADMIN_TEMPLATES);
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(code(&r.json().await.unwrap()), "admin_token_missing");
    ts.still_serving().await;
    let r = http
        .get(&url)
        .bearer_auth("not-the-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(code(&r.json().await.unwrap()), "admin_token_invalid");
    ts.still_serving().await;
    // Node endpoints are not behind the admin token.
    let r = http
        .post(format!("{}{}", ts.url(), paths::HEARTBEAT))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        code(&r.json().await.unwrap()),
        "client_certificate_required"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_unknown() {
    let ts = TestServer::start().await;
    let http = pinned_client(&ts.ca_pem(), None).unwrap();
    let token = std::fs::read_to_string(ts.dir.path().join("admin-token")).unwrap();
    let url = format!("{}{}", ts.url(), paths::ADMIN_NODES);
    let r = http
        .post(&url)
        .bearer_auth(token.trim())
        .header("content-type", "application/json")
        .body("{\"hostname\": \"x\", ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(code(&r.json().await.unwrap()), "malformed_json");
    ts.still_serving().await;

    let big = format!("{{\"hostname\": \"{}\"}}", "a".repeat(2 * 1024 * 1024));
    let r = http
        .post(&url)
        .bearer_auth(token.trim())
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(code(&r.json().await.unwrap()), "payload_too_large");
    ts.still_serving().await;

    // Enrollment is unauthenticated: it must be bounded too.
    let r = http
        .post(format!("{}{}", ts.url(), paths::ENROLLMENT))
        .body(vec![b' '; 1024 * 1024 + 10])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    ts.still_serving().await;

    let (s, v) = ts
        .call(
            Method::POST,
            paths::ADMIN_NODES,
            Some(json!({"hostname": 5})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(code(&v), "bad_request");
    let (s, v) = ts
        .call(
            Method::POST,
            paths::ADMIN_NODES,
            Some(json!({"hostname": "bad host", "lifecycle_class": "spot"})),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "bad_request"));
    let (s, v) = ts
        .call(
            Method::POST,
            paths::ADMIN_NODES,
            Some(json!({"hostname": "h", "lifecycle_class": "spot", "template_id": "nope"})),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "unknown_template"));
    for path in [
        paths::admin_node("node-0"),
        paths::admin_instance("inst-0"),
        paths::admin_task("task-0"),
        paths::admin_drift("inst-0"),
        paths::admin_instance_identity("inst-0"),
        "/api/v1/system/nope".to_string(),
    ] {
        let (s, v) = ts.call(Method::GET, &path, None).await;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::NOT_FOUND, "not_found"),
            "{path}"
        );
    }
    ts.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_token_wrong_reused_and_csr_refusals() {
    let ts = TestServer::start().await;
    let (_, inst, doc) = ts.provisioned("edge-n").await;
    let fake = FakeNode::new(doc.clone(), &ts.url());
    let (_, good_csr) = csr(&inst);

    let (s, v) = fake
        .post(
            paths::ENROLLMENT,
            fake.enrollment_body("wrong-token", &good_csr),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNAUTHORIZED, "bootstrap_token_invalid")
    );

    // CSR for another instance; request naming another instance.
    let (_, other_csr) = csr("inst-someone-else");
    let (s, v) = fake
        .post(
            paths::ENROLLMENT,
            fake.enrollment_body(&doc.bootstrap_token, &other_csr),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::FORBIDDEN, "csr_instance_mismatch")
    );
    let mut body = fake.enrollment_body(&doc.bootstrap_token, &good_csr);
    body["instance_id"] = json!("inst-someone-else");
    let (s, v) = fake.post(paths::ENROLLMENT, body).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::FORBIDDEN, "csr_instance_mismatch")
    );

    // Not Ed25519; not a CSR at all.
    let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, inst.as_str());
    let p256_csr = params.serialize_request(&p256).unwrap().pem().unwrap();
    let (s, v) = fake
        .post(
            paths::ENROLLMENT,
            fake.enrollment_body(&doc.bootstrap_token, &p256_csr),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "csr_invalid"));
    let (s, v) = fake
        .post(
            paths::ENROLLMENT,
            fake.enrollment_body(
                &doc.bootstrap_token,
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            ),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "csr_invalid"));
    ts.still_serving().await;

    // None of the refusals used the token up.
    let (s, v) = fake
        .post(
            paths::ENROLLMENT,
            fake.enrollment_body(&doc.bootstrap_token, &good_csr),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Spent: another key cannot use it (the same key gets its answer again, below).
    let (s, v) = fake
        .post(
            paths::ENROLLMENT,
            fake.enrollment_body(&doc.bootstrap_token, &csr(&inst).1),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNAUTHORIZED, "bootstrap_token_used")
    );
    ts.still_serving().await;
}

/// A node whose enrollment answer was lost (reset, timeout) asks again with the same
/// token and the same key: it gets the certificate it was issued, not a refusal, and
/// the server records one enrollment. Another key is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_csr_posted_twice_with_the_same_token_gets_the_same_certificate() {
    let ts = TestServer::start().await;
    let (_, inst, doc) = ts.provisioned("edge-again").await;
    let fake = FakeNode::new(doc.clone(), &ts.url());
    let (key, good_csr) = csr(&inst);
    let body = fake.enrollment_body(&doc.bootstrap_token, &good_csr);
    let (s, first) = fake.post(paths::ENROLLMENT, body.clone()).await;
    assert_eq!(s, StatusCode::OK, "{first}");
    let (s, again) = fake.post(paths::ENROLLMENT, body).await;
    assert_eq!(s, StatusCode::OK, "the retry was refused: {again}");
    for field in [
        "serial",
        "certificate_pem",
        "not_after",
        "ca_pem",
        "node_id",
    ] {
        assert_eq!(first[field], again[field], "{field}");
    }
    // One enrollment on record, one certificate.
    let events = ts
        .ok(
            Method::GET,
            &format!("{}?instance_id={inst}&limit=100", paths::ADMIN_EVENTS),
            None,
        )
        .await;
    let enrolled: Vec<_> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "instance.enrolled")
        .collect();
    assert_eq!(enrolled.len(), 1, "{events}");
    assert_eq!(enrolled[0]["detail"]["serial"], first["serial"]);
    // The repeated answer is a working certificate.
    let node = FakeNode::with_cert(
        doc.clone(),
        &ts.url(),
        again["certificate_pem"].as_str().unwrap(),
        &key.serialize_pem(),
    );
    let (s, v) = node.heartbeat("ready").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Another key with the spent token is refused, as before.
    let (s, v) = fake
        .post(
            paths::ENROLLMENT,
            fake.enrollment_body(&doc.bootstrap_token, &csr(&inst).1),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNAUTHORIZED, "bootstrap_token_used")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_token_expires_after_its_ttl() {
    let ts = TestServer::start_with(|c| c.token_ttl_seconds = 3600).await;
    let (_, inst, doc) = ts.provisioned("edge-e").await;
    ts.clock.advance_secs(3601);
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
    ts.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_refusals() {
    let ts = TestServer::start().await;
    let (_, inst, doc) = ts.provisioned("edge-m").await;
    let mut fake = FakeNode::new(doc.clone(), &ts.url());

    // No certificate on an mTLS endpoint.
    let (s, v) = fake.heartbeat("ready").await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNAUTHORIZED, "client_certificate_required")
    );

    // A certificate for the same instance, from another CA.
    let other = tempfile::tempdir().unwrap();
    let other_ca = powernode_stub::ca::Ca::load_or_create(other.path()).unwrap();
    let (key, c) = csr(&inst);
    let issued = other_ca
        .issue_node_cert(&c, &inst, ts.clock.now_ms(), 3600)
        .unwrap();
    let foreign = FakeNode::with_cert(doc.clone(), &ts.url(), &issued.pem, &key.serialize_pem());
    let (s, v) = foreign.heartbeat("ready").await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNAUTHORIZED, "client_certificate_invalid")
    );
    ts.still_serving().await;

    // Our certificate, but the body names another instance.
    fake.enroll().await;
    let (s, v) = fake
        .post(
            paths::HEARTBEAT,
            json!({"instance_id": "inst-other", "phase": "ready", "uptime_seconds": 1, "agent_version": "t"}),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::FORBIDDEN, "certificate_instance_mismatch")
    );
    let (s, v) = fake
        .post(
            paths::TASK_LEASE,
            json!({"instance_id": "inst-other", "lease_seconds": 5}),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::FORBIDDEN, "certificate_instance_mismatch")
    );

    // Revoked after a forced terminate.
    let (s, _) = fake.heartbeat("ready").await;
    assert_eq!(s, StatusCode::OK);
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
    for (s, v) in [
        fake.heartbeat("ready").await,
        fake.handshake("ready", None).await,
        fake.get(paths::DESIRED_MODULES).await,
        fake.post(
            paths::TASK_LEASE,
            json!({"instance_id": inst, "lease_seconds": 5}),
        )
        .await,
    ] {
        assert_eq!(
            (s, code(&v)),
            (StatusCode::UNAUTHORIZED, "certificate_revoked")
        );
    }
    ts.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_transitions_are_409() {
    let ts = TestServer::start().await;
    let (node_id, inst, _doc) = ts.provisioned("edge-t").await;
    // Draining needs a booted instance.
    let (s, v) = ts
        .call(Method::POST, &paths::admin_drain(&inst), Some(json!({})))
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "invalid_transition"));
    // Lifecycle class may change before a provision only: this node has one now.
    let (s, v) = ts
        .call(
            Method::PATCH,
            &paths::admin_node(&node_id),
            Some(json!({"lifecycle_class": "spot"})),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::CONFLICT, "lifecycle_class_immutable")
    );
    // The same class again is not a change.
    ts.ok(
        Method::PATCH,
        &paths::admin_node(&node_id),
        Some(json!({"lifecycle_class": "ephemeral"})),
    )
    .await;
    let v = ts
        .ok(
            Method::POST,
            &paths::admin_terminate(&inst),
            Some(json!({})),
        )
        .await;
    let task = v["task_id"].as_str().unwrap().to_string();
    let (s, v) = ts
        .call(
            Method::POST,
            &paths::admin_terminate(&inst),
            Some(json!({"force": true})),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "invalid_transition"));
    let (s, v) = ts
        .call(
            Method::POST,
            &paths::admin_cancel_task(&task),
            Some(json!({})),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "invalid_transition"));
    let (s, v) = ts
        .call(Method::POST, &paths::admin_drain(&inst), Some(json!({})))
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "invalid_transition"));

    // A fresh node's class can still change.
    let v = ts
        .ok(
            Method::POST,
            paths::ADMIN_NODES,
            Some(json!({"hostname": "fresh", "lifecycle_class": "spot"})),
        )
        .await;
    let fresh = v["node"]["id"].as_str().unwrap().to_string();
    let v = ts
        .ok(
            Method::PATCH,
            &paths::admin_node(&fresh),
            Some(json!({"lifecycle_class": "persistent"})),
        )
        .await;
    assert_eq!(v["node"]["lifecycle_class"], "persistent");
    let (s, v) = ts
        .call(
            Method::POST,
            &paths::admin_provision(&fresh),
            Some(json!({"instance_type": "type-huge"})),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::BAD_REQUEST, "unknown_instance_type")
    );
    let (s, v) = ts
        .call(
            Method::POST,
            &paths::admin_provision(&fresh),
            Some(json!({"region": "mars"})),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "unknown_region"));
    // Refused provisions leave the class unlocked.
    let v = ts.ok(Method::GET, &paths::admin_node(&fresh), None).await;
    assert_eq!(v["node"]["lifecycle_class_locked"], false);
    ts.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_provider_refuses_provisioning() {
    let ts = TestServer::start_with(|c| c.provider = powernode_stub::ProviderMode::Disabled).await;
    let v = ts
        .ok(
            Method::POST,
            paths::ADMIN_NODES,
            Some(json!({"hostname": "d", "lifecycle_class": "spot"})),
        )
        .await;
    let node = v["node"]["id"].as_str().unwrap().to_string();
    let (s, v) = ts
        .call(
            Method::POST,
            &paths::admin_provision(&node),
            Some(json!({})),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "provider_disabled"));
    let v = ts.ok(Method::GET, &paths::admin_node(&node), None).await;
    assert_eq!(v["node"]["status"], "no_instance");
    assert_eq!(v["node"]["instance_history"], json!([]));
    ts.still_serving().await;
}
