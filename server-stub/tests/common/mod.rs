//! Shared test harness: an in-process `powernode-stub` on 127.0.0.1:0 and a fake
//! node that enrolls with an Ed25519 CSR made by rcgen, as the agent does; the
//! binary as a child process is in [`process`].

#![allow(dead_code)]

pub mod process;
pub mod tools;

use std::path::Path;

use powernode_proto::IdentityDocument;
use powernode_stub::cli::client::{pinned_client, AdminClient};
use powernode_stub::{Clock, Config, RunningServer};
use rcgen::{CertificateParams, DnType, KeyPair};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

pub struct TestServer {
    pub server: Option<RunningServer>,
    pub dir: tempfile::TempDir,
    pub admin: AdminClient,
    pub clock: Clock,
}

pub fn config(dir: &Path) -> Config {
    let mut cfg = Config::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap());
    // Sensors are driven by hand in tests (`state.sense()`), so keep the timer slow.
    cfg.sensor_interval_ms = 3_600_000;
    cfg.heartbeat_interval_seconds = 2;
    cfg.announce = false;
    cfg
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        tweak(&mut cfg);
        let clock = Clock::default();
        let server = powernode_stub::start(cfg, clock.clone()).await.unwrap();
        let admin = AdminClient::from_data_dir(dir.path(), None).unwrap();
        Self {
            server: Some(server),
            dir,
            admin,
            clock,
        }
    }

    pub fn state(&self) -> &powernode_stub::AppState {
        &self.server.as_ref().unwrap().state
    }

    /// The admin token the server wrote to its data directory.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("admin-token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// `host:port` of the server (as in registry references).
    pub fn host(&self) -> String {
        self.url().trim_start_matches("https://").to_string()
    }

    pub fn url(&self) -> String {
        self.server.as_ref().unwrap().url.clone()
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ca.pem")).unwrap()
    }

    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await.unwrap();
        }
    }

    /// Starts again on the same data directory (new port).
    pub async fn restart(&mut self) {
        self.stop().await;
        let cfg = config(self.dir.path());
        self.server = Some(
            powernode_stub::start(cfg, self.clock.clone())
                .await
                .unwrap(),
        );
        self.admin = AdminClient::from_data_dir(self.dir.path(), None).unwrap();
    }

    /// An admin call; returns status and JSON.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (status, text) = self.admin.call(method, path, body).await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("non-JSON answer: {text}"));
        (status, v)
    }

    pub async fn ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method, path, body).await;
        assert!(status.is_success(), "{path}: {status} {v}");
        v
    }

    /// Creates a Node and provisions it; returns (node_id, instance_id, identity).
    pub async fn provisioned(&self, hostname: &str) -> (String, String, IdentityDocument) {
        let v = self
            .ok(
                Method::POST,
                powernode_proto::paths::ADMIN_NODES,
                Some(json!({"hostname": hostname, "lifecycle_class": "ephemeral"})),
            )
            .await;
        let node_id = v["node"]["id"].as_str().unwrap().to_string();
        let v = self
            .ok(
                Method::POST,
                &powernode_proto::paths::admin_provision(&node_id),
                Some(json!({})),
            )
            .await;
        let inst = v["instance"]["id"].as_str().unwrap().to_string();
        assert_eq!(v["instance"]["status"], "provisioning");
        let id = self
            .ok(
                Method::GET,
                &powernode_proto::paths::admin_instance_identity(&inst),
                None,
            )
            .await;
        let doc = IdentityDocument::from_value(id).unwrap();
        (node_id, inst, doc)
    }

    /// Asserts the server still answers an ordinary admin call.
    pub async fn still_serving(&self) {
        let (status, _) = self
            .call(Method::GET, powernode_proto::paths::ADMIN_TEMPLATES, None)
            .await;
        assert_eq!(status, StatusCode::OK);
    }
}

/// An Ed25519 key and a CSR with subject CN `cn`.
pub fn csr(cn: &str) -> (KeyPair, String) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, csr)
}

/// A fake node: an HTTP client pinned to the stub's CA, with a client certificate
/// once enrolled.
pub struct FakeNode {
    pub doc: IdentityDocument,
    pub base: String,
    pub http: reqwest::Client,
    pub key: Option<KeyPair>,
    pub cert_pem: Option<String>,
    /// Provider facts sent at enrollment.
    pub provider: Option<Value>,
}

impl FakeNode {
    pub fn new(doc: IdentityDocument, base: &str) -> Self {
        let http = pinned_client(&doc.ca_pem, None).unwrap();
        Self {
            doc,
            base: base.to_string(),
            http,
            key: None,
            cert_pem: None,
            provider: None,
        }
    }

    pub fn with_cert(doc: IdentityDocument, base: &str, cert_pem: &str, key_pem: &str) -> Self {
        let http = pinned_client(&doc.ca_pem, Some((cert_pem, key_pem))).unwrap();
        Self {
            doc,
            base: base.to_string(),
            http,
            key: None,
            cert_pem: Some(cert_pem.to_string()),
            provider: None,
        }
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}{}", self.base, path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .get(format!("{}{}", self.base, path))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub fn enrollment_body(&self, token: &str, csr_pem: &str) -> Value {
        let mut body = json!({
            "bootstrap_token": token,
            "node_id": self.doc.node_id,
            "instance_id": self.doc.instance_id,
            "csr_pem": csr_pem,
            "identity_source": "file",
            "agent_version": "test-0.1",
        });
        if let Some(p) = &self.provider {
            body["provider"] = p.clone();
        }
        body
    }

    /// Enrolls and switches to mTLS with the issued certificate.
    pub async fn enroll(&mut self) -> Value {
        let (key, csr_pem) = csr(&self.doc.instance_id);
        let body = self.enrollment_body(&self.doc.bootstrap_token.clone(), &csr_pem);
        let (status, v) = self.post(powernode_proto::paths::ENROLLMENT, body).await;
        assert_eq!(status, StatusCode::OK, "enrollment: {v}");
        let cert = v["certificate_pem"].as_str().unwrap().to_string();
        self.http = pinned_client(&self.doc.ca_pem, Some((&cert, &key.serialize_pem()))).unwrap();
        self.cert_pem = Some(cert);
        self.key = Some(key);
        v
    }

    pub async fn heartbeat(&self, phase: &str) -> (StatusCode, Value) {
        self.post(
            powernode_proto::paths::HEARTBEAT,
            json!({
                "instance_id": self.doc.instance_id,
                "phase": phase,
                "uptime_seconds": 5,
                "agent_version": "test-0.1",
            }),
        )
        .await
    }

    pub async fn handshake(&self, phase: &str, failure: Option<Value>) -> (StatusCode, Value) {
        let mut body = json!({
            "instance_id": self.doc.instance_id,
            "phase": phase,
            "agent_version": "test-0.1",
            "timeline": [{"phase": "kernel_start", "at_ms": 0}, {"phase": phase, "at_ms": 1234}],
        });
        if let Some(f) = failure {
            body["failure"] = f;
        }
        self.post(powernode_proto::paths::HANDSHAKE, body).await
    }
}

/// `sha256:HEX` of `b`.
pub fn sha(b: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

pub fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<no code>")
}
