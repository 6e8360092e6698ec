//! The real tools the interop tests drive (cosign, oras, docker-registry): found in
//! the project cache or PATH, run with a deadline and killed on drop.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The tool from the project cache or PATH; tries `scripts/tools` once when absent.
pub fn tool(name: &str) -> PathBuf {
    let find = || {
        let cached = workspace().join("cache/root/usr/bin").join(name);
        if cached.is_file() {
            return Some(cached);
        }
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|c| c.is_file())
        })
    };
    if let Some(p) = find() {
        return p;
    }
    let _ = std::process::Command::new(workspace().join("scripts/tools"))
        .stdout(std::process::Stdio::null())
        .status();
    // A missing tool fails the test, naming it: passing without the interop check
    // would be a false `ok`.
    find().unwrap_or_else(|| {
        panic!(
            "`{name}` is missing and scripts/tools did not install it (cosign, oras: \
             scripts/tools; docker-registry: apt-get install docker-registry)"
        )
    })
}

/// Runs a tool (killed on drop and after 120 s); answers (success, stdout, stderr).
pub async fn run(
    bin: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    cwd: &Path,
) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args)
        .current_dir(cwd)
        .env("HOME", cwd)
        .env("DOCKER_CONFIG", cwd.join(".docker"))
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{} {args:?} timed out", bin.display()))
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
