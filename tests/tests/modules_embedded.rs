//! The real agent against the stub's embedded registry: `publish-module` on the
//! server side, `powernode-agent module pull` over HTTPS with the control-plane CA
//! pinned and an enrolled node's certificate (the registry serves enrolled nodes and
//! the admin only), the signature checked with the server's module-signing key (and
//! refused with another key); a node whose instance was terminated can pull no more.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use anyhow::{Context as _, Result};
use powernode_tests::{binary, enrolled_node, str_at, stub_cli, test_dir, Server, ServerOptions};
use serde_json::Value;

fn stub(data: &Path, args: &[&str]) -> Result<Value> {
    stub_cli(&binary("powernode-stub")?, data, None, args)
}

fn agent(args: &[&str]) -> Result<Output> {
    Command::new(binary("powernode-agent")?)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running powernode-agent")
}

/// A small module tree: nested file, symlink, executable.
fn module_tree(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir.join("etc/demo"))?;
    std::fs::create_dir_all(dir.join("bin"))?;
    std::fs::write(dir.join("etc/demo/config.toml"), "answer = 42\n")?;
    std::fs::write(dir.join("bin/hello"), "#!/bin/sh\necho hello\n")?;
    std::fs::set_permissions(
        dir.join("bin/hello"),
        std::fs::Permissions::from_mode(0o755),
    )?;
    std::os::unix::fs::symlink("demo/config.toml", dir.join("etc/config.toml"))?;
    Ok(())
}

#[test]
fn agent_pulls_a_published_module_from_the_embedded_registry() -> Result<()> {
    let dir = test_dir("modules_embedded_pull")?;
    let data = dir.join("data");
    let server = Server::start(&data, ServerOptions::default())?;
    let src = dir.join("src");
    module_tree(&src)?;

    let published = stub(
        &data,
        &[
            "publish-module",
            src.to_str().context("utf-8 path")?,
            "--name",
            "demo",
            "--version",
            "1",
            "--kind",
            "runtime",
        ],
    )?;
    let digest = str_at(&published, "/publication/digest")?;
    let pubs = stub(&data, &["list-module-publications"])?;
    let publication = pubs["publications"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == "demo"))
        .with_context(|| format!("demo not listed: {pubs}"))?;
    assert_eq!(publication["digest"], digest.as_str(), "{publication}");
    let mut repository = str_at(publication, "/repository")?;
    // The embedded registry may be recorded by path only; the agent needs host:port.
    if !repository.contains(':') {
        repository = format!("{}/{}", server.addr, repository.trim_start_matches('/'));
    }
    assert!(
        repository.ends_with("/modules/demo"),
        "unexpected repository {repository}"
    );

    let store = dir.join("store");
    let trust = data.join("module-signing.pub");
    let ca = data.join("ca.pem");
    let (_, state) = enrolled_node(&server, &dir, "node", None)?;
    let pull = |key: &Path, store: &Path| {
        agent(&[
            "module",
            "pull",
            "--repository",
            &repository,
            "--digest",
            &digest,
            "--trust-key",
            key.to_str().unwrap_or_default(),
            "--ca",
            ca.to_str().unwrap_or_default(),
            "--state-dir",
            state.to_str().unwrap_or_default(),
            "--store",
            store.to_str().unwrap_or_default(),
        ])
    };
    let out = pull(&trust, &store)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "pull failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = stdout
        .split_whitespace()
        .next()
        .context("no image digest printed")?
        .to_string();
    assert!(image.starts_with("sha256:"), "{stdout}");
    assert!(stdout.contains(&digest), "{stdout}");
    // The composefs digest the server recorded is the one the agent built.
    if let Some(c) = publication["composefs_digest"].as_str() {
        assert_eq!(c, image, "{publication}");
    }

    // Another trust key: the same bytes are refused with signature_mismatch.
    let other_key = dir.join("other.pub");
    std::fs::write(&other_key, OTHER_KEY)?;
    let out = pull(&other_key, &dir.join("store-other"))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "pull with a foreign key succeeded");
    assert!(stderr.contains("signature_mismatch"), "{stderr}");

    // Mounting needs root (composefs / overlayfs): the mounted tree is compared too.
    require_root("the mount comparison");
    {
        let at = dir.join("mnt");
        std::fs::create_dir_all(&at)?;
        let out = agent(&[
            "module",
            "mount",
            "--store",
            store.to_str().unwrap_or_default(),
            "--image",
            &image,
            "--at",
            at.to_str().unwrap_or_default(),
        ])?;
        assert!(
            out.status.success(),
            "mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cfg = std::fs::read_to_string(at.join("etc/demo/config.toml"));
        let link = std::fs::read_link(at.join("etc/config.toml"));
        let mode = std::fs::metadata(at.join("bin/hello")).map(|m| m.permissions().mode());
        let _ = Command::new("umount").arg("-R").arg(&at).status();
        // The EROFS image stays mounted under the store; `module mount` put it there.
        let hex = image.trim_start_matches("sha256:");
        let _ = Command::new("umount")
            .arg(store.join("mnt").join(hex))
            .status();
        assert_eq!(cfg?, "answer = 42\n");
        assert_eq!(link?, Path::new("demo/config.toml"));
        assert_eq!(mode? & 0o777, 0o755);
    }
    drop(server);
    Ok(())
}

