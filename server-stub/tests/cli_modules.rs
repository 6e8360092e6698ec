//! The module commands through the binary: `serve` as a child, `publish-module`,
//! `list-module-publications`, `set-template-modules`, `list-templates`,
//! `module-signing-key`; the signing key survives a restart.

mod common;

use common::process::{cli, ServerProc};
use serde_json::Value;

#[test]
fn publish_list_and_template_modules_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("etc")).unwrap();
    std::fs::write(src.path().join("etc/hostname"), "edge\n").unwrap();
    let server = ServerProc::start(dir.path());

    let (ok, out, err) = cli(
        dir.path(),
        &[
            "publish-module",
            src.path().to_str().unwrap(),
            "--name",
            "base",
            "--version",
            "1.0.0",
            "--json",
        ],
    );
    assert!(ok, "{out}\n{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let digest = v["publication"]["digest"].as_str().unwrap().to_string();
    assert!(v["figures"]["push_ms"].is_u64(), "{v}");

    // Bad input is an error exit with a message, not a panic.
    let (ok, _, err) = cli(
        dir.path(),
        &[
            "publish-module",
            "/nonexistent",
            "--name",
            "x",
            "--version",
            "1",
        ],
    );
    assert!(!ok);
    assert!(err.contains("neither a folder"), "{err}");
    let (ok, _, err) = cli(
        dir.path(),
        &[
            "publish-module",
            src.path().to_str().unwrap(),
            "--name",
            "Bad/Name",
            "--version",
            "1",
        ],
    );
    assert!(!ok);
    assert!(err.contains("module name"), "{err}");

    let (ok, out, _) = cli(dir.path(), &["list-module-publications", "--json"]);
    assert!(ok);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["publications"][0]["digest"], digest.as_str());
    let (ok, out, _) = cli(dir.path(), &["list-module-publications"]);
    assert!(ok && out.contains("base"), "{out}");

    let (ok, out, err) = cli(
        dir.path(),
        &[
            "set-template-modules",
            "tmpl-edge-base",
            "--root",
            "base",
            "--runtime",
            "svc",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["template"]["runtime_modules"][0], "svc");
    let (ok, _, err) = cli(
        dir.path(),
        &["set-template-modules", "tmpl-nope", "--root", "base"],
    );
    assert!(!ok && err.contains("not_found"), "{err}");

    let (ok, pem, _) = cli(dir.path(), &["module-signing-key"]);
    assert!(ok);
    assert_eq!(
        pem,
        std::fs::read_to_string(dir.path().join("module-signing.pub")).unwrap()
    );

    // Restart: same key, template lists and publications kept.
    drop(server);
    let _server = ServerProc::start(dir.path());
    let (_, pem2, _) = cli(dir.path(), &["module-signing-key"]);
    assert_eq!(pem, pem2);
    let (_, out, _) = cli(dir.path(), &["list-templates", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["templates"][0]["root_modules"][0], "base", "{v}");
    let (_, out, _) = cli(dir.path(), &["list-module-publications", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["publications"].as_array().unwrap().len(), 1);
}
