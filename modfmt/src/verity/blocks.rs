//! SHA-256 of whole 4096-byte blocks, two blocks at a time where the CPU has SHA-NI.
//!
//! Merkle leaves are independent messages, and one SHA-NI stream is bound by the
//! latency of `sha256rnds2`: interleaving two streams keeps the unit busy and hashes
//! ~1.7x more blocks per cycle (the kernel's fs-verity does the same since Linux 6.16).
//! Anything else (no SHA-NI, other arches, an odd last block) goes through `sha2`;
//! tests check both paths against `sha2` and `fsverity digest`.

use super::{BLOCK_SIZE, HASH_SIZE};
use sha2::{Digest as _, Sha256};

pub(super) fn one(block: &[u8]) -> [u8; HASH_SIZE] {
    debug_assert_eq!(block.len(), BLOCK_SIZE);
    Sha256::digest(block).into()
}

/// `out[i]` = SHA-256 of the i-th 4096-byte block of `data` (`data.len()` is
/// `out.len() * BLOCK_SIZE`).
pub(super) fn many(data: &[u8], out: &mut [[u8; HASH_SIZE]]) {
    debug_assert_eq!(data.len(), out.len() * BLOCK_SIZE);
    #[cfg(target_arch = "x86_64")]
    if shani::available() {
        let mut pairs = data.chunks_exact(2 * BLOCK_SIZE);
        let mut outs = out.chunks_exact_mut(2);
        for (pair, o) in (&mut pairs).zip(&mut outs) {
            let (a, b) = pair.split_at(BLOCK_SIZE);
            let (oa, ob) = o.split_at_mut(1);
            shani::two(a, b, &mut oa[0], &mut ob[0]);
        }
        for (h, block) in outs
            .into_remainder()
            .iter_mut()
            .zip(pairs.remainder().chunks_exact(BLOCK_SIZE))
        {
            *h = one(block);
        }
        return;
    }
    for (h, block) in out.iter_mut().zip(data.chunks_exact(BLOCK_SIZE)) {
        *h = one(block);
    }
}

