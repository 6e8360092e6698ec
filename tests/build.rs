// The VM tier runs only when asked: `POWERNODE_VM_TESTS=1` turns on `cfg(vm_tests)`,
// which un-ignores the tests under `tests/` that boot a real kernel (a plain
// `cargo test` lists them as ignored instead of passing them unchecked).
fn main() {
    println!("cargo::rustc-check-cfg=cfg(vm_tests)");
    println!("cargo::rerun-if-env-changed=POWERNODE_VM_TESTS");
    if std::env::var("POWERNODE_VM_TESTS").is_ok_and(|v| v == "1") {
        println!("cargo::rustc-cfg=vm_tests");
    }
}
