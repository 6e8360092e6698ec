//! Root module trees for the VM tests: a minimal busybox root.

use std::path::{Path, PathBuf};

use crate::workspace_root;

/// Debian bookworm's static busybox, fetched once into `cache/busybox/` with
/// `apt-get download busybox-static` + `dpkg -x`.
pub fn busybox() -> PathBuf {
    let cache = workspace_root().join("cache/busybox");
    let bin = cache.join("root/bin/busybox");
    if bin.exists() {
        return bin;
    }
    std::fs::create_dir_all(&cache).unwrap();
    let run = |cmd: &mut std::process::Command| {
        let st = cmd.current_dir(&cache).status().expect("run apt-get/dpkg");
        assert!(st.success(), "{cmd:?}: {st}");
    };
    run(std::process::Command::new("apt-get").args(["download", "busybox-static"]));
    let deb = std::fs::read_dir(&cache)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("busybox-static .deb");
    run(std::process::Command::new("dpkg")
        .arg("-x")
        .arg(&deb)
        .arg("root"));
    assert!(bin.exists(), "{} missing after dpkg -x", bin.display());
    bin
}

/// A minimal busybox root under `dir/base-root-VERSION`: `bin/busybox`, applet
/// symlinks (`bin/sh` among them), `etc/` files (`os-release` names `version`) and the
/// mount points the init and the runtime tests use.
pub fn busybox_root(dir: &Path, version: &str) -> PathBuf {
    let root = dir.join(format!("base-root-{version}"));
    let _ = std::fs::remove_dir_all(&root);
    for d in [
        "bin", "etc", "dev", "proc", "sys", "run", "tmp", "opt", "persist",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(busybox(), root.join("bin/busybox")).unwrap();
    for applet in ["sh", "ls", "cat", "mount", "sleep"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("etc/hostname"), "powernode-base\n").unwrap();
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").unwrap();
    std::fs::write(
        root.join("etc/os-release"),
        format!("ID=powernode-base\nVERSION_ID={version}\n"),
    )
    .unwrap();
    root
}
