//! Interop with the real tools against the embedded registry and the publisher:
//! `oras push` / `oras pull` by digest, `cosign verify --key` (offline, no
//! transparency log) on a module the server signed, `cosign sign --key` pushing to
//! our registry, and publishing to Debian's `docker-registry` on 127.0.0.1.
//!
//! Tools come from `scripts/tools` (cosign, oras in `cache/root/usr/bin`) and apt
//! (`docker-registry`). A missing tool fails its test, naming the tool; nothing is
//! faked and nothing passes unchecked.

mod common;

use std::path::Path;
use std::time::Duration;

use common::tools::{run, tool};
use common::TestServer;
use reqwest::Method;
use serde_json::Value;

/// A client for plain-HTTP registries (reqwest needs a TLS provider even so).
fn plain_http() -> reqwest::Client {
    let ca = rcgen::CertificateParams::new(vec!["unused.invalid".to_string()])
        .unwrap()
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap()
        .pem();
    powernode_stub::cli::client::pinned_client(&ca, None).unwrap()
}

fn module_folder() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("etc")).unwrap();
    std::fs::create_dir_all(d.path().join("usr/lib")).unwrap();
    std::fs::write(d.path().join("etc/motd"), "interop\n").unwrap();
    std::fs::write(d.path().join("usr/lib/data.bin"), vec![42u8; 70_000]).unwrap();
    d
}

