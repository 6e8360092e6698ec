//! Boots Powernode VMs: a pure `VmSpec -> argv` builder (direct kernel boot, or OVMF
//! booting the published disk image), KVM detection (`accel`, and the canary boot in
//! `canary` where a probe is not enough), the `/persist` disk helper, a process
//! guard that kills QEMU on drop (or lets go of it on purpose), QMP (commands and
//! the event stream), the adoption of a QEMU an earlier process left running, and
//! libvirt (the same VM as a domain, driven through `virsh`).
//!
//! It must never leave a QEMU process behind unasked (every [`Vm`] kills its own pid on
//! drop unless [`Vm::detach`] let go of it)
//! and never guess about KVM: it is used only after a real `KVM_CREATE_VM` worked.

pub mod accel;
pub mod adopt;
pub mod canary;
pub mod disk;
pub mod libvirt;
pub mod qmp;
pub mod spec;
mod sys;
pub mod vm;

pub use accel::Accel;
pub use adopt::{AdoptError, Adopted};
pub use disk::{make_persist_disk, PERSIST_LABEL};
pub use spec::{Device, Firmware, GuestForward, VmSpec};
pub use vm::{ovmf_firmware, Vm, VmError};
