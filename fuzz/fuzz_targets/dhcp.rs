//! A DHCP reply as the init's client parses it (any host on the segment can send one).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let xid = data
        .get(4..8)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0);
    let _ = powernode_init::dhcp::parse(data, xid);
});