async fn publish(ts: &TestServer, src: &Path, registry: Option<String>) -> Value {
    let http = powernode_stub::cli::client::pinned_client(&ts.ca_pem(), None).unwrap();
    let args = powernode_stub::cli::publish::PublishArgs {
        source: src.to_path_buf(),
        name: "base".into(),
        version: "1.0.0".into(),
        kind: "root".into(),
        registry,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oras_push_then_pull_by_digest() {
    let oras = tool("oras");
    let ts = TestServer::start().await;
    let work = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();
    std::fs::write(work.path().join("payload.bin"), &data).unwrap();
    let ca = ts.dir.path().join("ca.pem");
    let env = [("SSL_CERT_FILE", ca.to_str().unwrap())];
    let reference = format!("{}/test/art:v1", ts.host());
    let tok = ts.admin_token();
    // Without credentials the push is refused.
    let (ok, _, err) = run(
        &oras,
        &["push", &reference, "payload.bin:application/octet-stream"],
        &env,
        work.path(),
    )
    .await;
    assert!(!ok, "anonymous push must fail: {err}");
    let (ok, out, err) = run(
        &oras,
        &[
            "push",
            "--username",
            "x",
            "--password",
            &tok,
            &reference,
            "payload.bin:application/octet-stream",
        ],
        &env,
        work.path(),
    )
    .await;
    assert!(ok, "oras push: {out}\n{err}");
    let digest = out
        .lines()
        .find_map(|l| l.strip_prefix("Digest: "))
        .expect("oras prints the digest")
        .trim()
        .to_string();
    let by_digest = format!("{}/test/art@{digest}", ts.host());
    // Reads need credentials too: anonymous, the pull is refused.
    let (ok, _, err) = run(
        &oras,
        &["pull", "-o", "anonymous", &by_digest],
        &env,
        work.path(),
    )
    .await;
    assert!(!ok, "anonymous pull must fail: {err}");
    // oras saw the Basic challenge and had nothing to answer it with.
    assert!(err.contains("credential"), "{err}");
    let (ok, out, err) = run(
        &oras,
        &[
            "pull",
            "--username",
            "x",
            "--password",
            &tok,
            "-o",
            "pulled",
            &by_digest,
        ],
        &env,
        work.path(),
    )
    .await;
    assert!(ok, "oras pull: {out}\n{err}");
    assert!(std::fs::read(work.path().join("pulled/payload.bin")).unwrap() == data);
    // Our own client sees the manifest oras pushed, under the same digest.
    let (s, v) = {
        let http = powernode_stub::cli::client::pinned_client(&ts.ca_pem(), None).unwrap();
        let r = http
            .get(format!("{}/v2/test/art/manifests/v1", ts.url()))
            .bearer_auth(&tok)
            .send()
            .await
            .unwrap();
        let d = r
            .headers()
            .get("docker-content-digest")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        (r.status(), d)
    };
    assert_eq!((s.as_u16(), v), (200, digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cosign_verifies_a_published_module_offline() {
    let cosign = tool("cosign");
    let ts = TestServer::start().await;
    let src = module_folder();
    let p = publish(&ts, src.path(), None).await;
    let digest = p["digest"].as_str().unwrap();
    let work = tempfile::tempdir().unwrap();
    let ca = ts.dir.path().join("ca.pem");
    let key = ts.dir.path().join("module-signing.pub");
    let env = [("SSL_CERT_FILE", ca.to_str().unwrap())];
    let tok = ts.admin_token();
    for reference in [
        format!("{}/modules/base@{digest}", ts.host()),
        format!("{}/modules/base:1.0.0", ts.host()),
    ] {
        let (ok, out, err) = run(
            &cosign,
            &[
                "verify",
                "--registry-username",
                "x",
                "--registry-password",
                &tok,
                "--key",
                key.to_str().unwrap(),
                "--insecure-ignore-tlog=true",
                "-a",
                "org.powernode.module.name=base",
                "-a",
                "org.powernode.module.version=1.0.0",
                &reference,
            ],
            &env,
            work.path(),
        )
        .await;
        assert!(ok, "cosign verify {reference}: {out}\n{err}");
        assert!(out.contains(digest), "{out}");
    }
    // The signed payload binds the version: another one does not verify.
    let (ok, _, err) = run(
        &cosign,
        &[
            "verify",
            "--key",
            key.to_str().unwrap(),
            "--insecure-ignore-tlog=true",
            "-a",
            "org.powernode.module.version=2.0.0",
            &format!("{}/modules/base@{digest}", ts.host()),
        ],
        &env,
        work.path(),
    )
    .await;
    assert!(!ok, "another version's annotation must not verify: {err}");
    // Another key does not verify it.
    let (ok, _, err) = run(
        &cosign,
        &["generate-key-pair"],
        &[("COSIGN_PASSWORD", "")],
        work.path(),
    )
    .await;
    assert!(ok, "generate-key-pair: {err}");
    let (ok, _, err) = run(
        &cosign,
        &[
            "verify",
            "--registry-username",
            "x",
            "--registry-password",
            &tok,
            "--key",
            "cosign.pub",
            "--insecure-ignore-tlog=true",
            &format!("{}/modules/base@{digest}", ts.host()),
        ],
        &env,
        work.path(),
    )
    .await;
    assert!(!ok, "a foreign key must not verify");
    assert!(err.contains("no matching signatures"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cosign_sign_pushes_its_signature_to_our_registry() {
    let cosign = tool("cosign");
    let ts = TestServer::start().await;
    let src = module_folder();
    let p = publish(&ts, src.path(), None).await;
    let digest = p["digest"].as_str().unwrap();
    let work = tempfile::tempdir().unwrap();
    let ca = ts.dir.path().join("ca.pem");
    let tok = ts.admin_token();
    let (ok, _, err) = run(
        &cosign,
        &["generate-key-pair"],
        &[("COSIGN_PASSWORD", "")],
        work.path(),
    )
    .await;
    assert!(ok, "{err}");
    let env = [
        ("SSL_CERT_FILE", ca.to_str().unwrap()),
        ("COSIGN_PASSWORD", ""),
    ];
    let reference = format!("{}/modules/base@{digest}", ts.host());
    let (ok, out, err) = run(
        &cosign,
        &[
            "sign",
            "--key",
            "cosign.key",
            "--tlog-upload=false",
            "--yes",
            "--registry-username",
            "x",
            "--registry-password",
            &tok,
            &reference,
        ],
        &env,
        work.path(),
    )
    .await;
    assert!(ok, "cosign sign: {out}\n{err}");
    // Both signatures now sit under the .sig tag; either key verifies.
    for key in [
        work.path().join("cosign.pub"),
        ts.dir.path().join("module-signing.pub"),
    ] {
        let (ok, out, err) = run(
            &cosign,
            &[
                "verify",
                "--registry-username",
                "x",
                "--registry-password",
                &tok,
                "--key",
                key.to_str().unwrap(),
                "--insecure-ignore-tlog=true",
                &reference,
            ],
            &env,
            work.path(),
        )
        .await;
        assert!(ok, "verify with {}: {out}\n{err}", key.display());
    }
    let v = ts
        .ok(Method::GET, "/api/v1/system/module_publications", None)
        .await;
    assert_eq!(v["publications"].as_array().unwrap().len(), 1);
}

/// Debian's docker-registry on 127.0.0.1:<free port>, killed on drop.
struct DockerRegistry {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for DockerRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl DockerRegistry {
    async fn start(bin: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = dir.path().join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = std::process::Command::new(bin)
            .arg("serve")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let reg = Self {
            child,
            port,
            _dir: dir,
        };
        let http = plain_http();
        for _ in 0..100 {
            if let Ok(r) = http
                .get(format!("http://127.0.0.1:{port}/v2/"))
                .send()
                .await
            {
                if r.status().is_success() {
                    return reg;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("docker-registry did not come up on port {port}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_to_debian_docker_registry() {
    let bin = tool("docker-registry");
    let ts = TestServer::start().await;
    let dr = DockerRegistry::start(&bin).await;
    let src = module_folder();
    let url = format!("http://127.0.0.1:{}", dr.port);
    let ext = publish(&ts, src.path(), Some(url.clone())).await;
    assert_eq!(ext["registry"], format!("127.0.0.1:{}", dr.port));
    // The same folder gives the same digests in the embedded registry.
    let emb = publish(&ts, src.path(), None).await;
    assert_eq!(ext["digest"], emb["digest"]);
    assert_eq!(ext["composefs_digest"], emb["composefs_digest"]);
    let digest = ext["digest"].as_str().unwrap();
    let http = plain_http();
    let r = http
        .get(format!("{url}/v2/modules/base/manifests/{digest}"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let m: Value = r.json().await.unwrap();
    assert_eq!(
        m["annotations"][powernode_proto::node::COMPOSEFS_DIGEST_ANNOTATION],
        ext["composefs_digest"]
    );
    let tags: Value = http
        .get(format!("{url}/v2/modules/base/tags/list"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sig_tag = format!("sha256-{}.sig", &digest[7..]);
    assert!(
        tags["tags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == sig_tag.as_str()),
        "{tags}"
    );
    // cosign verifies the signature in that registry.
    {
        let cosign = tool("cosign");
        let work = tempfile::tempdir().unwrap();
        let key = ts.dir.path().join("module-signing.pub");
        let (ok, out, err) = run(
            &cosign,
            &[
                "verify",
                "--allow-http-registry",
                "--allow-insecure-registry",
                "--key",
                key.to_str().unwrap(),
                "--insecure-ignore-tlog=true",
                &format!("127.0.0.1:{}/modules/base@{digest}", dr.port),
            ],
            &[],
            work.path(),
        )
        .await;
        assert!(ok, "cosign verify on docker-registry: {out}\n{err}");
    }
}
