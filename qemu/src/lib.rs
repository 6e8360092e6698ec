//! Boots Powernode VMs: a pure `VmSpec -> argv` builder and a process guard that
//! kills QEMU on drop.
