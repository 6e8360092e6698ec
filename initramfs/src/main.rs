//! `powernode-initramfs build --init PATH [--agent PATH] [--out build] [--cache cache]`

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use powernode_initramfs::{build, BuildOptions, Compression, KernelPin};

#[derive(Parser)]
#[command(about = "Builds the Powernode netboot kernel + initramfs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch the pinned kernel and write vmlinuz, initramfs.img, cmdline, manifest.json.
    Build {
        /// The static init (built for x86_64-unknown-linux-musl).
        #[arg(long)]
        init: PathBuf,
        /// The agent binary, installed as /usr/bin/powernode-agent.
        #[arg(long)]
        agent: Option<PathBuf>,
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
        #[arg(long, value_enum, default_value_t = Compression::Zstd)]
        compression: Compression,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Build {
            init,
            agent,
            out,
            cache,
            kernel_pin,
            debs,
            compression,
        } => {
            let pin_text = match &kernel_pin {
                Some(p) => std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?,
                None => powernode_initramfs::kernel::DEFAULT_PIN.to_string(),
            };
            let pin = KernelPin::parse(&pin_text).context("kernel pin")?;
            let cache = std::path::absolute(&cache).context("cache path")?;
            let out_dir = out.clone();
            let built = build(&BuildOptions {
                init,
                agent,
                out,
                cache,
                debs_script: debs,
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
            Ok(())
        }
    }
}
