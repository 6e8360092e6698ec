//! A registry that stops sending, against the pull: a loopback HTTP server in the
//! test serves a signed module and stalls (or trickles) where the test says.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use powernode_modfmt::publish::{build_module, BuildOptions, LayerCompression};
use powernode_modfmt::testutil::pseudo_random;
use powernode_proto::node::COMPOSEFS_DIGEST_ANNOTATION;
use powernode_proto::ErrorCode;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use sha2::{Digest as _, Sha256};

use super::pull::{pull_module, PullError, PullReport};
use super::registry::{Descriptor, RegistryClient, RegistryOptions, Repository};
use super::signature::{
    signature_tag, TrustKey, COSIGN_SIGNATURE_TYPE, SIGNATURE_ANNOTATION, SIMPLESIGNING_MEDIA_TYPE,
};
use super::store::ObjectStore;
use super::ModuleErrorCode;

/// How the server sends one path's body.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Serve {
    Whole,
    /// Head and the first N body bytes, then nothing (the connection stays open).
    StallAfter(usize),
    /// Reads the request and never answers.
    Silent,
    /// Chunks of N bytes, one every period.
    Trickle(usize, Duration),
}

/// Bodies by request path.
type Bodies = Arc<Mutex<BTreeMap<String, (Vec<u8>, Serve)>>>;

/// A one-thread-per-connection HTTP/1.1 registry on loopback serving fixed bodies.
/// Stalled connections are held until the registry is dropped.
pub(crate) struct FakeRegistry {
    pub(crate) port: u16,
    bodies: Bodies,
    released: Arc<AtomicBool>,
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.released.store(true, Ordering::Relaxed);
    }
}

fn hold(released: &AtomicBool) {
    while !released.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl FakeRegistry {
    pub(crate) fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let bodies: Bodies = Default::default();
        let released = Arc::new(AtomicBool::new(false));
        let (b, rel) = (bodies.clone(), released.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let (b, rel) = (b.clone(), rel.clone());
                std::thread::spawn(move || {
                    let Ok(clone) = s.try_clone() else { return };
                    let mut r = BufReader::new(clone);
                    let mut line = String::new();
                    if r.read_line(&mut line).is_err() {
                        return;
                    }
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                            break;
                        }
                    }
                    let path = line.split(' ').nth(1).unwrap_or_default().to_string();
                    let found = b.lock().unwrap().get(&path).cloned();
                    let Some((body, how)) = found else {
                        let _ = s.write_all(
                            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        );
                        return;
                    };
                    if let Serve::Silent = how {
                        return hold(&rel);
                    }
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    if s.write_all(head.as_bytes()).is_err() {
                        return;
                    }
                    match how {
                        Serve::Whole => {
                            let _ = s.write_all(&body);
                        }
                        Serve::StallAfter(n) => {
                            let _ = s.write_all(&body[..n.min(body.len())]);
                            let _ = s.flush();
                            hold(&rel);
                        }
                        Serve::Trickle(n, every) => {
                            for c in body.chunks(n) {
                                if s.write_all(c).is_err() {
                                    return;
                                }
                                std::thread::sleep(every);
                            }
                        }
                        Serve::Silent => {}
                    }
                });
            }
        });
        Self {
            port,
            bodies,
            released,
        }
    }

    pub(crate) fn put(&self, path: String, body: Vec<u8>, how: Serve) {
        self.bodies.lock().unwrap().insert(path, (body, how));
    }

    pub(crate) fn set(&self, path: &str, how: Serve) {
        if let Some(e) = self.bodies.lock().unwrap().get_mut(path) {
            e.1 = how;
        }
    }
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A signed one-layer module (uncompressed, `size` bytes of file content) served by
/// `reg` under `modules/NAME`.
pub(crate) struct SignedModule {
    pub(crate) repo: Repository,
    pub(crate) digest: String,
    pub(crate) layer: Descriptor,
    pub(crate) layer_path: String,
    pub(crate) trust_pem: String,
    pub(crate) keys: Vec<TrustKey>,
}

