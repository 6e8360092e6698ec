//! Offline module signing through the binary, with the real cosign: a key pair from
//! `cosign generate-key-pair`, `serve --online-signing off --module-trust-key
//! cosign.pub`, `publish-module --key cosign.key` (the private key never leaves the
//! publisher), then `cosign verify --key cosign.pub` with the module's name and
//! version annotations against the embedded registry. The online sign route is
//! off (409), a key outside the trust set and a wrong password are refused with
//! clear errors, and nodes are handed the offline key to pin.

mod common;

use std::path::Path;
use std::process::Command;

use common::process::{cli, cli_json, ServerProc, BIN};
use common::tools::{run, tool};
use serde_json::Value;

const NAME_A: &str = "org.powernode.module.name";
const VERSION_A: &str = "org.powernode.module.version";

/// A client subcommand with extra environment; (exit ok, stdout, stderr).
fn cli_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("--data")
        .arg(dir)
        .args(args)
        .env_remove("COSIGN_PASSWORD")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn module_folder() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("etc")).unwrap();
    std::fs::write(d.path().join("etc/motd"), "signed offline\n").unwrap();
    d
}

fn publish_args<'a>(src: &'a Path, version: &'a str, key: Option<&'a Path>) -> Vec<&'a str> {
    let mut a = vec![
        "publish-module",
        src.to_str().unwrap(),
        "--name",
        "base",
        "--version",
        version,
        "--json",
    ];
    if let Some(k) = key {
        a.extend(["--key", k.to_str().unwrap()]);
    }
    a
}

async fn generate_key_pair(cosign: &Path, dir: &Path, password: &str) {
    let (ok, out, err) = run(
        cosign,
        &["generate-key-pair"],
        &[("COSIGN_PASSWORD", password)],
        dir,
    )
    .await;
    assert!(ok, "cosign generate-key-pair: {out}\n{err}");
}

