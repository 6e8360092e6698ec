//! Pure parsers of the kernel's text formats that both the init (PID 1) and the
//! agent read: `/proc/self/mountinfo` ([`mountinfo`]), the kernel command line
//! ([`cmdline`]) and the size file of a QEMU fw_cfg entry ([`fw_cfg`]).
//!
//! Each format has exactly one parser, here; the callers keep their own I/O (the
//! init reads bytes through its `Sys` seam so its recording fake covers them, the
//! agent reads files). This crate must never do I/O, allocate without bound on its
//! own, or panic on any input: every function takes `&str` and returns typed data or
//! a typed error naming what was wrong.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod cmdline;
pub mod fw_cfg;
pub mod mountinfo;
#[doc(hidden)]
pub mod testutil;
