//! Randomness from the kernel RNG (`getrandom(2)`). Key generation may run early in
//! boot, before the RNG is seeded: the non-blocking call is tried first, and when it
//! would block, the wait is logged with how long it took (VMs should have
//! `virtio-rng` so this stays short).

use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::rand::{getrandom, GetRandomFlags};

#[derive(Debug, thiserror::Error)]
#[error("reading the kernel RNG failed")]
pub struct EntropyError(#[source] std::io::Error);

/// How a fill went: `waited` is set when the RNG was not ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fill {
    pub waited: Option<Duration>,
}

fn fill_with(buf: &mut [u8], flags: GetRandomFlags) -> Result<(), Errno> {
    let mut done = 0;
    while done < buf.len() {
        match getrandom(&mut buf[done..], flags) {
            Ok(0) => return Err(Errno::IO),
            Ok(n) => done += n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Fills `buf` from the kernel RNG, waiting for it to be seeded if needed.
pub fn fill(buf: &mut [u8]) -> Result<Fill, EntropyError> {
    let to_io = |e: Errno| EntropyError(std::io::Error::from_raw_os_error(e.raw_os_error()));
    match fill_with(buf, GetRandomFlags::NONBLOCK) {
        Ok(()) => Ok(Fill { waited: None }),
        Err(Errno::AGAIN) => {
            tracing::warn!(
                "kernel RNG is not seeded yet; waiting for entropy (give VMs virtio-rng)"
            );
            let start = Instant::now();
            fill_with(buf, GetRandomFlags::empty()).map_err(to_io)?;
            let waited = start.elapsed();
            tracing::warn!(
                waited_ms = waited.as_millis() as u64,
                "kernel RNG ready after waiting"
            );
            Ok(Fill {
                waited: Some(waited),
            })
        }
        Err(e) => Err(to_io(e)),
    }
}

/// A uniform draw in `[0, 1)` for jitter. Not for secrets; falls back to the clock
/// if the RNG cannot be read, since jitter must never stop the agent.
pub fn unit_random() -> f64 {
    let mut b = [0u8; 8];
    let bits = match fill_with(&mut b, GetRandomFlags::NONBLOCK) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => crate::timeline::boot_ms().wrapping_mul(0x9E37_79B9_7F4A_7C15),
    };
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_and_differs() {
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        fill(&mut a).unwrap();
        fill(&mut b).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0u8; 32]);
    }

    #[test]
    fn unit_random_in_range() {
        for _ in 0..1000 {
            let u = unit_random();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
