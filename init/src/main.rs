//! `powernode-init`: PID 1 of the netboot initramfs. Everything lives in the library;
//! see `powernode_init::boot` for the phases.

fn main() {
    powernode_init::main()
}