/// Forces the portable path (tests compare the two).
#[cfg(test)]
pub(super) fn many_portable(data: &[u8], out: &mut [[u8; HASH_SIZE]]) {
    for (h, block) in out.iter_mut().zip(data.chunks_exact(BLOCK_SIZE)) {
        *h = one(block);
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(super) mod shani {
    use super::super::{BLOCK_SIZE, HASH_SIZE};
    use core::arch::x86_64::*;

    pub(crate) fn available() -> bool {
        std::is_x86_feature_detected!("sha")
            && std::is_x86_feature_detected!("sse4.1")
            && std::is_x86_feature_detected!("ssse3")
    }

    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    const IV: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];

    /// The padding block of a 4096-byte message: 0x80, zeros, the bit length.
    const PAD: [u8; 64] = {
        let mut p = [0u8; 64];
        p[0] = 0x80;
        let bits = (BLOCK_SIZE as u64 * 8).to_be_bytes();
        let mut i = 0;
        while i < 8 {
            p[56 + i] = bits[i];
            i += 1;
        }
        p
    };

    /// Hashes the 4096-byte blocks `a` and `b` into `oa` and `ob`.
    pub(crate) fn two(a: &[u8], b: &[u8], oa: &mut [u8; HASH_SIZE], ob: &mut [u8; HASH_SIZE]) {
        assert!(a.len() == BLOCK_SIZE && b.len() == BLOCK_SIZE && available());
        // SAFETY: the CPU has SHA-NI, SSSE3 and SSE4.1 (checked just above), and
        // both inputs are exactly BLOCK_SIZE bytes, which `two_blocks` reads.
        unsafe { two_blocks(a.as_ptr(), b.as_ptr(), oa, ob) }
    }

    /// # Safety
    /// The CPU supports `sha`, `ssse3`, `sse4.1`; `a` and `b` point to BLOCK_SIZE
    /// readable bytes each.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    unsafe fn two_blocks(
        a: *const u8,
        b: *const u8,
        oa: &mut [u8; HASH_SIZE],
        ob: &mut [u8; HASH_SIZE],
    ) {
        // State in the ABEF / CDGH lane order sha256rnds2 works on.
        let dcba = _mm_loadu_si128(IV.as_ptr().cast());
        let hgfe = _mm_loadu_si128(IV.as_ptr().add(4).cast());
        let cdab = _mm_shuffle_epi32(dcba, 0xB1);
        let efgh = _mm_shuffle_epi32(hgfe, 0x1B);
        let abef0 = _mm_alignr_epi8(cdab, efgh, 8);
        let cdgh0 = _mm_blend_epi16(efgh, cdab, 0xF0);
        let (mut abef_a, mut cdgh_a, mut abef_b, mut cdgh_b) = (abef0, cdgh0, abef0, cdgh0);
        for i in 0..BLOCK_SIZE / 64 {
            compress2(
                &mut abef_a,
                &mut cdgh_a,
                &mut abef_b,
                &mut cdgh_b,
                a.add(i * 64),
                b.add(i * 64),
            );
        }
        compress2(
            &mut abef_a,
            &mut cdgh_a,
            &mut abef_b,
            &mut cdgh_b,
            PAD.as_ptr(),
            PAD.as_ptr(),
        );
        store(abef_a, cdgh_a, oa);
        store(abef_b, cdgh_b, ob);
    }

    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    unsafe fn store(abef: __m128i, cdgh: __m128i, out: &mut [u8; HASH_SIZE]) {
        let feba = _mm_shuffle_epi32(abef, 0x1B);
        let dchg = _mm_shuffle_epi32(cdgh, 0xB1);
        let dcba = _mm_blend_epi16(feba, dchg, 0xF0);
        let hgef = _mm_alignr_epi8(dchg, feba, 8);
        // Words to big-endian bytes.
        let swap = _mm_set_epi8(12, 13, 14, 15, 8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3);
        _mm_storeu_si128(out.as_mut_ptr().cast(), _mm_shuffle_epi8(dcba, swap));
        _mm_storeu_si128(
            out.as_mut_ptr().add(16).cast(),
            _mm_shuffle_epi8(hgef, swap),
        );
    }

    /// One 64-byte block into each of two states, the two instruction streams
    /// interleaved.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    #[inline]
    unsafe fn compress2(
        abef_a: &mut __m128i,
        cdgh_a: &mut __m128i,
        abef_b: &mut __m128i,
        cdgh_b: &mut __m128i,
        pa: *const u8,
        pb: *const u8,
    ) {
        let mask = _mm_set_epi64x(
            0x0C0D_0E0F_0809_0A0Bu64 as i64,
            0x0405_0607_0001_0203u64 as i64,
        );
        let (sa0, sa1, sb0, sb1) = (*abef_a, *cdgh_a, *abef_b, *cdgh_b);
        let (mut ea, mut ca, mut eb, mut cb) = (sa0, sa1, sb0, sb1);
        macro_rules! load {
            ($p:expr, $i:expr) => {
                _mm_shuffle_epi8(_mm_loadu_si128($p.add(16 * $i).cast()), mask)
            };
        }
        let mut wa = [load!(pa, 0), load!(pa, 1), load!(pa, 2), load!(pa, 3)];
        let mut wb = [load!(pb, 0), load!(pb, 1), load!(pb, 2), load!(pb, 3)];
        // 16 groups of 4 rounds; from group 4 on, the schedule makes the next words.
        macro_rules! group {
            ($g:expr) => {{
                let j = $g % 4;
                if $g >= 4 {
                    let (w0, w1, w2, w3) = (j, ($g + 1) % 4, ($g + 2) % 4, ($g + 3) % 4);
                    wa[w0] = _mm_sha256msg2_epu32(
                        _mm_add_epi32(
                            _mm_sha256msg1_epu32(wa[w0], wa[w1]),
                            _mm_alignr_epi8(wa[w3], wa[w2], 4),
                        ),
                        wa[w3],
                    );
                    wb[w0] = _mm_sha256msg2_epu32(
                        _mm_add_epi32(
                            _mm_sha256msg1_epu32(wb[w0], wb[w1]),
                            _mm_alignr_epi8(wb[w3], wb[w2], 4),
                        ),
                        wb[w3],
                    );
                }
                let k = _mm_loadu_si128(K.as_ptr().add(4 * $g).cast());
                let ta = _mm_add_epi32(wa[j], k);
                let tb = _mm_add_epi32(wb[j], k);
                ca = _mm_sha256rnds2_epu32(ca, ea, ta);
                cb = _mm_sha256rnds2_epu32(cb, eb, tb);
                ea = _mm_sha256rnds2_epu32(ea, ca, _mm_shuffle_epi32(ta, 0x0E));
                eb = _mm_sha256rnds2_epu32(eb, cb, _mm_shuffle_epi32(tb, 0x0E));
            }};
        }
        group!(0);
        group!(1);
        group!(2);
        group!(3);
        group!(4);
        group!(5);
        group!(6);
        group!(7);
        group!(8);
        group!(9);
        group!(10);
        group!(11);
        group!(12);
        group!(13);
        group!(14);
        group!(15);
        *abef_a = _mm_add_epi32(ea, sa0);
        *cdgh_a = _mm_add_epi32(ca, sa1);
        *abef_b = _mm_add_epi32(eb, sb0);
        *cdgh_b = _mm_add_epi32(cb, sb1);
    }
}
