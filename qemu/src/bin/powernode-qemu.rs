//! `powernode-qemu boot --image build [--identity FILE] [--persist DISK] ...`: boots a
//! netboot image folder (`vmlinuz`, `initramfs.img`, `cmdline`) by hand, with the
//! same argv the tests and the server's provider use, and follows the serial log.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use powernode_qemu::{make_persist_disk, Accel, Device, Vm, VmSpec};

#[derive(Parser)]
#[command(about = "Boot a Powernode netboot image under QEMU")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot and print the serial console until QEMU exits (or --wait runs out).
    Boot {
        /// Folder with vmlinuz, initramfs.img and cmdline.
        #[arg(long, default_value = "build")]
        image: PathBuf,
        /// Identity document for the fw_cfg entry.
        #[arg(long)]
        identity: Option<PathBuf>,
        /// /persist disk image; created (ext4 with verity) when missing.
        #[arg(long)]
        persist: Option<PathBuf>,
        #[arg(long, default_value_t = 512)]
        memory: u32,
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// Extra kernel arguments, e.g. `powernode.on_failure=poweroff`.
        #[arg(long = "append")]
        append: Vec<String>,
        /// Folder for serial.log and qemu-command.sh.
        #[arg(long, default_value = "target/vm-manual")]
        out: PathBuf,
        /// Seconds to wait for QEMU to exit before killing it.
        #[arg(long, default_value_t = 120)]
        wait: u64,
        /// Print the argv and exit.
        #[arg(long)]
        dry_run: bool,
    },
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Command::Boot {
        image,
        identity,
        persist,
        memory,
        cpus,
        append,
        out,
        wait,
        dry_run,
    } = Cli::parse().command;
    let kernel = image.join("vmlinuz");
    let mut spec = VmSpec::new(&kernel, image.join("initramfs.img"), out.join("serial.log"));
    spec.memory_mib = memory;
    spec.cpus = cpus;
    if let Ok(cmdline) = std::fs::read_to_string(image.join("cmdline")) {
        spec.kernel_args
            .extend(cmdline.split_whitespace().map(str::to_string));
    }
    spec.kernel_args.extend(append);
    if let Some(identity) = identity {
        spec.devices.push(Device::identity(identity));
    }
    if let Some(disk) = persist {
        if !disk.exists() && !dry_run {
            make_persist_disk(&disk, 256)?;
        }
        spec.devices.push(Device::PersistDisk { path: disk });
    }
    spec.accel = Accel::detect_for_kernel(&spec.qemu, &kernel);
    if dry_run {
        println!("{}", powernode_qemu::spec::shell_quote(&spec.argv()));
        return Ok(());
    }
    let mut vm = Vm::spawn(&spec)?;
    eprintln!(
        "qemu pid {} ({:?}); command in {}",
        vm.pid(),
        spec.accel,
        vm.command_file.display()
    );
    let mut printed = 0usize;
    let deadline = std::time::Instant::now() + Duration::from_secs(wait);
    loop {
        let serial = vm.serial();
        if let Some(new) = serial.get(printed..) {
            print!("{new}");
            printed = serial.len();
        }
        if let Some(status) = vm.try_wait()? {
            eprintln!("qemu exited: {status} after {:?}", vm.elapsed());
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            eprintln!("still running after {wait} s; killing qemu");
            vm.kill();
            return Err("timeout".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