fn running_as_root() -> bool {
    // /proc/self/status Uid line: real, effective, ...
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A P-256 public key that did not sign anything here.
const OTHER_KEY: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEL/oFf882++LSob+Dsp9PCupI/gV9
J65+OTyjKLSKCEcqGY7m5uKTmJO0zURyPvpKyCWij1TVzrKUv3iMaY3S2A==
-----END PUBLIC KEY-----
";

/// `scripts/tools` installs Go tools into `cache/root/usr/bin`, which is not on PATH:
/// look there first (installing once if needed), then PATH. A tool that cannot be
/// had fails the test, naming it: `scripts/tools` fetches it, so CI always has it.
fn interop_tool(name: &str) -> std::path::PathBuf {
    let cached = powernode_tests::workspace_root()
        .join("cache/root/usr/bin")
        .join(name);
    if cached.is_file() {
        return cached;
    }
    let found = powernode_modfmt::testutil::test_tool(name);
    if cached.is_file() {
        return cached;
    }
    found.unwrap_or_else(|| {
        panic!("`{name}` is missing and scripts/tools could not fetch it (run scripts/tools)")
    })
}

/// Mounting (composefs, overlayfs) needs root; the test command runs as root, so a
/// non-root run fails here, naming the reason, instead of passing unchecked.
fn require_root(what: &str) {
    assert!(
        running_as_root(),
        "{what} needs root (mounts); run the tests as root, as scripts/test does"
    );
}

fn run_tool(bin: &Path, args: &[&str], env: &[(&str, &str)], cwd: &Path) -> Result<Output> {
    Command::new(bin)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", bin.display()))
}

/// `oras push` of a tar layer into OUR registry, `cosign sign --key` with a fresh key
/// into the same registry, then our agent pulls it and verifies that signature.
#[test]
fn agent_pulls_what_oras_pushed_and_cosign_signed() -> Result<()> {
    let oras = interop_tool("oras");
    let cosign = interop_tool("cosign");
    let dir = test_dir("modules_embedded_oras")?;
    let data = dir.join("data");
    let server = Server::start(&data, ServerOptions::default())?;
    let src = dir.join("src");
    module_tree(&src)?;

    // The layer and the composefs digest our publisher would record for it.
    let scratch = powernode_modfmt::store::ObjectStore::open(&dir.join("scratch"))?;
    let built = powernode_modfmt::publish::build_module(
        &src,
        &powernode_modfmt::publish::BuildOptions::default(),
        &scratch,
    )?;
    let work = dir.join("work");
    std::fs::create_dir_all(&work)?;
    std::fs::write(work.join("layer.tar.gz"), &built.layer)?;

    let ca = data.join("ca.pem");
    let ca_s = ca.to_str().context("utf-8 path")?;
    let token = std::fs::read_to_string(data.join("admin-token"))?
        .trim()
        .to_string();
    let reference = format!("{}/modules/orasdemo:v1", server.addr);
    let annotation = format!(
        "{}={}",
        powernode_tests::proto::node::COMPOSEFS_DIGEST_ANNOTATION,
        built.image_digest
    );
    let layer_arg = format!("layer.tar.gz:{}", built.layer_media_type);
    let out = run_tool(
        &oras,
        &[
            "push",
            "--ca-file",
            ca_s,
            "--username",
            "x",
            "--password",
            &token,
            "--annotation",
            &annotation,
            &reference,
            &layer_arg,
        ],
        &[],
        &work,
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "oras push: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Digest: "))
        .with_context(|| format!("oras printed no digest: {stdout}"))?
        .trim()
        .to_string();

    let out = run_tool(
        &cosign,
        &["generate-key-pair"],
        &[("COSIGN_PASSWORD", "")],
        &work,
    )?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let by_digest = format!("{}/modules/orasdemo@{digest}", server.addr);
    let repository = format!("{}/modules/orasdemo", server.addr);
    let (_, state) = enrolled_node(&server, &dir, "node", None)?;
    let state_s = state.to_str().context("utf-8 path")?;
    let pull = |key: &Path, store: &Path| {
        agent(&[
            "module",
            "pull",
            "--repository",
            &repository,
            "--digest",
            &digest,
            "--trust-key",
            key.to_str().unwrap_or_default(),
            "--ca",
            ca_s,
            "--state-dir",
            state_s,
            "--store",
            store.to_str().unwrap_or_default(),
        ])
    };
    // Before anyone signed it, the agent refuses it.
    let out = pull(&work.join("cosign.pub"), &dir.join("store-unsigned"))?;
    assert!(!out.status.success(), "an unsigned module was accepted");

    let out = run_tool(
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
            &token,
            &by_digest,
        ],
        &[("SSL_CERT_FILE", ca_s), ("COSIGN_PASSWORD", "")],
        &work,
    )?;
    assert!(
        out.status.success(),
        "cosign sign: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let out = pull(&work.join("cosign.pub"), &dir.join("store"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "agent pull: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with(&built.image_digest.to_string()),
        "{stdout} vs {}",
        built.image_digest
    );
    // The server's key did not sign this one.
    let out = pull(&data.join("module-signing.pub"), &dir.join("store-other"))?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("signature_mismatch"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(server);
    Ok(())
}

