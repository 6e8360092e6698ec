//! Helpers for tests of this crate and of its users (the agent, the publisher):
//! interop tools and deterministic data. Not part of the format.

use std::path::Path;

/// An interop tool for tests: found on PATH, else installed once through
/// `scripts/tools` (serialised: apt allows one install at a time); `None` only when
/// that fails (callers fail the test naming the tool).
pub fn test_tool(name: &str) -> Option<std::path::PathBuf> {
    use std::process::Command;
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let find = || {
        Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| std::path::PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
    };
    if let Some(p) = find() {
        return Some(p);
    }
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if find().is_none() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/tools");
        let _ = Command::new(script).status();
    }
    let found = find();
    if found.is_none() {
        eprintln!("`{name}` could not be installed (scripts/tools)");
    }
    found
}

/// Deterministic pseudo-random bytes (xorshift64*), so failures reproduce.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}
