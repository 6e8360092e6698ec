//! Builds the netboot artefacts: the pinned Debian kernel, the kernel-module closure
//! and a deterministic newc initramfs (same inputs, same bytes); and from them the
//! published UEFI disk image ([`disk`]: GPT + FAT32 ESP + a unified kernel image on
//! the pinned systemd-stub, [`uki`]); and the kernel's whole module tree, for a root
//! module stacked over a Debian root ([`kmods`]).
//!
//! It must never put anything unverified into an image: the kernel and stub packages
//! are checked against their pinned sha256 before they are unpacked, and the init
//! must be a static ELF.
//! It runs on the build host only; nothing here is linked into the node.

pub mod build;
pub mod compress;
pub mod cpio;
pub mod disk;
pub mod elf;
pub mod kernel;
pub mod kmods;
pub mod modules;
pub mod spec;
pub mod stub;
pub mod uki;

pub use build::{build, BuildOptions, BuildOutput, Manifest};
pub use compress::Compression;
pub use kernel::KernelPin;
