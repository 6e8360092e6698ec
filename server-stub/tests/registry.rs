//! The embedded OCI registry, through the real TLS listener: auth, monolithic and
//! chunked uploads, digest checks, size bound, manifests by tag and digest, error
//! codes; and `publish-module` end to end (folder -> signed publication -> desired
//! modules and drift).

mod common;

use base64::Engine as _;
use common::sha;
use common::{FakeNode, TestServer};
use powernode_proto::node::COMPOSEFS_DIGEST_ANNOTATION;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::Digest as _;

struct Reg {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Reg {
    fn new(ts: &TestServer) -> Self {
        Self {
            http: powernode_stub::cli::client::pinned_client(&ts.ca_pem(), None).unwrap(),
            base: ts.url(),
            token: ts.admin_token(),
        }
    }

    fn req(&self, m: Method, path: &str, auth: bool) -> reqwest::RequestBuilder {
        let r = self.http.request(m, format!("{}{path}", self.base));
        if auth {
            r.bearer_auth(&self.token)
        } else {
            r
        }
    }

    async fn send(
        &self,
        r: reqwest::RequestBuilder,
    ) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
        let resp = r.send().await.unwrap();
        let s = resp.status();
        let h = resp.headers().clone();
        (s, h, resp.bytes().await.unwrap().to_vec())
    }

    async fn code(&self, r: reqwest::RequestBuilder) -> (StatusCode, String) {
        let (s, _, b) = self.send(r).await;
        let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
        (s, v["errors"][0]["code"].as_str().unwrap_or("").to_string())
    }

    async fn push_mono(&self, repo: &str, data: &[u8]) -> StatusCode {
        let (s, _, _) = self
            .send(
                self.req(
                    Method::POST,
                    &format!("/v2/{repo}/blobs/uploads/?digest={}", sha(data)),
                    true,
                )
                .body(data.to_vec()),
            )
            .await;
        s
    }
}

fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

