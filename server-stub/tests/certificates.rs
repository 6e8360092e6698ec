//! The node certificate after enrollment: renewal only when due and rate-limited,
//! and the reissue of an expired certificate for the same key with every refusal
//! it can meet (foreign, unknown, revoked, expired beyond the grace period, another
//! key, not expired at all).

mod common;

use common::{code, csr, FakeNode, TestServer};
use powernode_proto::paths;
use powernode_stub::cli::client::pinned_client;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// The certificate's lifetime in these tests.
const TTL: i64 = 90;

fn reissue_body(inst: &str, cert_pem: &str, csr_pem: &str) -> Value {
    json!({"instance_id": inst, "certificate_pem": cert_pem, "csr_pem": csr_pem})
}

/// A CSR for `inst` signed by `key` (the node's existing key).
fn csr_for(key: &rcgen::KeyPair, inst: &str) -> String {
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, inst);
    params.serialize_request(key).unwrap().pem().unwrap()
}

fn public_key(cert_pem: &str) -> Vec<u8> {
    let der = powernode_stub::ca::pem_certs(cert_pem).remove(0);
    powernode_stub::ca::parse_client_leaf(&der)
        .unwrap()
        .public_key
}

async fn events(ts: &TestServer, inst: &str, kind: &str) -> Vec<Value> {
    let v = ts
        .ok(
            Method::GET,
            &format!("{}?limit=200&instance_id={inst}", paths::ADMIN_EVENTS),
            None,
        )
        .await;
    v["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == kind)
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_reissued_for_the_same_key() {
    let ts = TestServer::start_with(|c| c.cert_ttl_seconds = TTL as u64).await;
    let (_, inst, doc) = ts.provisioned("edge-reissue").await;
    let mut fake = FakeNode::new(doc.clone(), &ts.url());
    let enr = fake.enroll().await;
    let cert = fake.cert_pem.clone().unwrap();
    let key = fake.key.take().unwrap();

    // Not expired: nothing to reissue (the node's clock misled it).
    let (s, v) = fake
        .post(
            paths::CERTIFICATE_REISSUE,
            reissue_body(&inst, &cert, &csr_for(&key, &inst)),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::CONFLICT, "renewal_not_due"),
        "{v}"
    );

    // An outage longer than the certificate: the server calls it expired, with
    // a code of its own that is not a final refusal.
    ts.clock.advance_secs(TTL + 30);
    let (s, v) = fake.heartbeat("ready").await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNAUTHORIZED, "certificate_expired"),
        "{v}"
    );

    // Another key cannot re-enroll it.
    let (_, other_csr) = csr(&inst);
    let (s, v) = fake
        .post(
            paths::CERTIFICATE_REISSUE,
            reissue_body(&inst, &cert, &other_csr),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::BAD_REQUEST, "csr_invalid"),
        "{v}"
    );

    // The same key gets a new certificate for that key, which works.
    let (s, r) = fake
        .post(
            paths::CERTIFICATE_REISSUE,
            reissue_body(&inst, &cert, &csr_for(&key, &inst)),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_ne!(r["serial"], enr["serial"]);
    let new_pem = r["certificate_pem"].as_str().unwrap();
    assert_eq!(public_key(new_pem), public_key(&cert));
    let node = FakeNode::with_cert(doc, &ts.url(), new_pem, &key.serialize_pem());
    let (s, v) = node.heartbeat("ready").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let ev = events(&ts, &inst, "certificate.reissued_after_expiry").await;
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0]["detail"]["old_serial"], enr["serial"]);
    assert_eq!(ev[0]["detail"]["serial"], r["serial"]);
    // The test clock is advanced on top of real time, which a loaded machine moves on
    // by a second or more between enrollment and reissue.
    let expired_for = ev[0]["detail"]["expired_for_seconds"].as_i64().unwrap();
    assert!((30..=40).contains(&expired_for), "{ev:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reissue_refuses_foreign_unknown_revoked_and_too_long_expired_certificates() {
    let ts = TestServer::start_with(|c| {
        c.cert_ttl_seconds = TTL as u64;
        c.reissue_grace_seconds = 600;
    })
    .await;
    let (_, inst, doc) = ts.provisioned("edge-refusals").await;
    let mut fake = FakeNode::new(doc.clone(), &ts.url());
    fake.enroll().await;
    let cert = fake.cert_pem.clone().unwrap();
    let key = fake.key.take().unwrap();
    let now = ts.clock.now_ms();

    // Another CA's certificate for the same instance: final.
    let other = tempfile::tempdir().unwrap();
    let other_ca = powernode_stub::ca::Ca::load_or_create(other.path()).unwrap();
    let foreign = other_ca
        .issue_node_cert(&csr_for(&key, &inst), &inst, now - 200_000, TTL as u64)
        .unwrap();
    // Signed by this CA but never recorded (a lost database, a forged serial): final.
    let unknown = ts
        .state()
        .ca
        .issue_node_cert(&csr_for(&key, &inst), &inst, now - 200_000, TTL as u64)
        .unwrap();
    ts.clock.advance_secs(TTL + 10);
    for pem in [
        foreign.pem.as_str(),
        unknown.pem.as_str(),
        "not a certificate",
    ] {
        let (s, v) = fake
            .post(
                paths::CERTIFICATE_REISSUE,
                reissue_body(&inst, pem, &csr_for(&key, &inst)),
            )
            .await;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::UNAUTHORIZED, "client_certificate_invalid"),
            "{v}"
        );
    }
    // Our certificate, named for another instance in the body.
    let (s, v) = fake
        .post(
            paths::CERTIFICATE_REISSUE,
            reissue_body("inst-other", &cert, &csr_for(&key, "inst-other")),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::FORBIDDEN, "certificate_instance_mismatch"),
        "{v}"
    );

    // Expired longer ago than the grace period (600 s): a new token is needed.
    ts.clock.advance_secs(600);
    let (s, v) = fake
        .post(
            paths::CERTIFICATE_REISSUE,
            reissue_body(&inst, &cert, &csr_for(&key, &inst)),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNAUTHORIZED, "certificate_grace_exceeded"),
        "{v}"
    );

    // A terminated instance's certificates are revoked: final, and signalled.
    ts.ok(
        Method::POST,
        &paths::admin_terminate(&inst),
        Some(json!({"force": true})),
    )
    .await;
    let (s, v) = fake
        .post(
            paths::CERTIFICATE_REISSUE,
            reissue_body(&inst, &cert, &csr_for(&key, &inst)),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNAUTHORIZED, "certificate_revoked"),
        "{v}"
    );
    let refused = events(&ts, &inst, "instance.refused").await;
    assert!(
        refused
            .iter()
            .any(|e| e["detail"]["path"] == paths::CERTIFICATE_REISSUE),
        "{refused:?}"
    );
    ts.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_only_when_due_and_rate_limited_per_instance() {
    let ts = TestServer::start_with(|c| c.cert_ttl_seconds = TTL as u64).await;
    let (_, inst, doc) = ts.provisioned("edge-renewals").await;
    let mut fake = FakeNode::new(doc, &ts.url());
    fake.enroll().await;
    let renew = || async {
        let (_, c) = csr(&inst);
        fake.post(
            paths::CERTIFICATE_RENEW,
            json!({"instance_id": inst, "csr_pem": c}),
        )
        .await
    };

    // A fresh certificate is not due: refused, and not for good.
    let (s, v) = renew().await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::CONFLICT, "renewal_not_due"),
        "{v}"
    );
    let (_, v) = fake.heartbeat("ready").await;
    assert_eq!(v["renew_certificate"], false);

    // Due (a third of its life left): the heartbeat asks, and renewal works.
    ts.clock.advance_secs(65);
    let (_, v) = fake.heartbeat("ready").await;
    assert_eq!(v["renew_certificate"], true);
    let (s, v) = renew().await;
    assert_eq!(s, StatusCode::OK, "{v}");

    // A node that renews again and again on the same due certificate (answers
    // lost, or a bug) gets at most four certificates per lifetime, the
    // enrollment's included.
    for _ in 0..2 {
        let (s, v) = renew().await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let (s, v) = renew().await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::TOO_MANY_REQUESTS, "renewal_rate_limited"),
        "{v}"
    );
    assert_eq!(events(&ts, &inst, "certificate.renewed").await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_the_server_date() {
    let ts = TestServer::start().await;
    let (_, _, doc) = ts.provisioned("edge-date").await;
    // What the agent speaks (HTTP/1.1, no ALPN) and what reqwest offers (h2),
    // success and refusal alike: the node estimates the server's clock from it.
    for http1 in [true, false] {
        let mut roots = rustls::RootCertStore::empty();
        for c in powernode_stub::ca::pem_certs(&doc.ca_pem) {
            roots.add(c).unwrap();
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        if !http1 {
            tls.alpn_protocols = vec![b"h2".to_vec()];
        }
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .build()
            .unwrap();
        for path in [paths::ADMIN_TEMPLATES, paths::HEARTBEAT] {
            let r = http
                .get(format!("{}{path}", ts.url()))
                .send()
                .await
                .unwrap();
            let date = r
                .headers()
                .get(reqwest::header::DATE)
                .unwrap_or_else(|| panic!("no Date on {path} (http1 {http1})"));
            let date = httpdate::parse_http_date(date.to_str().unwrap()).unwrap();
            let off = date
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_else(|e| e.duration());
            assert!(off.as_secs() <= 2, "{off:?}");
        }
    }
    // It is the control plane's clock, the one that dates certificates.
    ts.clock.advance_secs(5 * 3600);
    let r = pinned_client(&doc.ca_pem, None)
        .unwrap()
        .get(format!("{}{}", ts.url(), paths::HEARTBEAT))
        .send()
        .await
        .unwrap();
    let date = r.headers().get(reqwest::header::DATE).unwrap();
    let date = httpdate::parse_http_date(date.to_str().unwrap()).unwrap();
    let ahead = date
        .duration_since(std::time::SystemTime::now())
        .unwrap()
        .as_secs();
    assert!((5 * 3600 - 2..=5 * 3600 + 2).contains(&ahead), "{ahead}");
}

/// The real agent against a control plane whose clock is `skew_secs` away from
/// this machine's (the node's RTC, seen from the server): the node must run,
/// renew a few times in two certificate lives, neither stop (a node clock ahead
/// sees its certificates as expired) nor renew in a loop or strand (one behind
/// never sees them due).
async fn node_with_a_clock_off_by(skew_secs: i64) {
    const TTL: u64 = 8;
    let ts = TestServer::start_with(|c| {
        c.cert_ttl_seconds = TTL;
        c.heartbeat_interval_seconds = 1;
    })
    .await;
    ts.clock.advance_secs(skew_secs);
    let (_, inst, doc) = ts.provisioned(&format!("edge-skew{skew_secs}")).await;
    let dir = powernode_tests::test_dir(&format!("clock-skew{skew_secs}")).unwrap();
    let identity = serde_json::to_value(&doc).unwrap();
    let mut agent = tokio::task::spawn_blocking(move || {
        powernode_tests::Agent::with_identity(&dir, "agent", &identity, &[]).unwrap()
    })
    .await
    .unwrap();
    let running = async {
        loop {
            let v = ts
                .ok(Method::GET, &paths::admin_instance(&inst), None)
                .await;
            if v["instance"]["status"] == "running" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    };
    if tokio::time::timeout(std::time::Duration::from_secs(30), running)
        .await
        .is_err()
    {
        panic!("never running:\n{}", agent.log_text());
    }
    tokio::time::sleep(std::time::Duration::from_secs(2 * TTL)).await;
    assert!(
        agent.guard.is_running(),
        "agent died:\n{}",
        agent.log_text()
    );
    // Still heartbeating on a valid certificate: the last beat is recent.
    let v = ts
        .ok(Method::GET, &paths::admin_instance(&inst), None)
        .await;
    let last =
        powernode_tests::timestamp(v["instance"]["last_heartbeat_at"].as_str().unwrap()).unwrap();
    let server_now = time::OffsetDateTime::from_unix_timestamp(ts.clock.now_ms() / 1000).unwrap();
    assert!(
        server_now - last < time::Duration::seconds(4),
        "last heartbeat {last}, server time {server_now}:\n{}",
        agent.log_text()
    );
    // Renewed at about two thirds of each life: a few times, not at every beat.
    let renewals = events(&ts, &inst, "certificate.renewed").await.len();
    assert!(
        (2..=5).contains(&renewals),
        "{renewals} renewals in {} s with a {TTL} s certificate:\n{}",
        2 * TTL,
        agent.log_text()
    );
    // Judged by the server's clock (its answers' `Date`), the node never asked
    // before the server's renewal point.
    assert!(
        !agent.log_text().contains("renewal not due"),
        "{}",
        agent.log_text()
    );
    agent.guard.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_clock_hours_behind_the_server_renews_in_time() {
    node_with_a_clock_off_by(5 * 3600).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_clock_hours_ahead_of_the_server_neither_stops_nor_renews_in_a_loop() {
    node_with_a_clock_off_by(-5 * 3600).await;
}
