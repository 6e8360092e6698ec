//! Module trust on the server, through the admin API: the sign route binds the
//! module's name and version, a publication of the embedded registry is recorded
//! only with a signature a key of the trust set made over a payload naming its
//! digest, name and version, and nodes get the trust set (desired modules and the
//! identity documents the server makes).

mod common;

use base64::Engine as _;
use common::sha;
use common::{code, FakeNode, TestServer};
use powernode_stub::cli::publish::{image_from_folder, BlobSource, ModuleImage, RegistryClient};
use powernode_stub::signing::{Signature, SigningKey};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const SIGNATURES: &str = "/api/v1/system/module_signatures";
const PUBLICATIONS: &str = "/api/v1/system/module_publications";

fn registry(ts: &TestServer) -> RegistryClient {
    let http = powernode_stub::cli::client::pinned_client(&ts.ca_pem(), None).unwrap();
    RegistryClient::new(http, &ts.url(), Some(ts.admin_token()))
}

/// Builds a module from a small folder and pushes it to the embedded registry.
async fn push_module(ts: &TestServer, name: &str, version: &str) -> ModuleImage {
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("etc")).unwrap();
    std::fs::write(src.path().join("etc/motd"), format!("{name} {version}\n")).unwrap();
    let image = image_from_folder(src.path(), name, version).unwrap();
    let reg = registry(ts);
    let repo = format!("modules/{name}");
    for (d, b) in &image.blobs {
        reg.push_blob(&repo, d, b).await.unwrap();
    }
    reg.push_manifest(
        &repo,
        version,
        powernode_stub::registry::OCI_MANIFEST,
        &image.manifest,
    )
    .await
    .unwrap();
    image
}

/// cosign's payload, written out here (not by the code under test).
fn payload(reference: &str, digest: &str, name: &str, version: &str) -> Vec<u8> {
    format!(
        r#"{{"critical":{{"identity":{{"docker-reference":"{reference}"}},"image":{{"docker-manifest-digest":"{digest}"}},"type":"cosign container image signature"}},"optional":{{"org.powernode.module.name":"{name}","org.powernode.module.version":"{version}"}}}}"#
    )
    .into_bytes()
}

/// Pushes `sig` as the signature of `digest` in `repo`; answers the signature
/// manifest's digest.
async fn push_signature(ts: &TestServer, repo: &str, digest: &str, sig: &Signature) -> String {
    let reg = registry(ts);
    let image = sig.image();
    for b in [&image.config, &sig.payload] {
        reg.push_blob(repo, &sha(b), &BlobSource::Memory(b.clone()))
            .await
            .unwrap();
    }
    let tag = format!("sha256-{}.sig", &digest[7..]);
    reg.push_manifest(
        repo,
        &tag,
        powernode_stub::registry::OCI_MANIFEST,
        &image.manifest,
    )
    .await
    .unwrap()
}

fn signed_by(key: &SigningKey, payload: Vec<u8>) -> Signature {
    let sig = key.sign(&payload).unwrap();
    Signature {
        payload,
        signature_b64: base64::engine::general_purpose::STANDARD.encode(sig),
    }
}

/// What the sign route answered, as a pushable signature.
fn from_route(v: &Value) -> Signature {
    let b64 = base64::engine::general_purpose::STANDARD;
    Signature {
        payload: b64.decode(v["payload"].as_str().unwrap()).unwrap(),
        signature_b64: v["signature"].as_str().unwrap().to_string(),
    }
}

/// Records `image` as `svc 1.0.0` signed by signature manifest `sd`.
async fn record_svc(ts: &TestServer, image: &ModuleImage, sd: &str) -> (StatusCode, Value) {
    ts.call(
        Method::POST,
        PUBLICATIONS,
        Some(record_body(image, "svc", "1.0.0", sd)),
    )
    .await
}

fn record_body(image: &ModuleImage, name: &str, version: &str, signature_digest: &str) -> Value {
    json!({
        "name": name, "version": version, "kind": "runtime",
        "repository": format!("modules/{name}"), "digest": image.manifest_digest,
        "composefs_digest": image.composefs_digest, "signature_digest": signature_digest,
    })
}

