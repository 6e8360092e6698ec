//! What a registry sends: an OCI manifest and a module's image config (its labels:
//! mount point, services, drain steps, mount options).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<powernode_agent::modules::registry::Manifest>(data);
    let _ = powernode_agent::modules::config::parse(data);
});
