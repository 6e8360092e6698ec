//! `powernode-agent fsverity-digest` prints exactly what `fsverity digest` prints.

use std::path::Path;
use std::process::Command;

#[test]
fn fsverity_digest_matches_the_real_tool() {
    let tool = powernode_modfmt::testutil::test_tool("fsverity").unwrap_or_else(|| {
        panic!("`fsverity` (fsverity-utils) is missing: scripts/setup installs it")
    });
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (i, size) in [0usize, 1, 4095, 4096, 4097, (1 << 20) + 1, 300_000]
        .into_iter()
        .enumerate()
    {
        let p = dir.path().join(format!("f{size}"));
        std::fs::write(
            &p,
            powernode_modfmt::testutil::pseudo_random(size, i as u64 + 1),
        )
        .unwrap();
        files.push(p);
    }
    let run = |bin: &Path, pre: &[&str]| {
        let out = Command::new(bin).args(pre).args(&files).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let ours = run(
        Path::new(env!("CARGO_BIN_EXE_powernode-agent")),
        &["fsverity-digest"],
    );
    let theirs = run(&tool, &["digest"]);
    assert_eq!(ours, theirs);
    assert_eq!(ours.lines().count(), files.len());
}

#[test]
fn fsverity_digest_of_a_missing_file_fails() {
    let out = Command::new(env!("CARGO_BIN_EXE_powernode-agent"))
        .args(["fsverity-digest", "/nonexistent/file"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/file"));
}
