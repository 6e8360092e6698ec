//! `powernode-agent`: the node agent binary. Thin: argument parsing, logging, exit
//! codes; everything else is in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use powernode_agent::identity::{self, SourcePaths};
use powernode_agent::runtime::{self, AgentOptions, Exit};
use powernode_agent::supervisor::{NoServices, ProcessSupervisor, ServiceSpec, Supervisor};
use powernode_agent::timeline::Timeline;
use powernode_agent::{error_chain, exit_code};

#[derive(Debug, Parser)]
#[command(name = "powernode-agent", version, about = "Powernode node agent")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll (or reuse stored credentials), then heartbeat and run tasks until
    /// stopped or refused by the control plane (exit code 3).
    Run(RunArgs),
    /// Resolve the identity and print it with its source as JSON.
    Identity(IdentityArgs),
}

#[derive(Debug, clap::Args)]
struct SourceArgs {
    /// Kernel command line to read.
    #[arg(long, default_value = identity::cmdline::DEFAULT_PATH)]
    cmdline: PathBuf,
    /// fw_cfg sysfs root.
    #[arg(long, default_value = identity::fw_cfg::DEFAULT_ROOT)]
    fw_cfg: PathBuf,
    /// Identity document file (the `file` source).
    #[arg(long)]
    identity: Option<PathBuf>,
    /// Use only this source: auto, cmdline, fw_cfg, file or state. Default: `file`
    /// when --identity is given, else the command line's
    /// `powernode.identity_source=`, else auto.
    #[arg(long)]
    identity_source: Option<String>,
}

impl SourceArgs {
    /// `state_dir`: where the agent keeps its copy of the identity, tried last.
    async fn resolve(
        &self,
        state_dir: Option<&std::path::Path>,
    ) -> Result<identity::Resolved, identity::SelectError> {
        let paths = SourcePaths {
            cmdline: self.cmdline.clone(),
            fw_cfg_root: self.fw_cfg.clone(),
            file: self.identity.clone(),
            state: state_dir.map(|d| d.join(powernode_agent::state::IDENTITY_FILE)),
        };
        let pin = self
            .identity_source
            .as_deref()
            .or(self.identity.as_ref().map(|_| "file"));
        identity::resolve_standard(&paths, pin).await
    }
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    #[command(flatten)]
    sources: SourceArgs,
    /// Where the key (0600), certificate, CA and identity are kept.
    #[arg(long)]
    state_dir: PathBuf,
    /// A service to supervise, `NAME=PROGRAM ARGS...` (repeatable); drain stops them.
    #[arg(long = "service")]
    services: Vec<ServiceSpec>,
    /// Seconds a task lease is asked for.
    #[arg(long, default_value_t = 30)]
    lease_seconds: u64,
}

#[derive(Debug, clap::Args)]
struct IdentityArgs {
    #[command(flatten)]
    sources: SourceArgs,
    /// Print the bootstrap token instead of redacting it.
    #[arg(long)]
    show_secrets: bool,
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("stop requested");
}

async fn run(args: RunArgs) -> i32 {
    let mut timeline = Timeline::since_boot();
    timeline.mark(powernode_proto::node::Phase::AgentStarted);
    // The init may leave its part of the boot timeline for us.
    let handed_over = args.state_dir.join("timeline.json");
    if let Err(e) = timeline.merge_file(&handed_over) {
        tracing::warn!(path = %handed_over.display(), error = %error_chain(&e), "ignoring handed-over timeline");
    }
    let resolved = match args.sources.resolve(Some(&args.state_dir)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %error_chain(&e), "no usable identity");
            eprintln!("powernode-agent: no usable identity: {}", error_chain(&e));
            return exit_code::IDENTITY;
        }
    };
    let supervisor: Arc<dyn Supervisor> = if args.services.is_empty() {
        Arc::new(NoServices)
    } else {
        Arc::new(ProcessSupervisor::start(args.services))
    };
    let mut opts = AgentOptions::new(&args.state_dir);
    opts.lease_seconds = args.lease_seconds.max(3);
    let hooks = runtime::Hooks {
        supervisor,
        ..runtime::Hooks::default()
    };
    match runtime::run(resolved, opts, hooks, timeline, shutdown_signal()).await {
        Ok(Exit::Stopped) => exit_code::STOPPED,
        Ok(Exit::Terminal { code, message }) => {
            tracing::error!(code = %code, message = %message, "the control plane refused this node for good; stopping");
            eprintln!(
                "powernode-agent: stopping for good: the control plane refused this node \
                 ({code}): {message}"
            );
            exit_code::TERMINAL
        }
        Err(e) => {
            tracing::error!(error = %error_chain(&e), "agent failed");
            eprintln!("powernode-agent: {}", error_chain(&e));
            exit_code::FAILURE
        }
    }
}

async fn show_identity(args: IdentityArgs) -> i32 {
    match args.sources.resolve(None).await {
        Ok(r) => {
            let mut doc = r.document;
            if !args.show_secrets {
                doc.bootstrap_token = "<redacted>".into();
            }
            let out = serde_json::json!({"source": r.source, "identity": doc});
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            exit_code::STOPPED
        }
        Err(e) => {
            eprintln!("powernode-agent: no usable identity: {}", error_chain(&e));
            exit_code::IDENTITY
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("powernode-agent: cannot start the async runtime: {e}");
            return ExitCode::from(exit_code::FAILURE as u8);
        }
    };
    let code = rt.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Identity(args) => show_identity(args).await,
        }
    });
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
