//! Builds the netboot artefacts: the pinned Debian kernel, the kernel-module closure
//! and a deterministic newc initramfs (same inputs, same bytes).
//!
//! It must never put anything unverified into an image: the kernel package is checked
//! against its pinned sha256 before it is unpacked, and the init must be a static ELF.
//! It runs on the build host only; nothing here is linked into the node.

pub mod build;
pub mod compress;
pub mod cpio;
pub mod elf;
pub mod kernel;
pub mod modules;
pub mod spec;

pub use build::{build, BuildOptions, BuildOutput, Manifest};
pub use compress::Compression;
pub use kernel::KernelPin;