pub(crate) fn signed_module(reg: &FakeRegistry, name: &str, size: usize) -> SignedModule {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("usr/bin")).unwrap();
    std::fs::write(src.join("usr/bin/tool"), pseudo_random(size, 7)).unwrap();
    let scratch = ObjectStore::open(&dir.path().join("scratch")).unwrap();
    let opts = BuildOptions {
        compression: LayerCompression::None,
        ..Default::default()
    };
    let built = build_module(&src, &opts, &scratch).unwrap();
    let config = br#"{}"#.to_vec();
    let repo_name = format!("modules/{name}");
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": super::registry::OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                   "digest": sha(&config), "size": config.len()},
        "layers": [{"mediaType": built.layer_media_type, "digest": built.layer_digest,
                    "size": built.layer.len()}],
        "annotations": {COMPOSEFS_DIGEST_ANNOTATION: built.image_digest.to_string()},
    });
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let digest = sha(&manifest);
    // The cosign simple-signing payload and its signature manifest.
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let kp =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let payload = format!(
        r#"{{"critical":{{"identity":{{"docker-reference":"{repo_name}"}},"image":{{"docker-manifest-digest":"{digest}"}},"type":"{COSIGN_SIGNATURE_TYPE}"}},"optional":null}}"#
    )
    .into_bytes();
    let sig = kp.sign(&rng, &payload).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let sig_manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": super::registry::OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                   "digest": sha(&config), "size": config.len()},
        "layers": [{"mediaType": SIMPLESIGNING_MEDIA_TYPE, "digest": sha(&payload),
                    "size": payload.len(),
                    "annotations": {SIGNATURE_ANNOTATION: b64.encode(sig.as_ref())}}],
    });
    let sig_manifest = serde_json::to_vec(&sig_manifest).unwrap();
    // SubjectPublicKeyInfo of a P-256 point, as cosign.pub carries it.
    let mut spki = hex::decode("3059301306072a8648ce3d020106082a8648ce3d030107034200").unwrap();
    spki.extend_from_slice(kp.public_key().as_ref());
    let trust_pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        b64.encode(&spki)
    );
    let keys = super::signature::parse_trust_keys(std::slice::from_ref(&trust_pem)).unwrap();
    let base = format!("/v2/{repo_name}");
    let layer_path = format!("{base}/blobs/{}", built.layer_digest);
    reg.put(format!("{base}/manifests/{digest}"), manifest, Serve::Whole);
    reg.put(
        format!("{base}/manifests/{}", signature_tag(&digest)),
        sig_manifest,
        Serve::Whole,
    );
    reg.put(
        format!("{base}/blobs/{}", sha(&config)),
        config,
        Serve::Whole,
    );
    reg.put(
        format!("{base}/blobs/{}", sha(&payload)),
        payload,
        Serve::Whole,
    );
    let layer = Descriptor {
        media_type: built.layer_media_type.into(),
        digest: built.layer_digest.clone(),
        size: built.layer.len() as u64,
        annotations: Default::default(),
    };
    reg.put(layer_path.clone(), built.layer, Serve::Whole);
    SignedModule {
        repo: format!("127.0.0.1:{}/{repo_name}", reg.port)
            .parse()
            .unwrap(),
        digest,
        layer,
        layer_path,
        trust_pem,
        keys,
    }
}

pub(crate) fn client(stall: Duration) -> RegistryClient {
    RegistryClient::new(RegistryOptions {
        allow_http_loopback: true,
        stall_timeout: Some(stall),
        read_timeout: Some(stall),
        ..Default::default()
    })
    .unwrap()
}

/// Runs `f` on a thread and waits at most `limit` for it: today's code would hang.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("still waiting on the registry after {limit:?}"))
}

fn pull_in(m: &SignedModule, stall: Duration, store: &Path) -> Result<PullReport, PullError> {
    let store = ObjectStore::open(store).unwrap();
    pull_module(&client(stall), &m.repo, &m.digest, &m.keys, None, &store)
}

const STALL: Duration = Duration::from_secs(1);
const SIZE: usize = 3_000_000;

#[test]
fn a_layer_that_stalls_mid_body_fails_the_pull_within_the_stall_timeout() {
    let reg = FakeRegistry::start();
    let m = signed_module(&reg, "stall", SIZE);
    reg.set(&m.layer_path, Serve::StallAfter(200_000));
    let store = tempfile::tempdir().unwrap();
    let (repo, digest, keys) = (m.repo.clone(), m.digest.clone(), m.keys.clone());
    let path = store.path().to_path_buf();
    let t = Instant::now();
    let r = within(Duration::from_secs(20), move || {
        let store = ObjectStore::open(&path).unwrap();
        pull_module(&client(STALL), &repo, &digest, &keys, None, &store)
    });
    let took = t.elapsed();
    let e = r.unwrap_err();
    assert_eq!(e.code(), ErrorCode::RegistryUnreachable, "{e:?}");
    let msg = crate::error_chain(&e);
    for part in [
        format!("127.0.0.1:{}", reg.port),
        m.layer.digest.clone(),
        "stalled".into(),
    ] {
        assert!(msg.contains(&part), "{part:?} not in {msg}");
    }
    eprintln!("failed after {took:?}: {msg}");
    assert!(took >= STALL && took < STALL * 5, "failed after {took:?}");
}

