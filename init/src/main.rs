//! `powernode-init`: the static PID 1 of the netboot initramfs. Early mounts, kernel
//! modules, network, then the agent library's bootstrap, then switch_root into the
//! composed root. It must never panic.

fn main() {}
