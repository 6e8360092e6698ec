//! The kernel command line as the init and the agent split it, and fw_cfg sizes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = powernode_sysfmt::cmdline::split_params(text);
    let _ = powernode_sysfmt::cmdline::last_value(text, "powernode.identity");
    let _ = powernode_sysfmt::cmdline::flag(text);
    let _ = powernode_init::cmdline::parse(text);
    let _ = powernode_agent::identity::cmdline::parse_pin(text);
    let _ = powernode_sysfmt::fw_cfg::parse_size(text, 1 << 20);
});