#[tokio::test]
async fn registry_auth_uploads_manifests_and_errors() {
    let ts = TestServer::start().await;
    let r = Reg::new(&ts);

    // Base: credentials challenge for clients that want to push; API version header.
    let (s, h, _) = r.send(r.req(Method::GET, "/v2/", false)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(header(&h, "www-authenticate").starts_with("Basic"));
    assert_eq!(
        header(&h, "docker-distribution-api-version"),
        "registry/2.0"
    );
    let (s, _, _) = r.send(r.req(Method::GET, "/v2/", true)).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = r
        .send(
            r.req(Method::GET, "/v2/", false)
                .basic_auth("anyone", Some(&r.token)),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = r
        .send(
            r.req(Method::GET, "/v2/", false)
                .basic_auth("anyone", Some("wrong")),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // Writes need the token.
    let (s, c) = r
        .code(r.req(Method::POST, "/v2/m/a/blobs/uploads/", false))
        .await;
    assert_eq!((s, c.as_str()), (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"));
    let (s, c) = r
        .code(
            r.req(Method::POST, "/v2/m/a/blobs/uploads/", false)
                .bearer_auth("nope"),
        )
        .await;
    assert_eq!((s, c.as_str()), (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"));

    // Monolithic, larger than the JSON body limit (1 MiB).
    let big: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    assert_eq!(r.push_mono("m/a", &big).await, StatusCode::CREATED);
    let (s, h, body) = r
        .send(r.req(Method::HEAD, &format!("/v2/m/a/blobs/{}", sha(&big)), true))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(header(&h, "content-length"), big.len().to_string());
    assert_eq!(header(&h, "docker-content-digest"), sha(&big));
    assert!(body.is_empty());
    let (s, _, body) = r
        .send(r.req(Method::GET, &format!("/v2/m/a/blobs/{}", sha(&big)), true))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(body == big, "blob read back differs");

    // Ranges (resuming a pull).
    let (s, h, body) = r
        .send(
            r.req(Method::GET, &format!("/v2/m/a/blobs/{}", sha(&big)), true)
                .header("range", "bytes=1000-1999"),
        )
        .await;
    assert_eq!(s, StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(&h, "content-range"),
        format!("bytes 1000-1999/{}", big.len())
    );
    assert!(body == big[1000..2000]);
    let (s, _, body) = r
        .send(
            r.req(Method::GET, &format!("/v2/m/a/blobs/{}", sha(&big)), true)
                .header("range", format!("bytes={}-", big.len() - 10)),
        )
        .await;
    assert_eq!(s, StatusCode::PARTIAL_CONTENT);
    assert!(body == big[big.len() - 10..]);
    let (s, _, _) = r
        .send(
            r.req(Method::GET, &format!("/v2/m/a/blobs/{}", sha(&big)), true)
                .header("range", format!("bytes={}-", big.len())),
        )
        .await;
    assert_eq!(s, StatusCode::RANGE_NOT_SATISFIABLE);

    // Digest mismatch: refused, nothing stored under either name.
    let (s, c) = r
        .code(
            r.req(
                Method::POST,
                &format!("/v2/m/a/blobs/uploads/?digest={}", sha(b"other")),
                true,
            )
            .body(b"content".to_vec()),
        )
        .await;
    assert_eq!((s, c.as_str()), (StatusCode::BAD_REQUEST, "DIGEST_INVALID"));
    for d in [sha(b"other"), sha(b"content")] {
        let (s, c) = r
            .code(r.req(Method::GET, &format!("/v2/m/a/blobs/{d}"), true))
            .await;
        assert_eq!((s, c.as_str()), (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"));
    }

    // Chunked: POST, PATCH x2 with Content-Range, a wrong range refused, PUT ?digest=.
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let (s, h, _) = r
        .send(r.req(Method::POST, "/v2/m/b/blobs/uploads/", true))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let loc = header(&h, "location").to_string();
    assert!(loc.starts_with("/v2/m/b/blobs/uploads/"), "{loc}");
    let (a, b) = data.split_at(70_000);
    let (s, h, _) = r
        .send(
            r.req(Method::PATCH, &loc, true)
                .header("content-range", format!("0-{}", a.len() - 1))
                .body(a.to_vec()),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(header(&h, "range"), format!("0-{}", a.len() - 1));
    let (s, c) = r
        .code(
            r.req(Method::PATCH, &loc, true)
                .header("content-range", "5-10")
                .body(vec![0u8; 6]),
        )
        .await;
    assert_eq!(
        (s, c.as_str()),
        (StatusCode::RANGE_NOT_SATISFIABLE, "BLOB_UPLOAD_INVALID")
    );
    let (s, _, _) = r
        .send(
            r.req(Method::PATCH, &loc, true)
                .header("content-range", format!("{}-{}", a.len(), data.len() - 1))
                .body(b.to_vec()),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (s, h, _) = r.send(r.req(Method::GET, &loc, true)).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(header(&h, "range"), format!("0-{}", data.len() - 1));
    let (s, h, _) = r
        .send(r.req(Method::PUT, &format!("{loc}?digest={}", sha(&data)), true))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(header(&h, "docker-content-digest"), sha(&data));
    let (_, _, body) = r
        .send(r.req(Method::GET, &format!("/v2/m/b/blobs/{}", sha(&data)), true))
        .await;
    assert!(body == data);
    let (s, c) = r.code(r.req(Method::PATCH, &loc, true).body(vec![1])).await;
    assert_eq!(
        (s, c.as_str()),
        (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN")
    );
    // A chunked upload closed with the wrong digest.
    let (_, h, _) = r
        .send(r.req(Method::POST, "/v2/m/b/blobs/uploads/", true))
        .await;
    let loc2 = header(&h, "location").to_string();
    let (s, c) = r
        .code(
            r.req(Method::PUT, &format!("{loc2}?digest={}", sha(b"x")), true)
                .body(b"y".to_vec()),
        )
        .await;
    assert_eq!((s, c.as_str()), (StatusCode::BAD_REQUEST, "DIGEST_INVALID"));

    // Cross-repository mount of a blob we hold: 201; of one we do not: 202 (fallback).
    let (s, _, _) = r
        .send(r.req(
            Method::POST,
            &format!("/v2/m/c/blobs/uploads/?mount={}&from=m/b", sha(&data)),
            true,
        ))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _, _) = r
        .send(r.req(
            Method::POST,
            &format!("/v2/m/c/blobs/uploads/?mount={}&from=m/b", sha(b"zz")),
            true,
        ))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);

    // Manifests.
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    assert_eq!(r.push_mono("m/b", config).await, StatusCode::CREATED);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(&data), "size": data.len()}],
    }))
    .unwrap();
    let mdigest = sha(&manifest);
    // Unknown repo / unknown tag / unknown digest.
    let (s, c) = r
        .code(r.req(Method::GET, "/v2/m/b/manifests/v1", true))
        .await;
    assert_eq!((s, c.as_str()), (StatusCode::NOT_FOUND, "NAME_UNKNOWN"));
    let (s, c) = r
        .code(
            r.req(Method::PUT, "/v2/m/b/manifests/v1", false)
                .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                .body(manifest.clone()),
        )
        .await;
    assert_eq!((s, c.as_str()), (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"));
    let (s, h, _) = r
        .send(
            r.req(Method::PUT, "/v2/m/b/manifests/v1", true)
                .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                .body(manifest.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(header(&h, "docker-content-digest"), mdigest);
    for reference in ["v1", mdigest.as_str()] {
        let (s, h, body) = r
            .send(r.req(Method::GET, &format!("/v2/m/b/manifests/{reference}"), true))
            .await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        assert!(body == manifest, "manifest bytes differ");
        assert_eq!(
            header(&h, "content-type"),
            "application/vnd.oci.image.manifest.v1+json"
        );
        assert_eq!(header(&h, "docker-content-digest"), mdigest);
        let (s, h, _) = r
            .send(r.req(
                Method::HEAD,
                &format!("/v2/m/b/manifests/{reference}"),
                true,
            ))
            .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(header(&h, "content-length"), manifest.len().to_string());
    }
    let (s, c) = r
        .code(r.req(Method::GET, "/v2/m/b/manifests/v9", true))
        .await;
    assert_eq!((s, c.as_str()), (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"));
    let (s, c) = r
        .code(r.req(
            Method::GET,
            &format!("/v2/m/b/manifests/{}", sha(b"no")),
            true,
        ))
        .await;
    assert_eq!((s, c.as_str()), (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"));
    // The manifest belongs to m/b only.
    let (s, _) = r
        .code(r.req(Method::GET, &format!("/v2/m/a/manifests/{mdigest}"), true))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // By digest: must hash to it.
    let (s, c) = r
        .code(
            r.req(
                Method::PUT,
                &format!("/v2/m/b/manifests/{}", sha(b"x")),
                true,
            )
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(manifest.clone()),
        )
        .await;
    assert_eq!((s, c.as_str()), (StatusCode::BAD_REQUEST, "DIGEST_INVALID"));
    // A manifest naming a blob we do not hold.
    let dangling = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(b"absent"), "size": 6},
        "layers": [],
    }))
    .unwrap();
    let (s, c) = r
        .code(
            r.req(Method::PUT, "/v2/m/b/manifests/v2", true)
                .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                .body(dangling),
        )
        .await;
    assert_eq!(
        (s, c.as_str()),
        (StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN")
    );
    let (s, c) = r
        .code(
            r.req(Method::PUT, "/v2/m/b/manifests/v3", true)
                .header("content-type", "application/json")
                .body("{nope"),
        )
        .await;
    assert_eq!(
        (s, c.as_str()),
        (StatusCode::BAD_REQUEST, "MANIFEST_INVALID")
    );
    // An index over the manifest.
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest, "size": manifest.len()}],
    }))
    .unwrap();
    let (s, _, _) = r
        .send(
            r.req(Method::PUT, "/v2/m/b/manifests/multi", true)
                .header("content-type", "application/vnd.oci.image.index.v1+json")
                .body(index),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);

    let (s, _, body) = r.send(r.req(Method::GET, "/v2/m/b/tags/list", true)).await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v, json!({"name": "m/b", "tags": ["multi", "v1"]}));
    let (s, c) = r.code(r.req(Method::GET, "/v2/nope/tags/list", true)).await;
    assert_eq!((s, c.as_str()), (StatusCode::NOT_FOUND, "NAME_UNKNOWN"));
    let (s, c) = r
        .code(r.req(Method::GET, "/v2/UPPER/tags/list", true))
        .await;
    assert_eq!((s, c.as_str()), (StatusCode::BAD_REQUEST, "NAME_INVALID"));
    let (s, c) = r
        .code(r.req(Method::GET, "/v2/m/../../etc/blobs/sha256:00", true))
        .await;
    assert!(s.is_client_error(), "{s} {c}");

    // Blobs are on disk where the layout says.
    let hex = &sha(&data)[7..];
    let p = ts
        .dir
        .path()
        .join("registry/blobs/sha256")
        .join(&hex[..2])
        .join(hex);
    assert_eq!(std::fs::read(p).unwrap(), data);
}

#[tokio::test]
async fn uploads_are_bounded() {
    let ts = TestServer::start_with(|c| c.registry_max_blob_bytes = 100_000).await;
    let r = Reg::new(&ts);
    let data = vec![7u8; 150_000];
    let (s, c) = r
        .code(
            r.req(
                Method::POST,
                &format!("/v2/m/a/blobs/uploads/?digest={}", sha(&data)),
                true,
            )
            .body(data.clone()),
        )
        .await;
    assert_eq!(
        (s, c.as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "SIZE_INVALID")
    );
    assert_eq!(
        r.push_mono("m/a", &data[..90_000]).await,
        StatusCode::CREATED
    );
    // Temporary files of refused uploads are gone.
    let left: Vec<_> = std::fs::read_dir(ts.dir.path().join("registry/uploads"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // An upload left open by a stopped server: its file goes at the next start, and
    // the session is unknown.
    let mut ts = ts;
    let (s, h, _) = r
        .send(r.req(Method::POST, "/v2/m/a/blobs/uploads/", true))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let loc = header(&h, "location").to_string();
    let (s, _, _) = r
        .send(r.req(Method::PATCH, &loc, true).body(vec![1u8; 500]))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(
        std::fs::read_dir(ts.dir.path().join("registry/uploads"))
            .unwrap()
            .count(),
        1
    );
    ts.restart().await;
    assert_eq!(
        std::fs::read_dir(ts.dir.path().join("registry/uploads"))
            .unwrap()
            .count(),
        0
    );
    let r = Reg::new(&ts);
    let (s, c) = r
        .code(r.req(Method::PATCH, &loc, true).body(vec![1u8; 5]))
        .await;
    assert_eq!(
        (s, c.as_str()),
        (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN")
    );
}

/// Push throughput of the embedded registry (figures only, never fails on time).
#[tokio::test]
async fn push_throughput_figure() {
    let ts = TestServer::start().await;
    let r = Reg::new(&ts);
    let chunk: Vec<u8> = (0..16 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let n = 16;
    let mut h = sha2::Sha256::new();
    for _ in 0..n {
        h.update(&chunk);
    }
    let digest = format!("sha256:{}", hex::encode(h.finalize()));
    let t = std::time::Instant::now();
    let (_, hd, _) = r
        .send(r.req(Method::POST, "/v2/bench/x/blobs/uploads/", true))
        .await;
    let loc = header(&hd, "location").to_string();
    for _ in 0..n {
        let (s, _, _) = r
            .send(r.req(Method::PATCH, &loc, true).body(chunk.clone()))
            .await;
        assert_eq!(s, StatusCode::ACCEPTED);
    }
    let (s, _, _) = r
        .send(r.req(Method::PUT, &format!("{loc}?digest={digest}"), true))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let secs = t.elapsed().as_secs_f64();
    let mib = (n * chunk.len()) as f64 / (1024.0 * 1024.0);
    eprintln!("FIGURE registry push: {mib:.0} MiB chunked (16 MiB PATCHes) in {secs:.2} s = {:.0} MiB/s (debug build, client in-process)", mib / secs);
    let t = std::time::Instant::now();
    let (s, _, body) = r
        .send(r.req(Method::GET, &format!("/v2/bench/x/blobs/{digest}"), true))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body.len(), n * chunk.len());
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "FIGURE registry pull: {mib:.0} MiB in {secs:.2} s = {:.0} MiB/s",
        mib / secs
    );
}

fn module_tree(root: &std::path::Path, variant: &str) {
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::write(root.join("etc/motd"), format!("hello {variant}\n")).unwrap();
    std::fs::write(root.join("usr/bin/tool"), vec![0x7f; 10_000]).unwrap();
    let _ = std::fs::remove_file(root.join("usr/bin/alias"));
    std::os::unix::fs::symlink("tool", root.join("usr/bin/alias")).unwrap();
}

#[tokio::test]
async fn publish_folder_signs_records_and_drives_desired_modules() {
    let ts = TestServer::start().await;
    let src = tempfile::tempdir().unwrap();
    module_tree(src.path(), "v1");
    let http = powernode_stub::cli::client::pinned_client(&ts.ca_pem(), None).unwrap();
    let args = powernode_stub::cli::publish::PublishArgs {
        source: src.path().to_path_buf(),
        name: "base".into(),
        version: "1.0.0".into(),
        kind: "root".into(),
        registry: None,
        folder: Default::default(),
    };
    let out = powernode_stub::cli::publish::publish_module(
        &ts.admin,
        http.clone(),
        &ts.url(),
        &ts.admin_token(),
        &args,
    )
    .await
    .unwrap();
    let p = &out["publication"];
    let digest = p["digest"].as_str().unwrap().to_string();
    let composefs = p["composefs_digest"].as_str().unwrap().to_string();
    assert!(
        digest.starts_with("sha256:") && composefs.starts_with("sha256:"),
        "{p}"
    );
    assert_eq!(p["repository"], "modules/base");
    assert_eq!(p["kind"], "root");

    // Same folder, same digests (reproducible), independent of when it is built.
    let again =
        powernode_stub::cli::publish::image_from_folder(src.path(), "base", "1.0.0").unwrap();
    assert_eq!(again.manifest_digest, digest);
    assert_eq!(again.composefs_digest, composefs);

    // The manifest carries the annotation; recompute the composefs digest from the
    // pulled layer with modfmt, as the node does.
    let r = Reg::new(&ts);
    let (s, _, manifest) = r
        .send(r.req(Method::GET, "/v2/modules/base/manifests/1.0.0", true))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(sha(&manifest), digest);
    let m: Value = serde_json::from_slice(&manifest).unwrap();
    assert_eq!(
        m["annotations"][COMPOSEFS_DIGEST_ANNOTATION],
        composefs.as_str()
    );
    assert_eq!(m["annotations"]["org.powernode.module.name"], "base");
    let layer = &m["layers"][0];
    let (_, _, layer_bytes) = r
        .send(r.req(
            Method::GET,
            &format!(
                "/v2/modules/base/blobs/{}",
                layer["digest"].as_str().unwrap()
            ),
            true,
        ))
        .await;
    let scratch = tempfile::tempdir().unwrap();
    let store = powernode_modfmt::store::ObjectStore::open(scratch.path()).unwrap();
    let (_, d) = powernode_modfmt::publish::image_from_layers(
        &store,
        [(layer["mediaType"].as_str().unwrap(), &layer_bytes[..])],
    )
    .unwrap();
    assert_eq!(d.to_string(), composefs);

    // The signature manifest at sha256-HEX.sig verifies with the exported key.
    let tag = format!("sha256-{}.sig", &digest[7..]);
    let (s, _, sig_manifest) = r
        .send(r.req(
            Method::GET,
            &format!("/v2/modules/base/manifests/{tag}"),
            true,
        ))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(sha(&sig_manifest), p["signature_digest"].as_str().unwrap());
    let sm: Value = serde_json::from_slice(&sig_manifest).unwrap();
    let l = &sm["layers"][0];
    assert_eq!(
        l["mediaType"],
        "application/vnd.dev.cosign.simplesigning.v1+json"
    );
    let (_, _, payload) = r
        .send(r.req(
            Method::GET,
            &format!("/v2/modules/base/blobs/{}", l["digest"].as_str().unwrap()),
            true,
        ))
        .await;
    let pv: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        pv["critical"]["image"]["docker-manifest-digest"],
        digest.as_str()
    );
    assert_eq!(pv["critical"]["type"], "cosign container image signature");
    // The signature binds the module's name and version (cosign's `-a` annotations)
    // and its repository path.
    assert_eq!(
        pv["optional"],
        json!({"org.powernode.module.name": "base", "org.powernode.module.version": "1.0.0"})
    );
    let host = ts.url().trim_start_matches("https://").to_string();
    assert_eq!(
        pv["critical"]["identity"]["docker-reference"],
        format!("{host}/modules/base")
    );
    let sig = base64::engine::general_purpose::STANDARD
        .decode(
            l["annotations"]["dev.cosignproject.cosign/signature"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    let pem = std::fs::read_to_string(ts.dir.path().join("module-signing.pub")).unwrap();
    assert!(powernode_stub::signing::verify_with_pem(
        &pem, &payload, &sig
    ));
    let other =
        powernode_stub::signing::SigningKey::load_or_create(tempfile::tempdir().unwrap().path())
            .unwrap();
    assert!(!powernode_stub::signing::verify_with_pem(
        other.public_pem(),
        &payload,
        &sig
    ));

    // Listed, and survives a restart.
    let v = ts
        .ok(Method::GET, "/api/v1/system/module_publications", None)
        .await;
    assert_eq!(v["publications"][0]["digest"], digest.as_str());

    // A claim the embedded registry contradicts is refused.
    let (s, _) = ts
        .call(
            Method::POST,
            "/api/v1/system/module_publications",
            Some(
                json!({"name":"base","version":"9","repository":"modules/base","digest": digest,
                "composefs_digest": sha(b"wrong"), "signature_digest": p["signature_digest"]}),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);

    // Templates name modules; desired modules answer the pinned digest and trust key.
    let v = ts
        .ok(
            Method::PUT,
            "/api/v1/system/templates/tmpl-edge-base/modules",
            Some(json!({"root_modules": ["base"], "runtime_modules": ["svc"]})),
        )
        .await;
    assert_eq!(v["template"]["root_modules"], json!(["base"]));
    let (_, inst, doc) = ts.provisioned("edge-mod").await;
    let mut node = FakeNode::new(doc, &ts.url());
    node.enroll().await;
    let (s, v) = node.get(powernode_proto::paths::DESIRED_MODULES).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let host = ts.url().trim_start_matches("https://").to_string();
    assert_eq!(
        v["modules"],
        json!([{"name":"base","version":"1.0.0","repository": format!("{host}/modules/base"),
                "digest": digest, "kind":"root"}])
    );
    assert_eq!(v["trust_keys"], json!([pem]));

    // Drift: nothing running -> attach with the pinned digest (svc was never
    // published: attach without one); an old digest running -> update.
    let d = ts
        .ok(
            Method::GET,
            &powernode_proto::paths::admin_drift(&inst),
            None,
        )
        .await;
    assert_eq!(d["drift"], true);
    let items = d["items"].as_array().unwrap();
    assert!(
        items.iter().any(|i| i["module"] == "base"
            && i["action"] == "attach"
            && i["desired_digest"] == digest.as_str()),
        "{d}"
    );
    assert!(
        items
            .iter()
            .any(|i| i["module"] == "svc" && i["action"] == "attach"),
        "{d}"
    );
    let (s, _) = node
        .post(
            powernode_proto::paths::HEARTBEAT,
            json!({"instance_id": node.doc.instance_id, "phase": "ready", "uptime_seconds": 5,
                   "agent_version": "t", "modules": [{"name":"base","version":"0.9","digest": sha(b"old")}]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let d = ts
        .ok(
            Method::GET,
            &powernode_proto::paths::admin_drift(&inst),
            None,
        )
        .await;
    assert!(
        d["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["module"] == "base"
                && i["action"] == "update"
                && i["running_digest"] == sha(b"old").as_str()),
        "{d}"
    );

    // v2 with one file changed: new digests, and desired follows the latest.
    module_tree(src.path(), "v2x");
    let args2 = powernode_stub::cli::publish::PublishArgs {
        version: "2.0.0".into(),
        ..args
    };
    let out2 = powernode_stub::cli::publish::publish_module(
        &ts.admin,
        http,
        &ts.url(),
        &ts.admin_token(),
        &args2,
    )
    .await
    .unwrap();
    let p2 = &out2["publication"];
    assert_ne!(p2["digest"], digest.as_str());
    assert_ne!(p2["composefs_digest"], composefs.as_str());
    // The unchanged 10 kB file's layer is new (one layer per version), but its
    // config and the v1 blobs stay; desired now pins v2.
    let (_, v) = node.get(powernode_proto::paths::DESIRED_MODULES).await;
    assert_eq!(v["modules"][0]["version"], "2.0.0");
    assert_eq!(v["modules"][0]["digest"], p2["digest"]);
    let v = ts
        .ok(Method::GET, "/api/v1/system/module_publications", None)
        .await;
    assert_eq!(v["publications"][0]["version"], "2.0.0", "newest first");
}

/// Writes an OCI image layout with `layers` (media type, bytes), bottom first.
fn write_layout(dir: &std::path::Path, layers: &[(&str, Vec<u8>)], diff_ids: &[String]) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| {
        let d = sha(b);
        std::fs::write(blobs.join(&d[7..]), b).unwrap();
        d
    };
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "config": {"Env": ["A=1"]},
    }))
    .unwrap();
    let config_digest = put(&config);
    let descs: Vec<Value> = layers
        .iter()
        .map(|(mt, b)| json!({"mediaType": mt, "digest": put(b), "size": b.len()}))
        .collect();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": descs,
        "annotations": {"org.opencontainers.image.source": "test"},
    }))
    .unwrap();
    let md = put(&manifest);
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": manifest.len()}]}))
        .unwrap(),
    )
    .unwrap();
    config_digest
}

#[tokio::test]
async fn publish_an_oci_layout_with_two_layers_and_a_whiteout() {
    use powernode_modfmt::publish::{write_layer_tar, BuildOptions};
    let ts = TestServer::start().await;
    // Lower layer (gzip): two files; upper layer (plain tar): replaces one, deletes the other.
    let lower = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(lower.path().join("etc")).unwrap();
    std::fs::write(lower.path().join("etc/keep"), "lower\n").unwrap();
    std::fs::write(lower.path().join("etc/gone"), "lower\n").unwrap();
    let upper = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(upper.path().join("etc")).unwrap();
    std::fs::write(upper.path().join("etc/keep"), "upper\n").unwrap();
    std::fs::write(upper.path().join("etc/.wh.gone"), "").unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let store = powernode_modfmt::store::ObjectStore::open(scratch.path()).unwrap();
    let built =
        powernode_modfmt::publish::build_module(lower.path(), &BuildOptions::default(), &store)
            .unwrap();
    let upper_tar = write_layer_tar(upper.path(), &BuildOptions::default(), Vec::new()).unwrap();
    let layers = vec![
        (built.layer_media_type, built.layer.clone()),
        ("application/vnd.oci.image.layer.v1.tar", upper_tar.clone()),
    ];
    let layout = tempfile::tempdir().unwrap();
    let config_digest = write_layout(
        layout.path(),
        &layers,
        &[built.diff_id.clone(), sha(&upper_tar)],
    );

    let (_, expected) = powernode_modfmt::publish::image_from_layers(
        &store,
        layers.iter().map(|(mt, b)| (*mt, &b[..])),
    )
    .unwrap();
    let (_, lower_only) =
        powernode_modfmt::publish::image_from_layers(&store, [(layers[0].0, &layers[0].1[..])])
            .unwrap();
    assert_ne!(expected, lower_only, "the upper layer changes the tree");

    let http = powernode_stub::cli::client::pinned_client(&ts.ca_pem(), None).unwrap();
    let args = powernode_stub::cli::publish::PublishArgs {
        source: layout.path().to_path_buf(),
        name: "svc".into(),
        version: "3".into(),
        kind: "runtime".into(),
        registry: None,
        folder: Default::default(),
    };
    let out = powernode_stub::cli::publish::publish_module(
        &ts.admin,
        http,
        &ts.url(),
        &ts.admin_token(),
        &args,
    )
    .await
    .unwrap();
    let p = &out["publication"];
    assert_eq!(p["composefs_digest"], expected.to_string());
    assert_eq!(p["kind"], "runtime");
    let r = Reg::new(&ts);
    let (_, _, manifest) = r
        .send(r.req(Method::GET, "/v2/modules/svc/manifests/3", true))
        .await;
    let m: Value = serde_json::from_slice(&manifest).unwrap();
    // The image's own config, layers and annotations are kept; ours are added.
    assert_eq!(m["config"]["digest"], config_digest.as_str());
    assert_eq!(m["layers"].as_array().unwrap().len(), 2);
    assert_eq!(m["annotations"]["org.opencontainers.image.source"], "test");
    assert_eq!(
        m["annotations"][COMPOSEFS_DIGEST_ANNOTATION],
        expected.to_string()
    );
    assert_eq!(sha(&manifest), p["digest"].as_str().unwrap());
}

/// Pushes a config, a layer and a manifest tagged `v1` into `repo` (admin token);
/// returns (manifest digest, layer digest).
async fn push_image(r: &Reg, repo: &str) -> (String, String) {
    let layer = b"layer bytes".to_vec();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    assert_eq!(r.push_mono(repo, &layer).await, StatusCode::CREATED);
    assert_eq!(r.push_mono(repo, config).await, StatusCode::CREATED);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(&layer), "size": layer.len()}],
    }))
    .unwrap();
    let (s, _, _) = r
        .send(
            r.req(Method::PUT, &format!("/v2/{repo}/manifests/v1"), true)
                .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                .body(manifest.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    (sha(&manifest), sha(&layer))
}

/// Every read of the embedded registry needs the admin token (Bearer, or Basic with
/// the token as password) or the client certificate of a live node: nothing at all,
/// a wrong token, or a revoked node's certificate gets 401 with the distribution-spec
/// body naming why.
#[tokio::test]
async fn registry_reads_need_the_admin_token_or_a_live_node_certificate() {
    let ts = TestServer::start().await;
    let r = Reg::new(&ts);
    let (mdigest, ldigest) = push_image(&r, "m/read").await;
    let reads: Vec<(Method, String)> = vec![
        (Method::GET, "/v2/m/read/manifests/v1".into()),
        (Method::HEAD, format!("/v2/m/read/manifests/{mdigest}")),
        (Method::GET, format!("/v2/m/read/blobs/{ldigest}")),
        (Method::HEAD, format!("/v2/m/read/blobs/{ldigest}")),
        (Method::GET, "/v2/m/read/tags/list".into()),
        (Method::GET, format!("/v2/m/read/referrers/{mdigest}")),
    ];
    // The spec's error body, its code and message (a HEAD answer has no body).
    let refusal = |s: StatusCode, h: &reqwest::header::HeaderMap, body: &[u8]| {
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(header(h, "www-authenticate").starts_with("Basic"), "{h:?}");
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        assert!(
            body.is_empty() || v["errors"][0]["code"] == "UNAUTHORIZED",
            "{v}"
        );
        v["errors"][0]["message"].as_str().unwrap_or("").to_string()
    };

    for (m, path) in &reads {
        // Anonymous: refused, saying no credentials came.
        let (s, h, body) = r.send(r.req(m.clone(), path, false)).await;
        let msg = refusal(s, &h, &body);
        assert!(
            *m == Method::HEAD || msg.contains("no credentials"),
            "{m} {path}: {msg}"
        );
        // A wrong token.
        let (s, h, body) = r
            .send(r.req(m.clone(), path, false).basic_auth("x", Some("wrong")))
            .await;
        let msg = refusal(s, &h, &body);
        assert!(
            *m == Method::HEAD || msg.contains("wrong credentials"),
            "{m} {path}: {msg}"
        );
        // The admin token, as Bearer and as Basic password.
        let (s, _, _) = r.send(r.req(m.clone(), path, true)).await;
        assert_eq!(s, StatusCode::OK, "{m} {path}");
        let (s, _, _) = r
            .send(
                r.req(m.clone(), path, false)
                    .basic_auth("x", Some(&r.token)),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{m} {path}");
    }
    // The base keeps its Basic challenge for clients that then send the token.
    let (s, h, _) = r.send(r.req(Method::GET, "/v2/", false)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(header(&h, "www-authenticate").starts_with("Basic"));

    // An enrolled node reads with its certificate alone.
    let (_, inst, doc) = ts.provisioned("reader").await;
    let mut node = FakeNode::new(doc, &ts.url());
    node.enroll().await;
    for (m, path) in &reads {
        let resp = node
            .http
            .request(m.clone(), format!("{}{path}", ts.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "node {m} {path}");
    }
    let blob = node
        .http
        .get(format!("{}/v2/m/read/blobs/{ldigest}", ts.url()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&blob[..], b"layer bytes");

    // The admin terminates the instance: its certificate is revoked, and the same
    // client (on the connection it already holds) is refused, naming the revocation.
    ts.ok(
        Method::POST,
        &powernode_proto::paths::admin_terminate(&inst),
        Some(json!({"force": true})),
    )
    .await;
    for (m, path) in &reads {
        let resp = node
            .http
            .request(m.clone(), format!("{}{path}", ts.url()))
            .send()
            .await
            .unwrap();
        let s = resp.status();
        let h = resp.headers().clone();
        let body = resp.bytes().await.unwrap();
        let msg = refusal(s, &h, &body);
        assert!(
            *m == Method::HEAD || msg.contains("revoked"),
            "revoked node {m} {path}: {msg}"
        );
    }
}
