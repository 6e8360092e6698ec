//! Network dedup against the stub's embedded registry, with the real binaries:
//! `publish-module` v1 (1,000 files) and v2 (one file changed), then
//! `powernode-agent module pull` of v1 and of v2 into one store, over HTTPS through a
//! counting TCP proxy on loopback. v2 must move the changed file, its layer's table of
//! contents and the metadata, far below the layer.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use powernode_tests::{binary, enrolled_node, str_at, stub_cli, test_dir, Server, ServerOptions};
use serde_json::Value;

fn stub(data: &Path, args: &[&str]) -> Result<Value> {
    stub_cli(&binary("powernode-stub")?, data, None, args)
}

/// Counts the bytes `upstream` sends back (TLS records included): what the registry
/// served. Its threads end with their connections; the listener with the test process.
fn counting_proxy(upstream: String) -> Result<(u16, Arc<AtomicU64>)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    let served = Arc::new(AtomicU64::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for client in l.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(&upstream) else {
                return;
            };
            let pipe = |mut from: TcpStream, mut to: TcpStream, count: Option<Arc<AtomicU64>>| {
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        if let Some(c) = &count {
                            c.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            };
            let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                return;
            };
            pipe(client, s2, None);
            pipe(server, c2, Some(count.clone()));
        }
    });
    Ok((port, served))
}

/// A deterministic pseudo-random file body (xorshift), so content does not compress
/// away and no two files share an object.
fn body(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn v2_after_v1_moves_only_the_changed_file() -> Result<()> {
    let dir = test_dir("modules_dedup")?;
    let data = dir.join("data");
    let server = Server::start(&data, ServerOptions::default())?;
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("f"))?;
    for i in 0..1000u64 {
        std::fs::write(src.join(format!("f/{i}")), body(2000 + i as usize, i))?;
    }
    let publish = |version: &str| -> Result<String> {
        let p = stub(
            &data,
            &[
                "publish-module",
                src.to_str().context("utf-8 path")?,
                "--name",
                "dedup",
                "--version",
                version,
            ],
        )?;
        str_at(&p, "/publication/digest")
    };
    let v1 = publish("1")?;
    let changed = body(3000, 99_999);
    std::fs::write(src.join("f/500"), &changed)?;
    let v2 = publish("2")?;

    let (port, served) = counting_proxy(server.addr.clone())?;
    // The registry serves enrolled nodes: a node whose control plane is the relay
    // (so its certificate goes through it, as the pulls do).
    let (_, state) = enrolled_node(
        &server,
        &dir,
        "node",
        Some(&format!("https://127.0.0.1:{port}")),
    )?;
    let store = dir.join("store");
    let pull = |digest: &str| -> Result<(String, u64)> {
        let before = served.load(Ordering::Relaxed);
        let out = Command::new(binary("powernode-agent")?)
            .args(["module", "pull", "--repository"])
            .arg(format!("127.0.0.1:{port}/modules/dedup"))
            .args(["--digest", digest, "--trust-key"])
            .arg(data.join("module-signing.pub"))
            .arg("--ca")
            .arg(data.join("ca.pem"))
            .arg("--state-dir")
            .arg(&state)
            .arg("--store")
            .arg(&store)
            .stdin(Stdio::null())
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "pull failed: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok((stdout, served.load(Ordering::Relaxed) - before))
    };
    let (out1, served1) = pull(&v1)?;
    let (out2, served2) = pull(&v2)?;
    let field = |out: &str, key: &str| -> Result<u64> {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .with_context(|| format!("{key} not in {out:?}"))?
            .parse()
            .map_err(Into::into)
    };
    eprintln!(
        "dedup (embedded registry, HTTPS): v1 pull: registry served {served1} B; \
         v2 after v1: registry served {served2} B ({:.1}% of v1), agent received {} B, \
         stored {} new objects / {} B",
        100.0 * served2 as f64 / served1 as f64,
        field(&out2, "bytes_received")?,
        field(&out2, "new_objects")?,
        field(&out2, "new_bytes")?,
    );
    assert_eq!(field(&out1, "new_objects")?, 1000, "{out1}");
    assert_eq!(field(&out2, "new_objects")?, 1, "{out2}");
    assert_eq!(field(&out2, "new_bytes")?, changed.len() as u64, "{out2}");
    // v1 moved the whole ~2.5 MB layer; v2 the TOC (~53 KB), one 3 KB member and
    // manifests, signature, config and TLS.
    assert!(served1 > 2_400_000, "{served1}");
    assert!(served2 < 100_000, "v2 moved {served2} B");
    Ok(())
}
