//! `/proc/self/mountinfo`, which the init and the agent read to unmount and to find
//! loop devices.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(mounts) = powernode_sysfmt::mountinfo::parse(text) {
        let _ = powernode_sysfmt::mountinfo::top_at(&mounts, "/");
    }
    for e in powernode_sysfmt::mountinfo::entries(text) {
        let _ = e;
    }
});
