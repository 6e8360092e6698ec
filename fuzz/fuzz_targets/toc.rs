//! A layer's table of contents (gzip members with FEXTRA fields), as the node reads
//! it before deciding which ranges to fetch. The signed digest is the input's own,
//! so the parser behind the digest check is what gets fuzzed.
#![no_main]
use libfuzzer_sys::fuzz_target;
use powernode_modfmt::toc::{decode_toc, TocLocation};
use sha2::Digest as _;

fuzz_target!(|data: &[u8]| {
    let loc = TocLocation {
        offset: 1 << 20,
        size: data.len() as u64,
        digest: format!("sha256:{}", hex::encode(sha2::Sha256::digest(data))),
    };
    let _ = decode_toc(data, &loc);
});
