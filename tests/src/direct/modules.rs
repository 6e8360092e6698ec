//! Runtime modules for the VM tests: an OCI image layout with a static busybox
//! tree and an image config whose labels declare the mount point and services
//! (`agent/src/modules/config.rs`), published through the stub.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use super::rootfs;
use super::stub::Stub;

pub fn sha256_hex(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Writes `bytes` as a blob of `layout`; returns its descriptor.
pub fn blob(layout: &Path, media_type: &str, bytes: &[u8]) -> Value {
    let tmp = layout.join("blob.tmp");
    std::fs::write(&tmp, bytes).unwrap();
    let hex = sha256_hex(&tmp);
    std::fs::rename(&tmp, layout.join("blobs/sha256").join(&hex)).unwrap();
    json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": bytes.len()})
}

/// A runtime module tree: `bin/busybox` with `sh` and `sleep` applets, plus
/// `version`; as an OCI image layout whose config carries `labels`.
pub fn module_layout(dir: &Path, name: &str, version: &str, labels: Value) -> PathBuf {
    let tree = dir.join(format!("{name}-{version}-tree"));
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::copy(rootfs::busybox(), tree.join("bin/busybox")).unwrap();
    for applet in ["sh", "sleep"] {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).unwrap();
    }
    std::fs::write(tree.join("version"), format!("{name} {version}\n")).unwrap();
    let layout = dir.join(format!("{name}-{version}-oci"));
    let _ = std::fs::remove_dir_all(&layout);
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    let layer = layout.join("layer.tar");
    let st = Command::new("tar")
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "--format=gnu",
            "-C",
        ])
        .arg(&tree)
        .arg("-cf")
        .arg(&layer)
        .args(["bin", "version"])
        .status()
        .unwrap();
    assert!(st.success(), "tar: {st}");
    let layer_bytes = std::fs::read(&layer).unwrap();
    std::fs::remove_file(&layer).unwrap();
    let layer_desc = blob(
        &layout,
        "application/vnd.oci.image.layer.v1.tar",
        &layer_bytes,
    );
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Labels": labels},
    });
    let config_desc = blob(
        &layout,
        "application/vnd.oci.image.config.v1+json",
        &serde_json::to_vec(&config).unwrap(),
    );
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": [layer_desc],
    });
    let manifest_desc = blob(
        &layout,
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [manifest_desc]})).unwrap(),
    )
    .unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    layout
}

/// A service entry of the `org.powernode.services` label running a busybox shell
/// script from the module (relative argv\[0\]: the module's own tree).
pub fn sh_service(name: &str, script: &str, restart: &str) -> Value {
    json!({"name": name, "command": ["bin/busybox", "sh", "-c", script], "restart": restart,
           "stop_timeout_seconds": 3})
}

pub fn labels(mountpoint: Option<&str>, services: &[Value]) -> Value {
    let mut l = json!({"org.powernode.services": Value::Array(services.to_vec()).to_string()});
    if let Some(m) = mountpoint {
        l["org.powernode.mountpoint"] = json!(m);
    }
    l
}

/// Publishes a runtime module layout; returns its pinned manifest digest.
pub fn publish_runtime(
    stub: &Stub,
    dir: &Path,
    name: &str,
    version: &str,
    labels: Value,
) -> String {
    let layout = module_layout(dir, name, version, labels);
    stub.publish_module(&layout, name, version, "runtime")
}
