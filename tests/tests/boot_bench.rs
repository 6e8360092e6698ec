//! Boot benchmark (prints figures, never fails on time): our init on the real kernel
//! beside a bare-kernel baseline (the same kernel and VM with a trivial static init
//! that powers off at once), measured in the same run, alternating, under TCG (or
//! KVM where it works). Also the binary and initramfs sizes and the smallest VM
//! memory that still boots to `init_done`. Then boot-to-`ready` against a real
//! `powernode-stub` (enrollment, first handshake, agent runtime, `ready`), read from
//! the server's `boot_timeline`, each ready boot paired with a baseline boot just
//! before it (same machine conditions, the server running). Also an uncompressed
//! initramfs and zstd, gzip beside the default lz4.
//!
//!     cargo test -p powernode-tests --release --test boot_bench -- --ignored --nocapture
//!
//! `POWERNODE_BENCH_RUNS` sets the boots per side (default 5).

use std::time::Duration;

use powernode_initramfs::Compression;
use powernode_tests::direct::*;
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(90);

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn phase_ms(done: &Value, phase: &str) -> Option<u64> {
    done["timeline"]
        .as_array()?
        .iter()
        .find(|e| e["phase"] == phase)?["at_ms"]
        .as_u64()
}

fn kib(bytes: u64) -> String {
    format!("{:.1} KiB", bytes as f64 / 1024.0)
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn boot_time_vs_bare_kernel() {
    let runs: usize = std::env::var("POWERNODE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let dir = test_dir("boot_bench");
    let (init, baseline_init) = musl_inits();
    // The default image (lz4), then the same archive in the other formats.
    let image = image(&dir.join("image"), &init, Compression::default());
    let gz = powernode_tests::direct::image(&dir.join("image-gzip"), &init, Compression::Gzip);
    let raw = powernode_tests::direct::image(&dir.join("image-none"), &init, Compression::None);
    let zst = powernode_tests::direct::image(&dir.join("image-zstd"), &init, Compression::Zstd);
    let baseline_initrd = baseline_initrd(&dir, &baseline_init);

    let mut ours_spec = spec(&dir.join("ours"), &image.vmlinuz, &image.initramfs);
    ours_spec.kernel_args = vec![
        "powernode.on_failure=poweroff".into(),
        "powernode.test_poweroff=1".into(),
    ];
    with_identity(&mut ours_spec, &dir, &identity_json("inst-bench"));
    let mut base_spec = spec(&dir.join("baseline"), &image.vmlinuz, &baseline_initrd);
    base_spec.devices = ours_spec.devices.clone();
    let mut gz_spec = ours_spec.clone();
    gz_spec.initrd = gz.initramfs.clone();
    gz_spec.serial_log = dir.join("gzip").join("serial.log");
    let mut raw_spec = ours_spec.clone();
    raw_spec.initrd = raw.initramfs.clone();
    raw_spec.serial_log = dir.join("none").join("serial.log");
    let mut zst_spec = ours_spec.clone();
    zst_spec.initrd = zst.initramfs.clone();
    zst_spec.serial_log = dir.join("zstd").join("serial.log");

    // The same pair with `quiet`: under TCG every console byte is an emulated UART
    // write, so this shows what the kernel's own boot chatter costs.
    let quiet = |s: &powernode_qemu::VmSpec, name: &str| {
        let mut q = s.clone();
        q.kernel_args.push("quiet".into());
        q.serial_log = dir.join(name).join("serial.log");
        q
    };
    let (base_quiet_spec, ours_quiet_spec) = (
        quiet(&base_spec, "baseline-quiet"),
        quiet(&ours_spec, "ours-quiet"),
    );
    let (mut wall_base_q, mut wall_ours_q, mut done_q, mut base_start_q) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());

    let (mut wall_ours, mut wall_base, mut wall_gz) = (Vec::new(), Vec::new(), Vec::new());
    let (mut wall_raw, mut done_raw, mut start_raw) = (Vec::new(), Vec::new(), Vec::new());
    let (mut wall_zst, mut done_zst, mut start_zst) = (Vec::new(), Vec::new(), Vec::new());
    let (mut init_start, mut modules, mut identity, mut done_at, mut base_start) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut network = Vec::new();
    for _ in 0..runs {
        let b = boot(&base_spec, DEADLINE);
        wall_base.push(b.elapsed.as_millis() as u64);
        let ev = events(&b.serial, "POWERNODE-BASELINE ");
        base_start.push(
            ev.first()
                .and_then(|e| e["at_ms"].as_u64())
                .expect("baseline line"),
        );

        let o = boot(&ours_spec, DEADLINE);
        wall_ours.push(o.elapsed.as_millis() as u64);
        let ev = events(&o.serial, "POWERNODE-INIT ");
        let done = event(&ev, "event", "init_done").expect("init_done").clone();
        init_start.push(phase_ms(&done, "init_start").unwrap_or(0));
        modules.push(phase_ms(&done, "modules_loaded").unwrap_or(0));
        identity.push(phase_ms(&done, "identity_found").unwrap_or(0));
        network.push(phase_ms(&done, "network_up").unwrap_or(0));
        done_at.push(done["at_ms"].as_u64().unwrap_or(0));

        let g = boot(&gz_spec, DEADLINE);
        wall_gz.push(g.elapsed.as_millis() as u64);

        let r = boot(&raw_spec, DEADLINE);
        wall_raw.push(r.elapsed.as_millis() as u64);
        let ev = events(&r.serial, "POWERNODE-INIT ");
        let done = event(&ev, "event", "init_done").expect("init_done");
        start_raw.push(phase_ms(done, "init_start").unwrap_or(0));
        done_raw.push(done["at_ms"].as_u64().unwrap_or(0));

        let z = boot(&zst_spec, DEADLINE);
        wall_zst.push(z.elapsed.as_millis() as u64);
        let ev = events(&z.serial, "POWERNODE-INIT ");
        let done = event(&ev, "event", "init_done").expect("init_done");
        start_zst.push(phase_ms(done, "init_start").unwrap_or(0));
        done_zst.push(done["at_ms"].as_u64().unwrap_or(0));

        let b = boot(&base_quiet_spec, DEADLINE);
        wall_base_q.push(b.elapsed.as_millis() as u64);
        let ev = events(&b.serial, "POWERNODE-BASELINE ");
        base_start_q.push(
            ev.first()
                .and_then(|e| e["at_ms"].as_u64())
                .expect("baseline line"),
        );
        let o = boot(&ours_quiet_spec, DEADLINE);
        wall_ours_q.push(o.elapsed.as_millis() as u64);
        let ev = events(&o.serial, "POWERNODE-INIT ");
        let done = event(&ev, "event", "init_done").expect("init_done");
        done_q.push(done["at_ms"].as_u64().unwrap_or(0));
    }

    // Boot to `ready` with the agent against a real server: the figure the issue's
    // goal (<= 1.3x the baseline) is about.
    let stub = powernode_tests::direct::stub::Stub::start(&dir);
    let mut agent_spec = spec(&dir.join("ready"), &image.vmlinuz, &image.initramfs);
    agent_spec.kernel_args = vec!["powernode.on_failure=poweroff".into()];
    // Each ready boot is paired with a baseline boot just before it, under the same
    // conditions (the server running on the host, whatever else the machine does).
    let mut ready_runs = Vec::new();
    let mut base_paired = Vec::new();
    for i in 0..runs {
        let b = boot(&base_spec, DEADLINE);
        let ev = events(&b.serial, "POWERNODE-BASELINE ");
        let at = ev.first().and_then(|e| e["at_ms"].as_u64());
        match powernode_tests::direct::stub::ready_run(
            &stub,
            &agent_spec,
            &format!("bench-{i}"),
            DEADLINE,
        ) {
            Ok(r) => {
                ready_runs.push(r);
                base_paired.extend(at);
            }
            Err(e) => println!("boot to ready #{i} failed: {e}"),
        }
    }
    drop(stub);

    // Smallest memory that still reaches init_done.
    let mut smallest = None;
    for mib in [256u32, 192, 128, 96, 80, 64, 56, 48, 40, 32] {
        let mut s = ours_spec.clone();
        s.memory_mib = mib;
        s.serial_log = dir.join(format!("mem-{mib}")).join("serial.log");
        let ok = try_boot(&s, DEADLINE)
            .ok()
            .map(|b| event(&events(&b.serial, "POWERNODE-INIT "), "event", "init_done").is_some())
            .unwrap_or(false);
        if !ok {
            break;
        }
        smallest = Some(mib);
    }

    let accel = if ours_spec.accel == powernode_qemu::Accel::Tcg {
        "TCG"
    } else {
        "KVM"
    };
    let (wo, wb, wg) = (median(wall_ours), median(wall_base), median(wall_gz));
    let (bs, is, d) = (median(base_start), median(init_start), median(done_at));
    println!(
        "== boot benchmark ({accel}, {runs} runs per side, medians, kernel {})",
        image.manifest.kernel_release
    );
    println!("wall clock, QEMU start -> exit after poweroff:");
    println!("  baseline (trivial init)        {wb:>6} ms");
    println!(
        "  powernode-init (lz4, default)  {wo:>6} ms   ratio {:.2}x",
        wo as f64 / wb.max(1) as f64
    );
    println!(
        "  powernode-init (gzip initrd)   {wg:>6} ms   ratio {:.2}x",
        wg as f64 / wb.max(1) as f64
    );
    let wz = median(wall_zst);
    println!(
        "  powernode-init (zstd initrd)   {wz:>6} ms   ratio {:.2}x",
        wz as f64 / wb.max(1) as f64
    );
    let wr = median(wall_raw);
    println!(
        "  powernode-init (uncompressed)  {wr:>6} ms   ratio {:.2}x",
        wr as f64 / wb.max(1) as f64
    );
    println!("in-guest CLOCK_BOOTTIME, ms since kernel start:");
    println!("  baseline init_start            {bs:>6}");
    println!("  ours init_start                {is:>6}");
    println!(
        "  ours modules_loaded            {:>6}   (+{} ms, {} modules)",
        median(modules.clone()),
        median(modules).saturating_sub(is),
        image.manifest.modules.len()
    );
    println!("  ours identity_found            {:>6}", median(identity));
    println!("  ours network_up (DHCP)         {:>6}", median(network));
    println!(
        "  ours init_done                 {d:>6}   ratio to baseline init_start {:.2}x",
        d as f64 / bs.max(1) as f64
    );
    let (sz, dz) = (median(start_zst), median(done_zst));
    println!(
        "  zstd initrd:         init_start {sz:>6}, init_done {dz:>6}   ratio {:.2}x",
        dz as f64 / bs.max(1) as f64
    );
    let (sr, dr) = (median(start_raw), median(done_raw));
    println!(
        "  uncompressed initrd: init_start {sr:>6}, init_done {dr:>6}   ratio {:.2}x",
        dr as f64 / bs.max(1) as f64
    );
    if ready_runs.is_empty() {
        println!("boot to ready: no successful run");
    } else {
        let m = |p: &str| median(ready_runs.iter().filter_map(|r| r.at(p)).collect());
        let ready = m("ready");
        println!(
            "boot to ready with the agent, from the server's boot_timeline ({} runs):",
            ready_runs.len()
        );
        for phase in [
            "init_start",
            "modules_loaded",
            "identity_found",
            "network_up",
            "enrolled",
            "agent_started",
        ] {
            println!("  {phase:<30} {:>6}", m(phase));
        }
        let bp = median(base_paired.clone());
        println!(
            "  baseline init_start, paired    {bp:>6}   (a baseline boot before each ready boot)"
        );
        println!(
            "  ready                          {ready:>6}   ratio to the paired baseline {:.2}x (goal <= 1.3x); to the first baseline {:.2}x",
            ready as f64 / bp.max(1) as f64,
            ready as f64 / bs.max(1) as f64
        );
        println!(
            "  wall, QEMU start -> server says running {:>6} ms; terminate -> QEMU exit {:>6} ms",
            median(
                ready_runs
                    .iter()
                    .map(|r| r.wall_to_running.as_millis() as u64)
                    .collect()
            ),
            median(
                ready_runs
                    .iter()
                    .map(|r| r.wall_to_exit.as_millis() as u64)
                    .collect()
            )
        );
    }
    let (wbq, woq, bsq, dq) = (
        median(wall_base_q),
        median(wall_ours_q),
        median(base_start_q),
        median(done_q),
    );
    println!("with `quiet` (kernel console at warnings only):");
    println!("  baseline wall {wbq:>6} ms, init_start {bsq:>6} ms");
    println!(
        "  ours     wall {woq:>6} ms, init_done  {dq:>6} ms   ratio wall {:.2}x, in-guest {:.2}x",
        woq as f64 / wbq.max(1) as f64,
        dq as f64 / bsq.max(1) as f64
    );
    println!("sizes:");
    println!(
        "  powernode-init (static musl)   {}",
        kib(std::fs::metadata(&init).unwrap().len())
    );
    let agent = init.with_file_name("powernode-agent");
    match std::fs::metadata(&agent) {
        Ok(m) => {
            println!("  powernode-agent (static musl)  {}", kib(m.len()));
            let with_agent = image_with_agent(
                &dir.join("image-with-agent"),
                &init,
                Some(&agent),
                Compression::default(),
            );
            println!(
                "  initramfs.img lz4, with agent  {}",
                kib(with_agent.manifest.initramfs_bytes)
            );
        }
        Err(_) => println!(
            "  powernode-agent                not built for musl ({})",
            agent.display()
        ),
    }
    println!(
        "  initramfs.img lz4 (default)    {}  (uncompressed {})",
        kib(image.manifest.initramfs_bytes),
        kib(image.manifest.initramfs_uncompressed_bytes)
    );
    println!(
        "  initramfs.img gzip             {}",
        kib(gz.manifest.initramfs_bytes)
    );
    println!(
        "  initramfs.img zstd             {}",
        kib(zst.manifest.initramfs_bytes)
    );
    println!(
        "  initramfs.img uncompressed     {}",
        kib(raw.manifest.initramfs_bytes)
    );
    println!(
        "  baseline initramfs (lz4)       {}",
        kib(std::fs::metadata(&baseline_initrd).unwrap().len())
    );
    println!(
        "  vmlinuz                        {}",
        kib(std::fs::metadata(&image.vmlinuz).unwrap().len())
    );
    match smallest {
        Some(m) => println!("smallest memory reaching init_done: {m} MiB (tried 256 down to 32)"),
        None => println!("smallest memory reaching init_done: none of 256..32 MiB booted"),
    }
}