#[tokio::test]
async fn the_sign_route_requires_and_binds_the_name_and_version() {
    let ts = TestServer::start().await;
    let digest = sha(b"some manifest");
    // Without a name and version there is nothing to bind: refused.
    let (s, v) = ts
        .call(
            Method::POST,
            SIGNATURES,
            Some(json!({"repository": "modules/base", "digest": digest})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(code(&v), "bad_request");
    for (name, version) in [("Bad/Name", "1.0.0"), ("base", "not a tag")] {
        let (s, v) = ts
            .call(
                Method::POST,
                SIGNATURES,
                Some(json!({"name": name, "version": version,
                            "repository": "modules/base", "digest": digest})),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{name} {version}: {v}");
    }
    let v = ts
        .ok(
            Method::POST,
            SIGNATURES,
            Some(json!({"name": "base", "version": "1.0.0",
                        "repository": "modules/base", "digest": digest})),
        )
        .await;
    let sig = from_route(&v);
    // Byte for byte what `cosign sign -a org.powernode.module.name=base -a
    // org.powernode.module.version=1.0.0` writes for HOST/modules/base.
    assert_eq!(
        String::from_utf8(sig.payload.clone()).unwrap(),
        String::from_utf8(payload(
            &format!("{}/modules/base", ts.host()),
            &digest,
            "base",
            "1.0.0"
        ))
        .unwrap()
    );
    assert_eq!(v["docker_reference"], format!("{}/modules/base", ts.host()));
}

#[tokio::test]
async fn a_publication_needs_a_trusted_signature_naming_its_digest_name_and_version() {
    let ts = TestServer::start().await;
    let image = push_module(&ts, "svc", "1.0.0").await;
    let digest = image.manifest_digest.clone();
    let reference = format!("{}/modules/svc", ts.host());

    // A key outside the trust set: refused at record time.
    let foreign = SigningKey::load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
    let sig = signed_by(&foreign, payload(&reference, &digest, "svc", "1.0.0"));
    let sd = push_signature(&ts, "modules/svc", &digest, &sig).await;
    let (s, v) = record_svc(&ts, &image, &sd).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(code(&v), "signature_mismatch", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("trust"),
        "{v}"
    );

    // The server's own key, but over another version, another module, another
    // digest: each refused, naming what does not match.
    let other = sha(b"another manifest");
    for (body, what) in [
        (
            json!({"name": "svc", "version": "2.0.0", "repository": "modules/svc", "digest": digest}),
            "version",
        ),
        (
            json!({"name": "other", "version": "1.0.0", "repository": "modules/svc", "digest": digest}),
            "name",
        ),
        (
            json!({"name": "svc", "version": "1.0.0", "repository": "modules/svc", "digest": other}),
            "digest",
        ),
        (
            json!({"name": "svc", "version": "1.0.0", "repository": "modules/other", "digest": digest}),
            "repository",
        ),
    ] {
        let v = ts.ok(Method::POST, SIGNATURES, Some(body)).await;
        let sd = push_signature(&ts, "modules/svc", &digest, &from_route(&v)).await;
        let (s, v) = record_svc(&ts, &image, &sd).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{what}: {v}");
        assert_eq!(code(&v), "signature_mismatch", "{what}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(what),
            "{what}: {v}"
        );
    }
    assert!(ts.state().module_publications().is_empty());

    // The right payload signed by a trusted key is recorded.
    let v = ts
        .ok(
            Method::POST,
            SIGNATURES,
            Some(json!({"name": "svc", "version": "1.0.0", "repository": "modules/svc", "digest": digest})),
        )
        .await;
    let sd = push_signature(&ts, "modules/svc", &digest, &from_route(&v)).await;
    let (s, v) = record_svc(&ts, &image, &sd).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
}

#[tokio::test]
async fn nodes_get_the_trust_set_in_desired_modules_and_identity_documents() {
    let ts = TestServer::start().await;
    let online = std::fs::read_to_string(ts.dir.path().join("module-signing.pub")).unwrap();
    let (_, _, doc) = ts.provisioned("edge-trust").await;
    assert_eq!(doc.module_trust_keys, vec![online.clone()]);
    let mut node = FakeNode::new(doc, &ts.url());
    node.enroll().await;
    let (s, v) = node.get(powernode_proto::paths::DESIRED_MODULES).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["trust_keys"], json!([online]));
}

#[tokio::test]
async fn with_online_signing_off_the_sign_route_answers_409_and_offline_keys_are_the_trust_set() {
    let offline = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let key = SigningKey::from_pkcs8_der(&offline.serialize_der()).unwrap();
    let ts = TestServer::start_with(|c| {
        c.online_signing = false;
        c.module_trust_keys = vec![key.public_key()];
    })
    .await;
    assert!(!ts.dir.path().join("module-signing.key").exists());
    assert!(!ts.dir.path().join("module-signing.pub").exists());
    let digest = sha(b"a manifest");
    let (s, v) = ts
        .call(
            Method::POST,
            SIGNATURES,
            Some(json!({"name": "svc", "version": "1.0.0",
                        "repository": "modules/svc", "digest": digest})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(code(&v), "online_signing_disabled");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("publish-module --key"), "{msg}");
    let (s, v) = ts
        .call(Method::GET, "/api/v1/system/module_signing_key", None)
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::CONFLICT, "online_signing_disabled")
    );

    // What an offline signer reads: no online signing, the host to name, the set.
    let pem = offline.public_key_pem();
    let v = ts
        .ok(Method::GET, "/api/v1/system/module_trust", None)
        .await;
    assert_eq!(
        v,
        json!({"online_signing": false, "registry_host": ts.host(), "trust_keys": [pem]})
    );

    // A signature by the offline key is recorded; nodes get that key, and only it.
    let image = push_module(&ts, "svc", "1.0.0").await;
    let reference = format!("{}/modules/svc", ts.host());
    let sig = key
        .sign_manifest(&reference, &image.manifest_digest, "svc", "1.0.0")
        .unwrap();
    let sd = push_signature(&ts, "modules/svc", &image.manifest_digest, &sig).await;
    let (s, v) = record_svc(&ts, &image, &sd).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (_, _, doc) = ts.provisioned("edge-offline").await;
    assert_eq!(doc.module_trust_keys, vec![pem.clone()]);
    let mut node = FakeNode::new(doc, &ts.url());
    node.enroll().await;
    let (_, v) = node.get(powernode_proto::paths::DESIRED_MODULES).await;
    assert_eq!(v["trust_keys"], json!([pem]));
}

/// x86's `COMMAND_LINE_SIZE`: the kernel keeps no more of the command line.
const X86_COMMAND_LINE_SIZE: usize = 2048;
/// What the rest of a node's command line takes (`console=ttyS0 panic=-1
/// powernode.on_failure=... powernode.identity_source=cmdline ...`), generously.
const REST_OF_THE_LINE: usize = 200;

#[tokio::test]
async fn an_identity_with_two_trust_keys_still_fits_every_channel() {
    let offline = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let key = SigningKey::from_pkcs8_der(&offline.serialize_der()).unwrap();
    let ts = TestServer::start_with(|c| c.module_trust_keys = vec![key.public_key()]).await;
    let (_, _, doc) = ts.provisioned("edge-rack12-node07").await;
    assert_eq!(doc.module_trust_keys.len(), 2, "online + offline");
    let json = serde_json::to_vec(&doc).unwrap();
    let whole = format!("powernode.identity={}", doc.to_base64url());
    let mut none = doc.clone();
    none.module_trust_keys.clear();
    let without = format!("powernode.identity={}", none.to_base64url());
    eprintln!(
        "FIGURE identity with 2 trust keys: {} bytes JSON (fw_cfg, metadata: at most {}), \
         powernode.identity= {} bytes ({} without keys; x86 command line at most {})",
        json.len(),
        powernode_proto::identity::MAX_IDENTITY_BYTES,
        whole.len(),
        without.len(),
        X86_COMMAND_LINE_SIZE
    );
    assert!(json.len() < powernode_proto::identity::MAX_IDENTITY_BYTES);
    assert!(
        whole.len() + REST_OF_THE_LINE <= X86_COMMAND_LINE_SIZE,
        "{} bytes",
        whole.len()
    );
}
