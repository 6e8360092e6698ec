//! Dependency decisions the build must keep: TLS uses rustls with the ring provider
//! only. aws-lc-rs does not build for the static musl PID 1, and a second provider
//! makes rustls refuse to pick a default at run time.

use std::process::Command;

#[test]
fn aws_lc_rs_is_not_in_the_dependency_graph() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(powernode_tests::workspace_root())
        .args([
            "tree",
            "--workspace",
            "--offline",
            "-i",
            "aws-lc-rs",
            "-e",
            "normal,build",
        ])
        .output()
        .expect("running cargo tree");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.trim().is_empty(),
        "aws-lc-rs is pulled in by:\n{stdout}"
    );
    assert!(
        stderr.contains("did not match any packages"),
        "unexpected cargo tree answer: {stderr}"
    );
}