fn server_url(data: &Path) -> String {
    std::fs::read_to_string(data.join("server-url"))
        .unwrap()
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_cosign_key_signs_what_cosign_verifies_with_the_online_key_off() {
    let cosign = tool("cosign");
    let keys = tempfile::tempdir().unwrap();
    generate_key_pair(&cosign, keys.path(), "s3cret").await;
    let key = keys.path().join("cosign.key");
    let public = keys.path().join("cosign.pub");
    let data = tempfile::tempdir().unwrap();
    let _server = ServerProc::start_with(
        data.path(),
        "recorder",
        &[
            "--online-signing",
            "off",
            "--module-trust-key",
            public.to_str().unwrap(),
        ],
    );
    // Online signing off: no key is made or kept on the server.
    assert!(!data.path().join("module-signing.key").exists());
    let src = module_folder();

    // Offline: signed on the publisher, recorded, verified by cosign.
    let (ok, out, err) = cli_env(
        data.path(),
        &publish_args(src.path(), "1.0.0", Some(&key)),
        &[("COSIGN_PASSWORD", "s3cret")],
    );
    assert!(ok, "publish-module --key: {out}\n{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let digest = v["publication"]["digest"].as_str().unwrap().to_string();
    let host = server_url(data.path())
        .trim_start_matches("https://")
        .to_string();
    let work = tempfile::tempdir().unwrap();
    let ca = data.path().join("ca.pem");
    let token = std::fs::read_to_string(data.path().join("admin-token")).unwrap();
    let env = [("SSL_CERT_FILE", ca.to_str().unwrap())];
    let verify = |version: &str| {
        vec![
            "verify".to_string(),
            "--key".to_string(),
            public.to_str().unwrap().to_string(),
            "--insecure-ignore-tlog=true".to_string(),
            "--registry-username".to_string(),
            "x".to_string(),
            "--registry-password".to_string(),
            token.trim().to_string(),
            "-a".to_string(),
            format!("{NAME_A}=base"),
            "-a".to_string(),
            format!("{VERSION_A}={version}"),
            format!("{host}/modules/base@{digest}"),
        ]
    };
    let args = verify("1.0.0");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = run(&cosign, &args, &env, work.path()).await;
    assert!(ok, "cosign verify: {out}\n{err}");
    assert!(out.contains(&digest), "{out}");
    let args = verify("0.9.0");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, _, err) = run(&cosign, &args, &env, work.path()).await;
    assert!(!ok, "another version must not verify: {err}");

    // The online sign route answers 409, pointing at offline signing; so does a
    // publish without --key and the module-signing-key command.
    let (ok, _, err) = cli_env(data.path(), &publish_args(src.path(), "1.0.1", None), &[]);
    assert!(!ok);
    assert!(
        err.contains("online_signing_disabled") && err.contains("--key"),
        "{err}"
    );
    let (ok, _, err) = cli(data.path(), &["module-signing-key"]);
    assert!(!ok && err.contains("online_signing_disabled"), "{err}");

    // A wrong password names the key file; the server never sees the key.
    let (ok, _, err) = cli_env(
        data.path(),
        &publish_args(src.path(), "1.0.2", Some(&key)),
        &[("COSIGN_PASSWORD", "wrong")],
    );
    assert!(!ok);
    assert!(
        err.contains(key.to_str().unwrap()) && err.contains("password"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    // A key outside the server's trust set is refused before anything is pushed.
    let other = tempfile::tempdir().unwrap();
    generate_key_pair(&cosign, other.path(), "").await;
    let (ok, _, err) = cli_env(
        data.path(),
        &publish_args(src.path(), "1.0.3", Some(&other.path().join("cosign.key"))),
        &[("COSIGN_PASSWORD", "")],
    );
    assert!(!ok);
    assert!(err.contains("trust"), "{err}");
    let list = cli_json(data.path(), &["list-module-publications"]);
    assert_eq!(list["publications"].as_array().unwrap().len(), 1, "{list}");

    // Nodes are handed the offline key to pin, and only it.
    let n = cli_json(
        data.path(),
        &[
            "create-node",
            "--hostname",
            "edge-offline",
            "--lifecycle-class",
            "ephemeral",
        ],
    );
    let node = n["node"]["id"].as_str().unwrap();
    let p = cli_json(data.path(), &["provision-instance", node]);
    let inst = p["instance"]["id"].as_str().unwrap();
    let doc = cli_json(data.path(), &["instance-identity", inst]);
    let pinned = std::fs::read_to_string(&public).unwrap();
    assert_eq!(
        doc["module_trust_keys"],
        serde_json::json!([pinned]),
        "{doc}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_pkcs8_key_signs_beside_the_online_key() {
    let cosign = tool("cosign");
    let keys = tempfile::tempdir().unwrap();
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let key = keys.path().join("offline.pem");
    std::fs::write(&key, kp.serialize_pem()).unwrap();
    let public = keys.path().join("offline.pub");
    std::fs::write(&public, kp.public_key_pem()).unwrap();
    let data = tempfile::tempdir().unwrap();
    let _server = ServerProc::start_with(
        data.path(),
        "recorder",
        &["--module-trust-key", public.to_str().unwrap()],
    );
    let src = module_folder();
    let (ok, out, err) = cli_env(
        data.path(),
        &publish_args(src.path(), "2.0.0", Some(&key)),
        &[],
    );
    assert!(ok, "publish-module --key: {out}\n{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let digest = v["publication"]["digest"].as_str().unwrap().to_string();
    // The online key still signs too.
    let (ok, out, err) = cli_env(data.path(), &publish_args(src.path(), "2.0.1", None), &[]);
    assert!(ok, "online publish: {out}\n{err}");
    let host = server_url(data.path())
        .trim_start_matches("https://")
        .to_string();
    let work = tempfile::tempdir().unwrap();
    let ca = data.path().join("ca.pem");
    let token = std::fs::read_to_string(data.path().join("admin-token")).unwrap();
    let reference = format!("{host}/modules/base@{digest}");
    let (ok, out, err) = run(
        &cosign,
        &[
            "verify",
            "--key",
            public.to_str().unwrap(),
            "--insecure-ignore-tlog=true",
            "--registry-username",
            "x",
            "--registry-password",
            token.trim(),
            "-a",
            &format!("{NAME_A}=base"),
            "-a",
            &format!("{VERSION_A}=2.0.0"),
            &reference,
        ],
        &[("SSL_CERT_FILE", ca.to_str().unwrap())],
        work.path(),
    )
    .await;
    assert!(ok, "cosign verify: {out}\n{err}");

    // The trust set is the online key and the offline one.
    let online = std::fs::read_to_string(data.path().join("module-signing.pub")).unwrap();
    let n = cli_json(
        data.path(),
        &[
            "create-node",
            "--hostname",
            "edge-both",
            "--lifecycle-class",
            "ephemeral",
        ],
    );
    let p = cli_json(
        data.path(),
        &["provision-instance", n["node"]["id"].as_str().unwrap()],
    );
    let doc = cli_json(
        data.path(),
        &["instance-identity", p["instance"]["id"].as_str().unwrap()],
    );
    assert_eq!(
        doc["module_trust_keys"],
        serde_json::json!([online, kp.public_key_pem()]),
        "{doc}"
    );
}

#[test]
fn a_trust_key_that_is_not_a_p256_public_key_stops_serve_naming_the_file() {
    let data = tempfile::tempdir().unwrap();
    let bad = data.path().join("not-a-key.pub");
    std::fs::write(
        &bad,
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let log = data.path().join("serve.err");
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data.path())
        .args(["--module-trust-key", bad.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // It must stop by itself; a server that came up anyway is killed by its pid.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(
        status.is_some_and(|s| !s.success()),
        "serve did not stop: {status:?}"
    );
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(
        err.contains(bad.to_str().unwrap()) && err.contains("P-256"),
        "{err}"
    );
}
