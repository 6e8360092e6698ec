//! Interop and tamper tests against real tools on loopback: Debian's `docker-registry`
//! (a child on 127.0.0.1:<free port>, killed on drop), images pushed with `oras`,
//! signed with `cosign sign --key` (no transparency log), pulled by our agent code.
//! A missing tool skips its test loudly; nothing is faked.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use powernode_proto::node::{
    COMPOSEFS_DIGEST_ANNOTATION, MODULE_NAME_ANNOTATION, MODULE_VERSION_ANNOTATION,
};
use powernode_proto::ErrorCode;

use super::pull::{pull_module, PullError, PullReport};
use super::registry::{RegistryClient, RegistryOptions, Repository};
use super::signature::{parse_trust_keys, Expected, TrustKey};
use super::store::ObjectStore;
use super::ModuleErrorCode;
use powernode_modfmt::publish::{build_module, BuildOptions, LayerCompression};
use powernode_modfmt::testutil::pseudo_random;

/// A small tree with what a module has: dirs, modes, a symlink, a hardlink, an empty file.
fn sample_tree(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("usr/bin/tool"), pseudo_random(70_000, 3)).unwrap();
    std::fs::set_permissions(
        root.join("usr/bin/tool"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(root.join("etc/conf"), b"a=1\n").unwrap();
    std::fs::write(root.join("etc/empty"), b"").unwrap();
    let _ = std::fs::hard_link(root.join("etc/conf"), root.join("etc/conf.link"));
    let _ = std::os::unix::fs::symlink("../usr/bin/tool", root.join("etc/tool"));
}

/// An uncompressed tar with raw entry names (the tar crate refuses `..` in `set_path`).
fn raw_tar(entries: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// A missing prerequisite fails the test naming it: scripts/setup installs every
/// interop tool, so a run that checked nothing never reports `ok`.
fn missing(what: &str) -> ! {
    panic!("interop prerequisite missing: {what}");
}

/// `oras`/`cosign` from the project cache (scripts/tools), else PATH.
fn tool(name: &str) -> Option<PathBuf> {
    let cached = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../cache/root/usr/bin")
        .join(name);
    if cached.is_file() {
        return Some(cached);
    }
    if let Some(p) = powernode_modfmt::testutil::test_tool(name) {
        return Some(p);
    }
    cached.is_file().then_some(cached)
}

struct Tools {
    oras: PathBuf,
    cosign: PathBuf,
}

fn tools() -> Tools {
    match (tool("oras"), tool("cosign")) {
        (Some(oras), Some(cosign)) => Tools { oras, cosign },
        _ => missing("oras/cosign not available (scripts/tools fetches them)"),
    }
}

/// A `docker-registry` child on a free loopback port, killed (by its pid) on drop.
struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    fn start() -> Registry {
        let bin = Path::new("/usr/bin/docker-registry");
        if !bin.is_file() {
            missing("docker-registry not installed (scripts/tools installs it)");
        }
        let dir = tempfile::tempdir().unwrap();
        // Pick a free port; the tiny race with other binds is acceptable in tests.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = dir.path().join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\nlog:\n  level: error\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let reg = Registry { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return reg;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("docker-registry did not listen on {port}");
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    fn flip(&self, digest: &str, at: usize) {
        let p = self.blob_path(digest);
        let mut b = std::fs::read(&p).unwrap();
        let i = at.min(b.len() - 1);
        b[i] ^= 0x01;
        std::fs::write(&p, b).unwrap();
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A cosign key pair made by `cosign generate-key-pair` in `dir`.
struct Key {
    dir: PathBuf,
}

impl Key {
    fn generate(t: &Tools, dir: &Path) -> Key {
        std::fs::create_dir_all(dir).unwrap();
        run(Command::new(&t.cosign)
            .arg("generate-key-pair")
            .current_dir(dir)
            .env("COSIGN_PASSWORD", "test"));
        Key {
            dir: dir.to_path_buf(),
        }
    }
    fn public_pem(&self) -> String {
        std::fs::read_to_string(self.dir.join("cosign.pub")).unwrap()
    }
    fn trust(&self) -> Vec<TrustKey> {
        parse_trust_keys(&[self.public_pem()]).unwrap()
    }
}

fn sign(t: &Tools, key: &Key, reference: &str) {
    sign_with(t, key, reference, &[]);
}

/// [`sign`] binding the module name and version, as `publish-module` signs.
fn sign_as(t: &Tools, key: &Key, reference: &str, name: &str, version: &str) {
    sign_with(
        t,
        key,
        reference,
        &[
            format!("{MODULE_NAME_ANNOTATION}={name}"),
            format!("{MODULE_VERSION_ANNOTATION}={version}"),
        ],
    );
}

fn sign_with(t: &Tools, key: &Key, reference: &str, annotations: &[String]) {
    let mut cmd = Command::new(&t.cosign);
    for a in annotations {
        cmd.arg("-a").arg(a);
    }
    run(cmd
        .args(["sign", "--key"])
        .arg(key.dir.join("cosign.key"))
        .args([
            "--tlog-upload=false",
            "--allow-http-registry",
            "--allow-insecure-registry",
            "-y",
            reference,
        ])
        .env("COSIGN_PASSWORD", "test"));
}

/// `oras push` of `layers` (file name, media type) in `dir` with manifest annotations;
/// returns the manifest digest.
fn push(
    t: &Tools,
    reference: &str,
    dir: &Path,
    layers: &[(&str, &str)],
    config: Option<(&str, &str)>,
    annotations: &[(&str, String)],
) -> String {
    push_annotated(t, reference, dir, layers, config, annotations, None)
}

/// [`push`], plus annotations on one layer's descriptor (an oras annotation file).
fn push_annotated(
    t: &Tools,
    reference: &str,
    dir: &Path,
    layers: &[(&str, &str)],
    config: Option<(&str, &str)>,
    annotations: &[(&str, String)],
    layer_annotations: Option<(&str, std::collections::BTreeMap<String, String>)>,
) -> String {
    let mut cmd = Command::new(&t.oras);
    cmd.args(["push", "--plain-http", "--format", "json"])
        .current_dir(dir);
    if let Some((file, ann)) = layer_annotations {
        let manifest: serde_json::Map<String, serde_json::Value> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(v.clone())))
            .collect();
        let doc = serde_json::json!({ "$manifest": manifest, file: ann });
        let path = dir.join(format!("{file}.annotations.json"));
        std::fs::write(&path, doc.to_string()).unwrap();
        cmd.arg("--annotation-file").arg(path);
    } else {
        for (k, v) in annotations {
            cmd.arg("--annotation").arg(format!("{k}={v}"));
        }
    }
    if let Some((file, mt)) = config {
        cmd.arg("--config").arg(format!("{file}:{mt}"));
    }
    cmd.arg(reference);
    for (file, mt) in layers {
        cmd.arg(format!("{file}:{mt}"));
    }
    let out = run(&mut cmd);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["digest"].as_str().unwrap().to_string()
}

fn client() -> RegistryClient {
    RegistryClient::new(RegistryOptions {
        allow_http_loopback: true,
        ..Default::default()
    })
    .unwrap()
}

fn pull(
    reg: &Registry,
    repo: &str,
    digest: &str,
    keys: &[TrustKey],
    store: &ObjectStore,
) -> Result<PullReport, PullError> {
    let repo: Repository = format!("{}/{repo}", reg.host()).parse().unwrap();
    pull_module(&client(), &repo, digest, keys, None, store)
}

fn expect_code(r: Result<PullReport, PullError>, code: ErrorCode, case: &str) {
    match r {
        Ok(_) => panic!("{case}: accepted, expected {}", code.as_str()),
        Err(e) => assert_eq!(
            e.code(),
            code,
            "{case}: wrong code for {}",
            crate::error_chain(&e)
        ),
    }
    eprintln!("tamper matrix: {case:<46} -> {}", code.as_str());
}

/// Publishes the folder `src` as `repo:tag` (gzip layer + composefs annotation), with
/// an optional unique config; returns (manifest digest, built module).
fn publish_dir(
    t: &Tools,
    reg: &Registry,
    work: &Path,
    src: &Path,
    repo: &str,
    tag: &str,
    config: bool,
) -> (String, powernode_modfmt::publish::BuiltModule) {
    let scratch = ObjectStore::open(&work.join("scratch")).unwrap();
    let built = build_module(src, &BuildOptions::default(), &scratch).unwrap();
    let layer_name = format!("{repo}-{tag}.tar.gz").replace('/', "_");
    std::fs::write(work.join(&layer_name), &built.layer).unwrap();
    let cfg_name = format!("{repo}-{tag}.config.json").replace('/', "_");
    if config {
        std::fs::write(
            work.join(&cfg_name),
            format!(
                r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{}"]}},"config":{{"Labels":{{"t":"{repo}{tag}"}}}}}}"#,
                built.diff_id
            ),
        )
        .unwrap();
    }
    let digest = push_annotated(
        t,
        &format!("{}/{repo}:{tag}", reg.host()),
        work,
        &[(&layer_name, built.layer_media_type)],
        config.then_some((&cfg_name, "application/vnd.oci.image.config.v1+json")),
        &[(COMPOSEFS_DIGEST_ANNOTATION, built.image_digest.to_string())],
        built
            .toc
            .as_ref()
            .map(|toc| (layer_name.as_str(), toc.annotations())),
    );
    (digest, built)
}

#[test]
fn registry_interop_and_tamper_matrix() {
    let t = tools();
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let key = Key::generate(&t, &w.join("key-a"));
    let other = Key::generate(&t, &w.join("key-b"));
    let src = w.join("src");
    sample_tree(&src);
    let fresh = |name: &str| ObjectStore::open(&w.join("stores").join(name)).unwrap();

    // The good path: oras push, cosign sign --key, our agent pulls and verifies.
    let (good, built) = publish_dir(&t, &reg, w, &src, "mod/good", "v1", true);
    sign(&t, &key, &format!("{}/mod/good@{good}", reg.host()));
    let store = fresh("good");
    let r = pull(&reg, "mod/good", &good, &key.trust(), &store).unwrap();
    assert_eq!(r.image(), built.image_digest);
    assert!(!r.install.already_present);
    assert_eq!(
        std::fs::read(store.image_path(&r.image())).unwrap(),
        built.image
    );
    // A second pull fetches manifests and signature only.
    let again = pull(&reg, "mod/good", &good, &key.trust(), &store).unwrap();
    assert!(again.install.already_present);
    assert!(again.bytes_received < 4096, "{}", again.bytes_received);
    // Either of several trust keys will do.
    let both = parse_trust_keys(&[other.public_pem(), key.public_pem()]).unwrap();
    pull(&reg, "mod/good", &good, &both, &fresh("both")).unwrap();

    // A byte flipped in a stored object: its check refuses it.
    let obj = store.image_objects(&r.image()).unwrap()[0];
    let p = store.object_path(&obj);
    let mut b = std::fs::read(&p).unwrap();
    b[0] ^= 1;
    let _ = std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644));
    std::fs::write(&p, b).unwrap();
    // As the next boot finds it (a handle trusts the files it wrote itself).
    let store = ObjectStore::open(store.root()).unwrap();
    let e = store.verify(&obj).unwrap_err();
    assert_eq!(e.code(), ErrorCode::VerityMismatch, "{e}");
    eprintln!(
        "tamper matrix: {:<46} -> verity_mismatch",
        "byte flipped in a stored object"
    );

    // Signature by another key; several keys none of which signed. The layers stream
    // while the signature is checked, but the image is never recorded.
    let refused = fresh("other");
    expect_code(
        pull(&reg, "mod/good", &good, &other.trust(), &refused),
        ErrorCode::SignatureMismatch,
        "signature by another key",
    );
    assert!(!refused.has_image(&built.image_digest));

    // No signature at all.
    let (unsigned, unsigned_built) = publish_dir(&t, &reg, w, &src, "mod/unsigned", "v1", false);
    let refused = fresh("unsigned");
    expect_code(
        pull(&reg, "mod/unsigned", &unsigned, &key.trust(), &refused),
        ErrorCode::SignatureMissing,
        "no signature",
    );
    assert!(!refused.has_image(&unsigned_built.image_digest));

    // The composefs annotation names another image (signed as such by the publisher).
    let layer_name = "mod_good-v1.tar.gz";
    let wrong = push(
        &t,
        &format!("{}/mod/wrongimg:v1", reg.host()),
        w,
        &[(layer_name, built.layer_media_type)],
        None,
        &[(
            COMPOSEFS_DIGEST_ANNOTATION,
            powernode_modfmt::verity::digest_bytes(b"another image").to_string(),
        )],
    );
    sign(&t, &key, &format!("{}/mod/wrongimg@{wrong}", reg.host()));
    expect_code(
        pull(
            &reg,
            "mod/wrongimg",
            &wrong,
            &key.trust(),
            &fresh("wrongimg"),
        ),
        ErrorCode::VerityMismatch,
        "composefs digest annotation for another image",
    );

    // A signature payload for another digest, copied onto this one's signature tag.
    let (victim, _) = publish_dir(&t, &reg, w, &src, "mod/victim", "v1", true);
    let (donor, _) = publish_dir(&t, &reg, w, &src, "mod/victim", "v2", false);
    sign(&t, &key, &format!("{}/mod/victim@{donor}", reg.host()));
    let sig = |d: &str| super::signature::signature_tag(d);
    run(Command::new(&t.oras).args([
        "cp",
        "--from-plain-http",
        "--to-plain-http",
        &format!("{}/mod/victim:{}", reg.host(), sig(&donor)),
        &format!("{}/mod/victim:{}", reg.host(), sig(&victim)),
    ]));
    expect_code(
        pull(&reg, "mod/victim", &victim, &key.trust(), &fresh("victim")),
        ErrorCode::SignatureMismatch,
        "signature payload naming another manifest",
    );

    // Unsafe paths: a signed image whose layer has `../` and an absolute escape.
    for (i, name) in ["../escape", "a/../../escape"].iter().enumerate() {
        let layer = raw_tar(&[(name.as_bytes(), b"x".as_slice())]);
        let f = format!("unsafe{i}.tar");
        std::fs::write(w.join(&f), &layer).unwrap();
        let d = push(
            &t,
            &format!("{}/mod/unsafe:v{i}", reg.host()),
            w,
            &[(&f, "application/vnd.oci.image.layer.v1.tar")],
            None,
            &[(COMPOSEFS_DIGEST_ANNOTATION, built.image_digest.to_string())],
        );
        sign(&t, &key, &format!("{}/mod/unsafe@{d}", reg.host()));
        expect_code(
            pull(
                &reg,
                "mod/unsafe",
                &d,
                &key.trust(),
                &fresh(&format!("unsafe{i}")),
            ),
            ErrorCode::UnsafePath,
            &format!("tar entry {name:?}"),
        );
    }

    // Unknown layer media type (signed).
    let d = push(
        &t,
        &format!("{}/mod/mediatype:v1", reg.host()),
        w,
        &[(layer_name, "application/x-not-a-layer")],
        None,
        &[(COMPOSEFS_DIGEST_ANNOTATION, built.image_digest.to_string())],
    );
    sign(&t, &key, &format!("{}/mod/mediatype@{d}", reg.host()));
    expect_code(
        pull(&reg, "mod/mediatype", &d, &key.trust(), &fresh("mediatype")),
        ErrorCode::UnsupportedMediaType,
        "unknown layer media type",
    );

    // 404 and a registry that is down.
    let missing = format!("sha256:{}", "ab".repeat(32));
    expect_code(
        pull(&reg, "mod/good", &missing, &key.trust(), &fresh("404")),
        ErrorCode::OciNotFound,
        "pinned digest not in the registry (404)",
    );
    let down: Repository = {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        format!("127.0.0.1:{port}/mod/good").parse().unwrap()
    };
    expect_code(
        pull_module(&client(), &down, &good, &key.trust(), None, &fresh("down")),
        ErrorCode::RegistryUnreachable,
        "registry down",
    );

    // Byte flips in the registry's storage. Each image is its own, so the flips do not
    // disturb the others; blobs are content-addressed and shared, hence unique content.
    let tampered = |repo: &str, tag: &str| {
        let s = w.join(format!("src-{repo}-{tag}").replace('/', "_"));
        sample_tree(&s);
        std::fs::write(s.join("unique"), format!("{repo}{tag}")).unwrap();
        let (d, b) = publish_dir(&t, &reg, w, &s, repo, tag, true);
        sign(&t, &key, &format!("{}/{repo}@{d}", reg.host()));
        pull(&reg, repo, &d, &key.trust(), &fresh(&format!("pre-{tag}"))).unwrap();
        (d, b)
    };
    let (d, b) = tampered("mod/flip", "layer");
    reg.flip(&b.layer_digest, 100);
    expect_code(
        pull(&reg, "mod/flip", &d, &key.trust(), &fresh("flip-layer")),
        ErrorCode::DigestMismatch,
        "byte flipped in a layer",
    );
    // The registry parses manifests it serves: flip a hex digit of the composefs
    // annotation, so the bytes stay valid JSON and only the digest check can tell.
    let (d, b) = tampered("mod/flip", "manifest");
    let mp = reg.blob_path(&d);
    let text = std::fs::read_to_string(&mp).unwrap();
    let at = text.find(&b.image_digest.to_hex()).unwrap() + 7;
    let mut bytes = text.into_bytes();
    bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
    std::fs::write(&mp, bytes).unwrap();
    expect_code(
        pull(&reg, "mod/flip", &d, &key.trust(), &fresh("flip-manifest")),
        ErrorCode::DigestMismatch,
        "byte flipped in the manifest",
    );
    let (d, _) = tampered("mod/flip", "config");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reg.blob_path(&d)).unwrap()).unwrap();
    reg.flip(manifest["config"]["digest"].as_str().unwrap(), 10);
    expect_code(
        pull(&reg, "mod/flip", &d, &key.trust(), &fresh("flip-config")),
        ErrorCode::DigestMismatch,
        "byte flipped in the config",
    );
    // A pinned digest whose stored bytes are another manifest's.
    let (d, _) = tampered("mod/flip", "swap");
    std::fs::copy(reg.blob_path(&good), reg.blob_path(&d)).unwrap();
    expect_code(
        pull(&reg, "mod/flip", &d, &key.trust(), &fresh("swap")),
        ErrorCode::DigestMismatch,
        "pinned digest serving another manifest",
    );
}

