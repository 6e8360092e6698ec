//! A published module's layer as ordinary tools and the embedded registry see it: the
//! chunked gzip layer (one member per file, TOC members at the end) is a plain
//! `tar+gzip` blob for `gzip -t` and `tar -xz`; its descriptor carries the TOC
//! annotations; the registry serves the TOC as a single range and counts the blob
//! bytes it served (HEAD counts nothing).

mod common;

use std::process::Command;

use common::TestServer;
use powernode_modfmt::toc::{TocLocation, TOC_DIGEST_ANNOTATION};
use serde_json::Value;
use sha2::Digest as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_layer_is_plain_tar_gzip_and_its_toc_is_served_by_range() {
    let ts = TestServer::start().await;
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("etc")).unwrap();
    std::fs::write(src.path().join("etc/motd"), "chunked\n").unwrap();
    for i in 0..50u32 {
        let data: Vec<u8> = (0..5000u32).map(|j| (j * 7 + i) as u8).collect();
        std::fs::write(src.path().join(format!("etc/f{i}")), data).unwrap();
    }
    let http = powernode_stub::cli::client::pinned_client(&ts.ca_pem(), None).unwrap();
    let args = powernode_stub::cli::publish::PublishArgs {
        source: src.path().to_path_buf(),
        name: "chunked".into(),
        version: "1".into(),
        kind: "runtime".into(),
        registry: None,
        folder: Default::default(),
    };
    let p = powernode_stub::cli::publish::publish_module(
        &ts.admin,
        http.clone(),
        &ts.url(),
        &ts.admin_token(),
        &args,
    )
    .await
    .unwrap();
    let digest = p["publication"]["digest"].as_str().unwrap().to_string();
    let repo = p["publication"]["repository"].as_str().unwrap().to_string();

    let base = format!("{}/v2/{repo}", ts.url());
    // Registry reads need credentials: the admin token here.
    let tok = ts.admin_token();
    let manifest: Value = http
        .get(format!("{base}/manifests/{digest}"))
        .bearer_auth(&tok)
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let layer = &manifest["layers"][0];
    let layer_digest = layer["digest"].as_str().unwrap();
    let size = layer["size"].as_u64().unwrap();
    let annotations: std::collections::BTreeMap<String, String> =
        serde_json::from_value(layer["annotations"].clone()).unwrap();
    assert!(annotations.contains_key(TOC_DIGEST_ANNOTATION), "{layer}");
    let loc = TocLocation::from_annotations(&annotations, size)
        .unwrap()
        .unwrap();

    // The TOC by range: 206, exactly its bytes, and the counter moves by that much.
    let storage = &ts.state().modules.storage;
    let before = storage.blob_bytes_served();
    let r = http
        .get(format!("{base}/blobs/{layer_digest}"))
        .bearer_auth(&tok)
        .header(
            "Range",
            format!("bytes={}-{}", loc.offset, loc.offset + loc.size - 1),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 206);
    let toc = r.bytes().await.unwrap();
    assert_eq!(toc.len() as u64, loc.size);
    assert_eq!(
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&toc))),
        loc.digest
    );
    assert_eq!(storage.blob_bytes_served() - before, loc.size);
    let head = http
        .head(format!("{base}/blobs/{layer_digest}"))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status().as_u16(), 200);
    assert_eq!(storage.blob_bytes_served() - before, loc.size);

    // The whole blob: gzip and tar take it as an ordinary layer.
    let blob = http
        .get(format!("{base}/blobs/{layer_digest}"))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(storage.blob_bytes_served() - before, loc.size + size);
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("layer.tar.gz");
    std::fs::write(&file, &blob).unwrap();
    let ok = Command::new("gzip").arg("-t").arg(&file).status().unwrap();
    assert!(ok.success(), "gzip -t refused the chunked layer");
    let out = work.path().join("x");
    std::fs::create_dir_all(&out).unwrap();
    let tar = Command::new("tar")
        .arg("-xzf")
        .arg(&file)
        .arg("-C")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        tar.status.success() && tar.stderr.is_empty(),
        "tar -xz: {}",
        String::from_utf8_lossy(&tar.stderr)
    );
    for e in std::fs::read_dir(src.path().join("etc")).unwrap() {
        let e = e.unwrap();
        assert_eq!(
            std::fs::read(e.path()).unwrap(),
            std::fs::read(out.join("etc").join(e.file_name())).unwrap(),
            "{:?}",
            e.file_name()
        );
    }
}