#[test]
fn a_registry_that_never_answers_a_blob_request_fails_within_the_stall_timeout() {
    let reg = FakeRegistry::start();
    let m = signed_module(&reg, "silent", 10_000);
    reg.set(&m.layer_path, Serve::Silent);
    let (repo, layer) = (m.repo.clone(), m.layer.clone());
    let t = Instant::now();
    let e = within(Duration::from_secs(20), move || {
        client(STALL).blob(&repo, &layer).map(drop)
    })
    .unwrap_err();
    assert_eq!(e.code(), ErrorCode::RegistryUnreachable, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("127.0.0.1:{}", reg.port)) && msg.contains(&m.layer.digest),
        "{msg}"
    );
    assert!(t.elapsed() < STALL * 5, "{:?}", t.elapsed());
}

#[test]
fn a_manifest_that_stalls_mid_body_is_registry_unreachable_naming_the_registry() {
    let reg = FakeRegistry::start();
    let m = signed_module(&reg, "manifest", 10_000);
    let path = format!("/v2/modules/manifest/manifests/{}", m.digest);
    reg.set(&path, Serve::StallAfter(20));
    let store = tempfile::tempdir().unwrap();
    let e = within(Duration::from_secs(20), {
        let path = store.path().to_path_buf();
        let (repo, digest, keys) = (m.repo.clone(), m.digest.clone(), m.keys.clone());
        move || {
            let store = ObjectStore::open(&path).unwrap();
            pull_module(&client(STALL), &repo, &digest, &keys, None, &store)
        }
    })
    .unwrap_err();
    assert_eq!(e.code(), ErrorCode::RegistryUnreachable, "{e:?}");
    let msg = crate::error_chain(&e);
    assert!(
        msg.contains(&format!("127.0.0.1:{}", reg.port)) && msg.contains(&m.digest),
        "{msg}"
    );
}

#[test]
fn a_slow_but_moving_layer_and_a_busy_consumer_still_finish() {
    let reg = FakeRegistry::start();
    let m = signed_module(&reg, "slow", SIZE);
    // Longer in total than the stall timeout, never silent for as long.
    let chunks = 10;
    reg.set(
        &m.layer_path,
        Serve::Trickle(m.layer.size as usize / chunks + 1, STALL / 4),
    );
    let store = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let report = pull_in(&m, STALL, store.path()).unwrap();
    assert!(t.elapsed() > STALL * 2, "{:?}", t.elapsed());
    assert!(report.bytes_received >= m.layer.size);

    // The consumer stops reading for longer than the stall timeout (a big file being
    // hashed or written): the bytes wait for it, and the blob still checks out.
    reg.set(&m.layer_path, Serve::Whole);
    let mut r = client(STALL).blob(&m.repo, &m.layer).unwrap();
    let mut head = vec![0u8; 100_000];
    r.read_exact(&mut head).unwrap();
    std::thread::sleep(STALL * 5 / 2);
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert_eq!(head.len() + rest.len(), m.layer.size as usize);
    let _ = &m.trust_pem;
}

/// A drain takes over from a reconcile stuck on a stalled registry: cancelling it
/// ends it at once with `task_cancelled`, before anything is mounted, well within the
/// (long) stall timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_stuck_on_a_stalled_registry_gives_up_when_cancelled() {
    use super::module_runtime::{ModuleRuntime, KIND_RUNTIME};
    use super::mount::RecordingMounter;
    use crate::module_reconcile::ModuleReconciler;
    use powernode_proto::node::{DesiredModule, DesiredModulesResponse};

    let reg = FakeRegistry::start();
    let m = signed_module(&reg, "stuck", 100_000);
    reg.set(&m.layer_path, Serve::StallAfter(1_000));
    let dir = tempfile::tempdir().unwrap();
    let mounter = Arc::new(RecordingMounter::default());
    let runtime = Arc::new(ModuleRuntime::new(
        ObjectStore::open(&dir.path().join("store")).unwrap(),
        RegistryOptions {
            allow_http_loopback: true,
            stall_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        },
        mounter.clone(),
        dir.path().join("run"),
        vec![],
    ));
    let desired = DesiredModulesResponse {
        modules: vec![DesiredModule {
            name: "stuck".into(),
            version: "1".into(),
            repository: format!("127.0.0.1:{}/modules/stuck", reg.port),
            digest: m.digest.clone(),
            kind: KIND_RUNTIME.into(),
        }],
        trust_keys: vec![m.trust_pem.clone()],
    };
    let r = runtime.clone();
    let work = tokio::spawn(async move { r.reconcile(&desired).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!work.is_finished(), "the pull should be stuck");
    let t = Instant::now();
    runtime.cancel_in_flight();
    let e = tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .expect("the cancelled reconcile ended")
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::TaskCancelled, "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(mounter.calls.lock().unwrap().is_empty(), "nothing mounted");
    assert!(runtime.running().is_empty());
}
