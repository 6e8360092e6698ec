//! `powernode-baseline-init`: the boot benchmark's peer. A trivial static PID 1 that
//! prints when it started (ms since boot) and powers off at once, so the benchmark
//! can set our init's timeline beside the bare kernel's on the same kernel and VM.

fn main() {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    let ms = u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0) / 1_000_000);
    println!("POWERNODE-BASELINE {{\"event\":\"init_start\",\"at_ms\":{ms}}}");
    rustix::fs::sync();
    // Nothing else to do whatever reboot answers; the loop keeps PID 1 alive.
    let _ = rustix::system::reboot(rustix::system::RebootCommand::PowerOff);
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