/// A loopback TCP proxy to `upstream` that counts the bytes the upstream sent (what
/// the registry served, headers included). With `refuse_ranges`, request headers
/// named `Range` are renamed (same length) so the registry answers whole blobs.
struct CountingProxy {
    port: u16,
    served: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl CountingProxy {
    fn start(upstream: u16, refuse_ranges: bool) -> CountingProxy {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = served.clone();
        std::thread::spawn(move || {
            for client in l.incoming() {
                let Ok(mut client) = client else { return };
                let Ok(mut server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                    return;
                };
                let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = c2.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        if refuse_ranges {
                            for at in 0..n.saturating_sub(8) {
                                let w = &mut buf[at..at + 8];
                                if w.eq_ignore_ascii_case(b"\r\nrange:") {
                                    w[2] = b'x';
                                }
                            }
                        }
                        if s2.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s2.shutdown(std::net::Shutdown::Write);
                });
                let count = count.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = server.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        count.fetch_add(n as u64, Ordering::Relaxed);
                        if client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = client.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        CountingProxy { port, served }
    }

    fn served(&self) -> u64 {
        self.served.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn pull(
        &self,
        repo: &str,
        digest: &str,
        keys: &[TrustKey],
        store: &ObjectStore,
    ) -> Result<PullReport, PullError> {
        let repo: Repository = format!("127.0.0.1:{}/{repo}", self.port).parse().unwrap();
        pull_module(&client(), &repo, digest, keys, None, store)
    }
}

#[test]
fn dedup_v1_then_v2_moves_only_the_change() {
    let t = tools();
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let key = Key::generate(&t, &w.join("key"));
    let src = w.join("v1");
    std::fs::create_dir_all(src.join("f")).unwrap();
    for i in 0..1000u64 {
        std::fs::write(
            src.join(format!("f/{i}")),
            pseudo_random(2000 + i as usize, i),
        )
        .unwrap();
    }
    let (v1, b1) = publish_dir(&t, &reg, w, &src, "mod/dedup", "v1", true);
    sign(&t, &key, &format!("{}/mod/dedup@{v1}", reg.host()));
    let changed = pseudo_random(3000, 99_999);
    std::fs::write(src.join("f/500"), &changed).unwrap();
    let (v2, b2) = publish_dir(&t, &reg, w, &src, "mod/dedup", "v2", true);
    sign(&t, &key, &format!("{}/mod/dedup@{v2}", reg.host()));
    assert!(b1.toc.is_some() && b2.toc.is_some());
    // The chunked layer is an ordinary layer for oras and tar.
    let out = w.join("oras-pulled");
    run(Command::new(&t.oras)
        .args(["pull", "--plain-http", "-o"])
        .arg(&out)
        .arg(format!("{}/mod/dedup@{v2}", reg.host())));
    let x = w.join("tar-x");
    std::fs::create_dir_all(&x).unwrap();
    run(Command::new("tar")
        .arg("-xzf")
        .arg(out.join("mod_dedup-v2.tar.gz"))
        .arg("-C")
        .arg(&x));
    assert_eq!(std::fs::read(x.join("f/500")).unwrap(), changed);
    assert_eq!(
        std::fs::read(x.join("f/7")).unwrap(),
        pseudo_random(2007, 7)
    );

    let proxy = CountingProxy::start(reg.port, false);
    let store = ObjectStore::open(&w.join("store")).unwrap();
    let r1 = proxy.pull("mod/dedup", &v1, &key.trust(), &store).unwrap();
    let served1 = proxy.served();
    // A first pull into an empty store takes the layer whole (one request).
    assert_eq!(r1.ranged.toc_layers, 0);
    let r2 = proxy.pull("mod/dedup", &v2, &key.trust(), &store).unwrap();
    let served2 = proxy.served() - served1;
    let toc_size = b2.toc.as_ref().unwrap().size;
    eprintln!(
        "dedup: v1 received {} B (registry served {served1} B), stored {} objects / {} B; \
         v2 received {} B (registry served {served2} B, TOC {toc_size} B, {} ranged reads) \
         vs layer {} B: {:.1}% of the whole-layer pull; stored {} new objects / {} B \
         (the changed file is {} B)",
        r1.bytes_received,
        r1.install.layers.new_objects,
        r1.install.layers.new_bytes,
        r2.bytes_received,
        r2.ranged.range_requests,
        b2.layer.len(),
        100.0 * served2 as f64 / b2.layer.len() as f64,
        r2.install.layers.new_objects,
        r2.install.layers.new_bytes,
        changed.len()
    );
    // The store gains the changed file only (plus the new image).
    assert_eq!(r2.install.layers.new_objects, 1);
    assert_eq!(r2.install.layers.new_bytes, changed.len() as u64);
    assert_eq!(r2.install.layers.deduplicated_objects, 999);
    // On the wire: the TOC and one range (the changed file's member), plus manifests,
    // signature and config; never the layer.
    assert_eq!(r2.ranged.toc_layers, 1);
    assert_eq!(r2.ranged.range_requests, 2, "TOC + one coalesced range");
    let budget = toc_size + changed.len() as u64 + 24 * 1024;
    assert!(
        r2.bytes_received <= budget,
        "{} > {budget}",
        r2.bytes_received
    );
    assert!(
        served2 <= budget + 8 * 1024,
        "{served2} > {budget} + headers"
    );
    assert!(
        served2 * 5 < b2.layer.len() as u64,
        "{served2} vs {}",
        b2.layer.len()
    );
    // An unchanged module set fetches no layer at all.
    let before = proxy.served();
    let r3 = proxy.pull("mod/dedup", &v2, &key.trust(), &store).unwrap();
    assert!(r3.install.already_present);
    assert!(r3.bytes_received < 4096, "{}", r3.bytes_received);
    assert!(proxy.served() - before < 8192);

    // A registry that will not serve ranges: the layer comes whole, still verified.
    let refusing = CountingProxy::start(reg.port, true);
    let store_b = ObjectStore::open(&w.join("store-b")).unwrap();
    refusing
        .pull("mod/dedup", &v1, &key.trust(), &store_b)
        .unwrap();
    let r = refusing
        .pull("mod/dedup", &v2, &key.trust(), &store_b)
        .unwrap();
    assert_eq!(
        (r.ranged.toc_layers, r.ranged.fallbacks),
        (0, 1),
        "{:?}",
        r.ranged
    );
    assert_eq!(r.install.layers.new_objects, 1);
    assert!(r.bytes_received > b2.layer.len() as u64);

    // The changed file's member flipped in the registry: the ranged read is refused
    // by its fs-verity digest (or does not decompress), never stored.
    let loc = b2.toc.clone().unwrap();
    let toc = powernode_modfmt::toc::decode_toc(&b2.layer[loc.offset as usize..], &loc).unwrap();
    let member = toc.entries.iter().find(|e| e.path == "f/500").unwrap();
    reg.flip(
        &b2.layer_digest,
        (member.offset.unwrap() + member.length.unwrap() / 2) as usize,
    );
    let store_c = ObjectStore::open(&w.join("store-c")).unwrap();
    proxy
        .pull("mod/dedup", &v1, &key.trust(), &store_c)
        .unwrap();
    let e = proxy
        .pull("mod/dedup", &v2, &key.trust(), &store_c)
        .unwrap_err();
    assert!(
        matches!(
            e.code(),
            ErrorCode::VerityMismatch | ErrorCode::DigestMismatch
        ),
        "{}",
        crate::error_chain(&e)
    );
    assert!(!store_c.contains(&member.digest.as_ref().unwrap().parse().unwrap()));
    eprintln!(
        "tamper matrix: {:<46} -> {}",
        "byte flipped in a ranged member",
        e.code().as_str()
    );
}

/// `cargo test -p powernode-agent --release -- --ignored bench_pull --nocapture`
#[test]
#[ignore = "benchmark: ~200 MiB, prints figures"]
fn bench_pull_200mib_vs_oras() {
    let t = tools();
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let key = Key::generate(&t, &w.join("key"));
    let src = w.join("big");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..50u64 {
        std::fs::write(src.join(format!("blob{i}")), pseudo_random(4 << 20, i + 1)).unwrap();
    }
    let scratch = ObjectStore::open(&w.join("scratch")).unwrap();
    let built = build_module(
        &src,
        &BuildOptions {
            compression: LayerCompression::None,
            ..Default::default()
        },
        &scratch,
    )
    .unwrap();
    std::fs::write(w.join("big.tar"), &built.layer).unwrap();
    let d = push(
        &t,
        &format!("{}/mod/big:v1", reg.host()),
        w,
        &[("big.tar", built.layer_media_type)],
        None,
        &[(COMPOSEFS_DIGEST_ANNOTATION, built.image_digest.to_string())],
    );
    sign(&t, &key, &format!("{}/mod/big@{d}", reg.host()));
    let mib = built.layer.len() as f64 / (1 << 20) as f64;
    let repo: Repository = format!("{}/mod/big", reg.host()).parse().unwrap();
    let c = client();
    let layer = c.manifest(&repo, &d, Some(&d)).unwrap().manifest.layers[0].clone();
    let shm = Path::new("/dev/shm");
    let oras = |out: &Path| {
        run(Command::new(&t.oras)
            .args(["pull", "--plain-http", "-o"])
            .arg(out)
            .arg(format!("{}/mod/big@{d}", reg.host())));
    };
    // Warm-up: the registry's blob in the page cache, our code and oras paged in.
    let warm = ObjectStore::open(&w.join("warm")).unwrap();
    let r = pull(&reg, "mod/big", &d, &key.trust(), &warm).unwrap();
    assert!(r.bytes_received >= built.layer.len() as u64);
    oras(&w.join("oras-warm"));

    // Rounds of every case in turn, each after a `sync` (the store's final syncfs
    // flushes the whole filesystem, so it would also pay for what others left dirty),
    // with the CPU each used (ours: this process; the registry's; oras': children).
    let ticks = |pid: &str| -> (u64, u64) {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let f: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
        // utime+stime, cutime+cstime: fields 14-17 of the line, counted from the
        // state (field 3) after the command name.
        let at = |i: usize| {
            f.get(i - 3)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        (at(14) + at(15), at(16) + at(17))
    };
    let reg_pid = reg.child.id().to_string();
    let hz = rustix::param::clock_ticks_per_second() as f64;
    const ROUNDS: usize = 5;
    let cases = [
        "fetch+sha256 alone (to a sink)",
        "unpack alone from memory, tmpfs",
        "unpack alone from memory, disk",
        "pull, tmpfs store",
        "pull, disk store",
        "oras pull (to disk)",
    ];
    let mut times = vec![Vec::new(); cases.len()];
    let mut cpu = vec![(0u64, 0u64, 0u64); cases.len()];
    let mut phases = [(0.0f64, 0.0f64, 0.0f64); 2];
    for round in 0..ROUNDS {
        for (i, case) in cases.iter().enumerate() {
            let dir = w.join(format!("round{round}-{i}"));
            let mem = shm
                .is_dir()
                .then(|| tempfile::tempdir_in(shm).unwrap())
                .filter(|_| case.contains("tmpfs"));
            let root = mem.as_ref().map_or(dir.clone(), |m| m.path().join("s"));
            let store = ObjectStore::open(&root).unwrap();
            run(&mut Command::new("sync"));
            let (s0, c0) = ticks("self");
            let (r0, _) = ticks(&reg_pid);
            let t0 = Instant::now();
            match i {
                0 => {
                    let mut b = c.blob(&repo, &layer).unwrap();
                    std::io::copy(&mut b, &mut std::io::sink()).unwrap();
                }
                1 | 2 => {
                    super::install_image(&store, &built.image_digest, 1, |_| {
                        Ok((built.layer_media_type.to_string(), &built.layer[..]))
                    })
                    .unwrap();
                }
                3 | 4 => {
                    let r = pull(&reg, "mod/big", &d, &key.trust(), &store).unwrap();
                    let p = &mut phases[i - 3];
                    p.0 += r.verify_time.as_secs_f64() / ROUNDS as f64;
                    p.1 += r.install.unpack_time.as_secs_f64() / ROUNDS as f64;
                    p.2 += r.install.commit_time.as_secs_f64() / ROUNDS as f64;
                }
                _ => oras(&dir.join("oras")),
            }
            times[i].push(t0.elapsed().as_secs_f64());
            let (s1, c1) = ticks("self");
            let (r1, _) = ticks(&reg_pid);
            cpu[i].0 += s1 - s0;
            cpu[i].1 += c1 - c0;
            cpu[i].2 += r1 - r0;
            drop(store);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let medians: Vec<f64> = times.iter_mut().map(median).collect();
    let oras_m = medians[5];
    eprintln!(
        "bench: {mib:.0} MiB module (50 x 4 MiB, one tar layer), after sync, median of {ROUNDS}:"
    );
    for (i, case) in cases.iter().enumerate() {
        let ms = |t: u64| t as f64 * 1e3 / hz / ROUNDS as f64;
        eprintln!(
            "bench:   {case:<34} {:.3}s ({:>4.0} MiB/s; vs oras {:.2}x)  cpu/run: ours {:.0} ms, oras {:.0} ms, registry {:.0} ms  runs {:.3?}",
            medians[i],
            mib / medians[i],
            oras_m / medians[i],
            ms(cpu[i].0),
            ms(cpu[i].1),
            ms(cpu[i].2),
            times[i],
        );
    }
    for (name, p) in [("tmpfs", phases[0]), ("disk", phases[1])] {
        eprintln!(
            "bench:   pull phases ({name}, means): signature verified at {:.1} ms (concurrent), \
             layers fetched+unpacked {:.1} ms, image built+checked+recorded (final syncfs) {:.1} ms",
            p.0 * 1e3,
            p.1 * 1e3,
            p.2 * 1e3
        );
    }
    eprintln!(
        "bench: ratio vs oras pull: tmpfs store {:.2}x, disk store {:.2}x",
        oras_m / medians[3],
        oras_m / medians[4]
    );

    // Network dedup: the module as a chunked gzip layer with a TOC (what the publisher
    // makes), v1 then v2 with one 4 MiB file changed.
    let scratch = ObjectStore::open(&w.join("scratch-gz")).unwrap();
    let gz1 = build_module(&src, &BuildOptions::default(), &scratch).unwrap();
    std::fs::write(src.join("blob7"), pseudo_random(4 << 20, 1_000)).unwrap();
    let gz2 = build_module(&src, &BuildOptions::default(), &scratch).unwrap();
    let mut digests = Vec::new();
    for (tag, b) in [("v1", &gz1), ("v2", &gz2)] {
        let file = format!("big-{tag}.tar.gz");
        std::fs::write(w.join(&file), &b.layer).unwrap();
        let d = push_annotated(
            &t,
            &format!("{}/mod/biggz:{tag}", reg.host()),
            w,
            &[(&file, b.layer_media_type)],
            None,
            &[(COMPOSEFS_DIGEST_ANNOTATION, b.image_digest.to_string())],
            b.toc.as_ref().map(|toc| (file.as_str(), toc.annotations())),
        );
        sign(&t, &key, &format!("{}/mod/biggz@{d}", reg.host()));
        digests.push(d);
    }
    let store = ObjectStore::open(&w.join("store-gz")).unwrap();
    let t0 = Instant::now();
    let r1 = pull(&reg, "mod/biggz", &digests[0], &key.trust(), &store).unwrap();
    let t1 = t0.elapsed();
    let t0 = Instant::now();
    let r2 = pull(&reg, "mod/biggz", &digests[1], &key.trust(), &store).unwrap();
    let t2 = t0.elapsed();
    eprintln!(
        "bench: dedup v1 -> v2 (gzip layer {} B, TOC {} B, one 4 MiB file changed): \
         v1 pull {} B in {:.2}s; v2 after v1 {} B in {:.2}s ({} ranged reads): \
         {:.1}% of the whole-layer pull ({:.0}x fewer bytes)",
        gz2.layer.len(),
        gz2.toc.as_ref().map_or(0, |t| t.size),
        r1.bytes_received,
        t1.as_secs_f64(),
        r2.bytes_received,
        t2.as_secs_f64(),
        r2.ranged.range_requests,
        100.0 * r2.bytes_received as f64 / gz2.layer.len() as f64,
        gz2.layer.len() as f64 / r2.bytes_received as f64
    );
}

/// Publishes each `(version, key)` of module `name` at `repo` (each with its own
/// `etc/conf`), signed by that key with the name and version bound, as
/// `publish-module` signs; answers (manifest digest, built module) in order.
fn publish_signed_versions(
    t: &Tools,
    reg: &Registry,
    w: &Path,
    repo: &str,
    name: &str,
    versions: &[(&str, &Key)],
) -> Vec<(String, powernode_modfmt::publish::BuiltModule)> {
    let src = w.join(format!("src-{name}"));
    sample_tree(&src);
    versions
        .iter()
        .map(|(version, key)| {
            std::fs::write(src.join("etc/conf"), format!("v={version}\n")).unwrap();
            let (d, b) = publish_dir(t, reg, w, &src, repo, &format!("v{version}"), true);
            sign_as(t, key, &format!("{}/{repo}@{d}", reg.host()), name, version);
            (d, b)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_module_runtime_pulls_swaps_and_removes() {
    use super::module_runtime::ModuleRuntime;
    use super::mount::RecordingMounter;
    use crate::module_reconcile::ModuleReconciler;
    use powernode_proto::node::{DesiredModule, DesiredModulesResponse};
    use std::sync::Arc;

    // Tools, registry and publishing are blocking; keep them off the async workers.
    let setup = tokio::task::spawn_blocking(|| {
        let t = tools();
        let reg = Registry::start();
        let work = tempfile::tempdir().unwrap();
        let w = work.path().to_path_buf();
        let key = Key::generate(&t, &w.join("key"));
        let mut signed =
            publish_signed_versions(&t, &reg, &w, "mod/rt", "tools", &[("1", &key), ("2", &key)]);
        let (v2, b2) = signed.pop().unwrap();
        let (v1, b1) = signed.pop().unwrap();
        let src = w.join("src-tools");
        let (bad, _) = publish_dir(&t, &reg, &w, &src, "mod/rt", "unsigned", false);
        (reg, work, key, v1, b1, v2, b2, bad)
    })
    .await
    .unwrap();
    let (reg, work, key, v1, b1, v2, b2, bad) = setup;
    let w = work.path();
    let mounter = Arc::new(RecordingMounter::default());
    let rt = Arc::new(
        ModuleRuntime::new(
            ObjectStore::open(&w.join("store")).unwrap(),
            RegistryOptions {
                allow_http_loopback: true,
                ..Default::default()
            },
            mounter.clone(),
            w.join("run-modules"),
            vec![],
        )
        .with_gc(vec![]),
    );
    let desired = |digest: &str, version: &str| DesiredModulesResponse {
        modules: vec![
            DesiredModule {
                name: "tools".into(),
                version: version.into(),
                repository: format!("{}/mod/rt", reg.host()),
                digest: digest.into(),
                kind: "runtime".into(),
            },
            // Root modules are the init's: the module runtime must not touch them.
            DesiredModule {
                name: "base".into(),
                version: "1".into(),
                repository: format!("{}/mod/absent", reg.host()),
                digest: format!("sha256:{}", "00".repeat(32)),
                kind: "root".into(),
            },
        ],
        trust_keys: vec![key.public_pem()],
    };

    rt.reconcile(&desired(&v1, "1")).await.unwrap();
    let running = rt.running();
    assert_eq!(running.len(), 1);
    assert_eq!(
        (running[0].name.as_str(), running[0].digest.as_str()),
        ("tools", v1.as_str())
    );
    assert_eq!(rt.live_images(), vec![b1.image_digest]);
    let target = w.join("run-modules/tools");
    let calls = mounter.calls();
    assert!(
        calls
            .iter()
            .any(|c| c.starts_with("mount overlay") && c.contains(&target.display().to_string())),
        "{calls:?}"
    );

    // Same digest again: nothing is mounted anew.
    let n = mounter.calls().len();
    rt.reconcile(&desired(&v1, "1")).await.unwrap();
    assert_eq!(mounter.calls().len(), n);

    // v2: the old mount goes, the new one comes.
    rt.reconcile(&desired(&v2, "2")).await.unwrap();
    assert_eq!(rt.running()[0].digest, v2);
    assert_eq!(rt.live_images(), vec![b2.image_digest]);
    // The swap collected v1's image; its objects v2 shares stay.
    assert!(!rt.store().has_image(&b1.image_digest));
    assert!(rt.store().has_image(&b2.image_digest));
    rt.store().verify_image(&b2.image_digest).unwrap();
    let calls = mounter.calls();
    assert!(
        calls[n..]
            .iter()
            .any(|c| c == &format!("umount {}", target.display())),
        "{calls:?}"
    );

    // An unsigned module is refused with its code and leaves v2 running.
    let err = rt.reconcile(&desired(&bad, "3")).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::SignatureMissing, "{}", err.message);
    assert_eq!(rt.running()[0].digest, v2);

    // Nothing desired: unmounted.
    rt.reconcile(&DesiredModulesResponse::default())
        .await
        .unwrap();
    assert!(rt.running().is_empty());
    drop(reg);
}

/// Root only: a module pushed with oras and signed with cosign, pulled by us, mounts
/// as composefs and shows the publisher's tree; a union root over it is writable.
#[test]
fn pulled_module_mounts_with_the_kernel() {
    use super::mount::{mount_module, mount_union, KernelMounter, Mounter, Restrict, Upper};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !rustix::process::geteuid().is_root() {
        missing("mounting needs root (the test command runs as root)");
    }
    let t = tools();
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let key = Key::generate(&t, &w.join("key"));
    let src = w.join("src");
    sample_tree(&src);
    std::fs::set_permissions(src.join("etc"), std::fs::Permissions::from_mode(0o750)).unwrap();
    let (d, built) = publish_dir(&t, &reg, w, &src, "mod/mnt", "v1", true);
    sign(&t, &key, &format!("{}/mod/mnt@{d}", reg.host()));
    let store = ObjectStore::open(&w.join("store")).unwrap();
    let r = pull(&reg, "mod/mnt", &d, &key.trust(), &store).unwrap();
    assert_eq!(r.image(), built.image_digest);

    let m = KernelMounter;
    let target = w.join("module");
    let image_mnt = w.join("image");
    mount_module(
        &m,
        &store,
        &r.image(),
        &image_mnt,
        &target,
        Restrict::RUNTIME,
    )
    .unwrap();
    struct Unmount<'a>(Vec<PathBuf>, &'a KernelMounter);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            for p in &self.0 {
                let _ = self.1.unmount(p);
            }
        }
    }
    let mut guard = Unmount(vec![target.clone(), image_mnt.clone()], &m);
    assert_eq!(
        std::fs::read(target.join("usr/bin/tool")).unwrap(),
        std::fs::read(src.join("usr/bin/tool")).unwrap()
    );
    assert_eq!(std::fs::read(target.join("etc/conf")).unwrap(), b"a=1\n");
    assert_eq!(
        std::fs::read_link(target.join("etc/tool")).unwrap(),
        Path::new("../usr/bin/tool")
    );
    let md = std::fs::metadata(target.join("usr/bin/tool")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o755);
    assert_eq!((md.uid(), md.gid(), md.mtime()), (0, 0, 0));
    assert_eq!(
        std::fs::metadata(target.join("etc")).unwrap().mode() & 0o7777,
        0o750
    );
    assert_eq!(
        std::fs::metadata(target.join("etc/conf")).unwrap().ino(),
        std::fs::metadata(target.join("etc/conf.link"))
            .unwrap()
            .ino()
    );
    assert!(
        std::fs::write(target.join("etc/new"), b"x").is_err(),
        "module mounts are read-only"
    );

    let root = w.join("root");
    let union = mount_union(
        &m,
        &store,
        &[r.image()],
        &w.join("union"),
        &Upper::Tmpfs,
        &root,
    )
    .unwrap();
    guard.0.insert(0, root.clone());
    std::fs::write(root.join("etc/new"), b"x").unwrap();
    std::fs::write(root.join("etc/conf"), b"changed").unwrap();
    assert_eq!(
        std::fs::read(target.join("etc/conf")).unwrap(),
        b"a=1\n",
        "lower untouched"
    );
    store.verify_image(&r.image()).unwrap();
    union.unmount(&m).unwrap();
    guard.0.remove(0);
}

/// The signed payload binds the repository, the module name and the version (cosign
/// `-a` annotations): a valid signature stands in for nothing but what it names.
#[test]
fn signature_binds_repository_name_and_version() {
    let t = tools();
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let key = Key::generate(&t, &w.join("key"));
    let src = w.join("src");
    sample_tree(&src);
    let fresh = |name: &str| ObjectStore::open(&w.join("stores").join(name)).unwrap();
    let (bound, _) = publish_dir(&t, &reg, w, &src, "mod/bound", "v1", true);
    sign_as(
        &t,
        &key,
        &format!("{}/mod/bound@{bound}", reg.host()),
        "bound",
        "1",
    );
    std::fs::write(src.join("unique"), b"plain").unwrap();
    let (plain, _) = publish_dir(&t, &reg, w, &src, "mod/plain", "v1", true);
    sign(&t, &key, &format!("{}/mod/plain@{plain}", reg.host()));

    let pull_as = |repo: &str, digest: &str, want: Expected<'_>, store: &str| {
        let r: Repository = format!("{}/{repo}", reg.host()).parse().unwrap();
        pull_module(
            &client(),
            &r,
            digest,
            &key.trust(),
            Some(&want),
            &fresh(store),
        )
    };
    let want = |repository, name, version| Expected {
        repository,
        name,
        version,
    };
    pull_as("mod/bound", &bound, want("mod/bound", "bound", "1"), "ok").unwrap();
    for (case, expected) in [
        ("another module's name", want("mod/bound", "other", "1")),
        (
            "another version (a rollback)",
            want("mod/bound", "bound", "2"),
        ),
        ("another repository", want("mod/other", "bound", "1")),
    ] {
        let e = pull_as("mod/bound", &bound, expected, case).unwrap_err();
        assert_eq!(e.code(), ErrorCode::SignatureMismatch, "{case}: {e}");
        eprintln!("binding: {case:<30} -> {}", crate::error_chain(&e));
    }
    // Signed without the annotations: it names no module, so it is refused for one.
    let e = pull_as(
        "mod/plain",
        &plain,
        want("mod/plain", "plain", "1"),
        "plain",
    )
    .unwrap_err();
    assert_eq!(e.code(), ErrorCode::SignatureMismatch, "{e}");
    assert!(
        crate::error_chain(&e).contains("no org.powernode.module.name annotation"),
        "{}",
        crate::error_chain(&e)
    );
}

/// The node's pins and version floor, through the module runtime: a module signed by a
/// key the control plane sends but the identity does not pin is refused, and an old,
/// validly signed version cannot replace a newer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_enforces_pinned_keys_and_the_version_floor() {
    use super::module_runtime::ModuleRuntime;
    use super::mount::RecordingMounter;
    use super::trust::{VersionFloor, FLOOR_FILE};
    use crate::module_reconcile::ModuleReconciler;
    use powernode_proto::node::{DesiredModule, DesiredModulesResponse};
    use std::sync::Arc;

    let setup = tokio::task::spawn_blocking(|| {
        let t = tools();
        let reg = Registry::start();
        let work = tempfile::tempdir().unwrap();
        let w = work.path().to_path_buf();
        let pinned = Key::generate(&t, &w.join("k1"));
        let rogue = Key::generate(&t, &w.join("k2"));
        let signers = [("1", &pinned), ("2", &pinned), ("3", &rogue)];
        let mut signed = publish_signed_versions(&t, &reg, &w, "mod/app", "app", &signers);
        let (v3, _) = signed.pop().unwrap();
        let (v2, _) = signed.pop().unwrap();
        let (v1, _) = signed.pop().unwrap();
        (reg, work, pinned, rogue, v1, v2, v3)
    })
    .await
    .unwrap();
    let (reg, work, pinned, rogue, v1, v2, v3) = setup;
    let w = work.path();
    let runtime = |floor: VersionFloor| {
        Arc::new(
            ModuleRuntime::new(
                ObjectStore::open(&w.join("store")).unwrap(),
                RegistryOptions {
                    allow_http_loopback: true,
                    ..Default::default()
                },
                Arc::new(RecordingMounter::default()),
                w.join("run-modules"),
                vec![],
            )
            .with_pinned_keys(vec![pinned.public_pem()])
            .with_floor(floor),
        )
    };
    let floor_file = w.join(FLOOR_FILE);
    let rt = runtime(VersionFloor::load(&floor_file).unwrap());
    // The control plane sends both keys, as a compromised one would.
    let desired = |digest: &str, version: &str| DesiredModulesResponse {
        modules: vec![DesiredModule {
            name: "app".into(),
            version: version.into(),
            repository: format!("{}/mod/app", reg.host()),
            digest: digest.into(),
            kind: "runtime".into(),
        }],
        trust_keys: vec![rogue.public_pem(), pinned.public_pem()],
    };
    rt.reconcile(&desired(&v2, "2")).await.unwrap();
    assert_eq!(rt.running()[0].digest, v2);

    // Signed by the key the control plane sent, not the one the node pins.
    let e = rt.reconcile(&desired(&v3, "3")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::SignatureMismatch, "{}", e.message);
    assert_eq!(rt.running()[0].digest, v2);

    // v1 is validly signed by the pinned key, but older than what ran.
    let e = rt.reconcile(&desired(&v1, "1")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::VersionRollback, "{}", e.message);
    assert!(e.message.contains("older than \"2\""), "{}", e.message);
    assert_eq!(rt.running()[0].digest, v2);

    // The floor outlives the agent (its state directory): a restarted one refuses too.
    drop(rt);
    let again = runtime(VersionFloor::load(&floor_file).unwrap());
    let e = again.reconcile(&desired(&v1, "1")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::VersionRollback, "{}", e.message);
    drop(reg);
}