/// Unmounts whatever an agent mounted under a modules dir, also when an assertion fails.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-R")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
        if let Ok(entries) = std::fs::read_dir(&self.0) {
            for e in entries.flatten() {
                let _ = Command::new("umount")
                    .arg("-R")
                    .arg(e.path())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.0.join(".images")) {
            for e in entries.flatten() {
                let _ = Command::new("umount")
                    .arg(e.path())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// A server whose template runs runtime module `demo` (published from
/// [`module_tree`]), and the live agent of one provisioned instance, with its modules
/// mounted under `dir/modules` (unmounted on drop).
struct LiveNode {
    // Dropped in this order: the agent, its mounts, then the server.
    agent: powernode_tests::Agent,
    _unmount: Unmount,
    server: Server,
    dir: std::path::PathBuf,
    data: std::path::PathBuf,
    instance: String,
    /// The `demo` publication's manifest digest.
    digest: String,
    modules_dir: std::path::PathBuf,
}

fn live_node(test: &str, hostname: &str) -> Result<LiveNode> {
    require_root("the live module mount");
    let dir = test_dir(test)?;
    let data = dir.join("data");
    let server = Server::start(&data, ServerOptions::default())?;
    let src = dir.join("src");
    module_tree(&src)?;
    let published = stub(
        &data,
        &[
            "publish-module",
            src.to_str().context("utf-8 path")?,
            "--name",
            "demo",
            "--version",
            "1",
            "--kind",
            "runtime",
        ],
    )?;
    let digest = str_at(&published, "/publication/digest")?;
    stub(
        &data,
        &[
            "set-template-modules",
            "tmpl-edge-base",
            "--runtime",
            "demo",
        ],
    )?;
    let (_node, instance) = server.create_and_provision(hostname)?;
    let modules_dir = dir.join("modules");
    let modules_arg = modules_dir.to_string_lossy().into_owned();
    let _unmount = Unmount(modules_dir.clone());
    let agent = powernode_tests::Agent::with_identity(
        &dir,
        "agent",
        &server.identity(&instance)?,
        &["--modules-dir", &modules_arg],
    )?;
    Ok(LiveNode {
        dir,
        data,
        server,
        instance,
        digest,
        modules_dir,
        agent,
        _unmount,
    })
}

impl LiveNode {
    /// Waits until a heartbeat reports `demo` at its published digest.
    fn wait_demo_reported(&self, within: std::time::Duration) -> Result<Value> {
        powernode_tests::wait_for("demo digest in heartbeat", within, || {
            let inst = self.server.instance(&self.instance)?;
            let found = inst["modules"].as_array().is_some_and(|m| {
                m.iter()
                    .any(|m| m["name"] == "demo" && m["digest"] == self.digest.as_str())
            });
            Ok(found.then_some(inst))
        })
        .with_context(|| format!("agent log:\n{}", self.agent.log_text()))
    }
}

/// The live agent (`powernode-agent run`) pulls, verifies and mounts a desired runtime
/// module from the embedded registry, reports its digest in heartbeats, and the
/// control plane sees no drift. Mounting needs root: fails, naming it, otherwise.
#[test]
fn live_agent_mounts_desired_runtime_module_and_reports_no_drift() -> Result<()> {
    let mut n = live_node("modules_embedded_live", "edge-modules")?;
    let inst =
        powernode_tests::wait_running(&n.server, &n.instance, std::time::Duration::from_secs(60))
            .with_context(|| format!("agent log:\n{}", n.agent.log_text()))?;
    let reported = n
        .wait_demo_reported(std::time::Duration::from_secs(30))
        .with_context(|| format!("instance {inst}"))?;
    let (server, instance, modules_dir) = (&n.server, &n.instance, &n.modules_dir);
    let drift = server.get(&powernode_tests::proto::paths::admin_drift(instance))?;
    assert_eq!(drift["drift"], false, "{drift}\n{reported}");
    // The module's tree is mounted where the agent was told.
    assert_eq!(
        std::fs::read_to_string(modules_dir.join("demo/etc/demo/config.toml"))?,
        "answer = 42\n"
    );
    assert!(n.agent.guard.is_running());
    n.agent.guard.terminate(std::time::Duration::from_secs(10));
    Ok(())
}

/// The embedded registry serves enrolled nodes (and the admin) only. The live agent
/// pulls its runtime module with the node's certificate, and `module pull
/// --state-dir` with it too; a pull without one is refused (`registry_unauthorized`,
/// no credentials). Once the admin terminated the instance (`terminate-instance`:
/// its certificates revoked) the agent stops, and a pull with its certificate is
/// refused with `registry_unauthorized` naming the revocation; the server logs each
/// refusal.
#[test]
fn a_revoked_node_can_no_longer_pull_from_the_embedded_registry() -> Result<()> {
    let mut n = live_node("modules_embedded_revoked", "edge-revoked")?;
    // The live agent's reconcile pulled the runtime module with its certificate.
    n.wait_demo_reported(std::time::Duration::from_secs(60))?;
    let (dir, data, server, instance, digest) =
        (&n.dir, &n.data, &n.server, &n.instance, &n.digest);
    let node = &mut n.agent;
    let repository = format!("{}/modules/demo", server.addr);
    let trust = data.join("module-signing.pub");
    let ca = data.join("ca.pem");
    let state = node.state_dir.clone();
    let pull = |with_cert: bool, store: &str| {
        let mut args = vec![
            "module",
            "pull",
            "--repository",
            &repository,
            "--digest",
            digest,
            "--trust-key",
            trust.to_str().unwrap_or_default(),
            "--ca",
            ca.to_str().unwrap_or_default(),
        ];
        if with_cert {
            args.extend(["--state-dir", state.to_str().unwrap_or_default()]);
        }
        let store = dir.join(store);
        let store = store.to_string_lossy().into_owned();
        args.extend(["--store", &store]);
        let out = agent(&args)?;
        Ok::<_, anyhow::Error>((
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let (code, stderr) = pull(true, "store-live")?;
    assert_eq!(code, Some(0), "a live node's pull: {stderr}");
    let (code, stderr) = pull(false, "store-anonymous")?;
    assert_ne!(code, Some(0), "an anonymous pull succeeded");
    assert!(
        stderr.contains("registry_unauthorized") && stderr.contains("no credentials"),
        "{stderr}"
    );

    // The admin ends the instance: its certificates are revoked, the agent is
    // refused at its next call and stops for good.
    server.cli(&["terminate-instance", instance, "--force"])?;
    let status = node
        .guard
        .wait_timeout(std::time::Duration::from_secs(30))?;
    // 3: refused by the control plane for good (`powernode-agent run --help`).
    assert_eq!(status.code(), Some(3), "agent log:\n{}", node.log_text());
    let (code, stderr) = pull(true, "store-revoked")?;
    assert_ne!(code, Some(0), "a revoked node pulled");
    assert!(
        stderr.contains("registry_unauthorized") && stderr.contains("certificate_revoked"),
        "{stderr}"
    );
    assert!(
        std::fs::read_dir(dir.join("store-revoked/objects"))
            .map(|d| d.count() == 0)
            .unwrap_or(true),
        "nothing stored from a refused pull"
    );
    let log = std::fs::read_to_string(dir.join("server.log"))?;
    assert!(
        log.lines().any(|l| l.contains("registry read refused")
            && l.contains("certificate_revoked")
            && l.contains(instance.as_str())),
        "no refusal in the server log"
    );
    Ok(())
}
