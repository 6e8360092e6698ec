//! `powernode-initramfs build --init PATH [--agent PATH] [--out build] [--cache cache]
//! [--no-disk] [--disk-cmdline ARG]... [--disk-min-mib N]`
//! `powernode-initramfs disk [--image build] [--out FILE] [--cmdline ARG]... [--min-mib N]`
//! `powernode-initramfs kernel-modules --out DIR [--cache cache]`

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use powernode_initramfs::disk::{build_disk, DiskManifest, DiskOptions};
use powernode_initramfs::kernel::ensure_kernel;
use powernode_initramfs::kmods::write_module_tree;
use powernode_initramfs::stub::{ensure_stub, StubPin, DEFAULT_STUB_PIN};
use powernode_initramfs::{build, BuildOptions, Compression, KernelPin};

#[derive(Parser)]
#[command(about = "Builds the Powernode netboot kernel + initramfs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch the pinned kernel and write vmlinuz, initramfs.img, cmdline, manifest.json
    /// and (unless --no-disk) the UEFI disk image disk.raw.
    Build {
        /// The static init (built for x86_64-unknown-linux-musl).
        #[arg(long)]
        init: PathBuf,
        /// The agent binary, installed as /usr/bin/powernode-agent.
        #[arg(long)]
        agent: Option<PathBuf>,
        /// A module trust key (PEM public key, e.g. cosign.pub) to build in,
        /// repeatable: the node then pins these keys and no others.
        #[arg(long = "module-trust-key", value_name = "PEM")]
        module_trust_keys: Vec<PathBuf>,
        #[arg(long, default_value = "build")]
        out: PathBuf,
        #[arg(long, env = "POWERNODE_CACHE", default_value = "cache")]
        cache: PathBuf,
        /// Kernel pin; defaults to the kernel.toml compiled into this builder.
        #[arg(long)]
        kernel_pin: Option<PathBuf>,
        /// The fetch helper.
        #[arg(long, default_value = "scripts/debs")]
        debs: PathBuf,
        #[arg(long, value_enum, default_value_t = Compression::Lz4)]
        compression: Compression,
        /// Skip the UEFI disk image.
        #[arg(long)]
        no_disk: bool,
        /// Kernel arguments baked into the disk image's UKI (after the base ones).
        #[arg(long = "disk-cmdline")]
        disk_cmdline: Vec<String>,
        /// Pad the disk image to at least this many MiB (GCE wants whole GiB).
        #[arg(long, default_value_t = 0)]
        disk_min_mib: u64,
    },
    /// Build the UEFI disk image from an already built image folder.
    Disk {
        /// The folder `build` wrote.
        #[arg(long, default_value = "build")]
        image: PathBuf,
        /// Output file; default IMAGE/disk.raw (then recorded in IMAGE/manifest.json).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Kernel arguments baked into the UKI (after the base ones).
        #[arg(long)]
        cmdline: Vec<String>,
        #[arg(long, default_value_t = 0)]
        min_mib: u64,
        #[arg(long, env = "POWERNODE_CACHE", default_value = "cache")]
        cache: PathBuf,
        #[arg(long, default_value = "scripts/debs")]
        debs: PathBuf,
    },
    /// Write the pinned kernel's complete module tree (with depmod's indexes) to
    /// OUT/usr/lib/modules/RELEASE, for publishing as a root module.
    KernelModules {
        /// A folder that does not exist yet (or is empty).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, env = "POWERNODE_CACHE", default_value = "cache")]
        cache: PathBuf,
        /// Kernel pin; defaults to the kernel.toml compiled into this builder.
        #[arg(long)]
        kernel_pin: Option<PathBuf>,
        #[arg(long, default_value = "scripts/debs")]
        debs: PathBuf,
    },
}

fn read_pin(path: Option<&std::path::Path>) -> anyhow::Result<KernelPin> {
    let text = match path {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => powernode_initramfs::kernel::DEFAULT_PIN.to_string(),
    };
    KernelPin::parse(&text).context("kernel pin")
}

fn disk(
    image: PathBuf,
    out: Option<PathBuf>,
    cmdline: Vec<String>,
    min_mib: u64,
    cache: &std::path::Path,
    debs: &std::path::Path,
) -> anyhow::Result<DiskManifest> {
    let pin = StubPin::parse(DEFAULT_STUB_PIN).context("stub pin")?;
    let stub = ensure_stub(&pin, cache, debs).context("fetching the EFI stub")?;
    let record = out.is_none();
    let m = build_disk(&DiskOptions {
        image_dir: image,
        stub,
        extra_cmdline: cmdline,
        out,
        min_mib,
        record_in_manifest: record,
    })
    .context("building the disk image")?;
    println!(
        "{}: {} bytes ({} {} {}), UKI {} bytes, cmdline {:?}",
        m.file, m.bytes, m.format, m.partition_table, m.boot, m.uki_bytes, m.cmdline
    );
    Ok(m)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Build {
            init,
            agent,
            module_trust_keys,
            out,
            cache,
            kernel_pin,
            debs,
            compression,
            no_disk,
            disk_cmdline,
            disk_min_mib,
        } => {
            let pin = read_pin(kernel_pin.as_deref())?;
            let cache = std::path::absolute(&cache).context("cache path")?;
            let out_dir = out.clone();
            let built = build(&BuildOptions {
                init,
                agent,
                trust_keys: module_trust_keys,
                out: out.clone(),
                cache: cache.clone(),
                debs_script: debs.clone(),
                pin,
                compression,
            })
            .context("building the netboot image")?;
            let m = &built.manifest;
            println!(
                "{}: kernel {} ({} modules: {}), initramfs {} bytes ({:?}), init {} bytes",
                out_dir.display(),
                m.kernel_release,
                m.modules.len(),
                m.modules.join(" "),
                m.initramfs_bytes,
                m.compression,
                m.init_bytes
            );
            if !m.module_trust_keys_sha256.is_empty() {
                println!(
                    "module trust keys built in: {}",
                    m.module_trust_keys_sha256.len()
                );
            }
            if !no_disk {
                disk(out, None, disk_cmdline, disk_min_mib, &cache, &debs)?;
            }
            Ok(())
        }
        Command::Disk {
            image,
            out,
            cmdline,
            min_mib,
            cache,
            debs,
        } => {
            let cache = std::path::absolute(&cache).context("cache path")?;
            disk(image, out, cmdline, min_mib, &cache, &debs).map(|_| ())
        }
        Command::KernelModules {
            out,
            cache,
            kernel_pin,
            debs,
        } => {
            let pin = read_pin(kernel_pin.as_deref())?;
            let cache = std::path::absolute(&cache).context("cache path")?;
            let kernel = ensure_kernel(&pin, &cache, &debs).context("fetching the kernel")?;
            let written = write_module_tree(&kernel, &out)
                .with_context(|| format!("writing the module tree to {}", out.display()))?;
            println!(
                "kernel {}: {} ({} files, {} bytes)",
                written.release,
                written.modules_dir.display(),
                written.files,
                written.bytes
            );
            Ok(())
        }
    }
}
