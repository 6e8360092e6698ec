//! The identity document in every encoding a node reads it: JSON (fw_cfg, a file,
//! cloud user data), base64url (the kernel command line), and the command line that
//! carries it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = powernode_proto::IdentityDocument::parse(data);
    let _ = powernode_agent::identity::cloud::parse_user_data("fuzz", data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = powernode_proto::IdentityDocument::parse_base64url(text);
        let _ = powernode_agent::identity::cmdline::parse(text);
    }
});
