//! Builds the netboot artefacts: the pinned Debian kernel, the kernel-module closure
//! and a deterministic newc initramfs (same inputs, same bytes).
