//! `powernode-agent`: the node agent binary. Thin: argument parsing, logging, exit
//! codes; everything else is in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use powernode_agent::identity::{self, SourcePaths};
use powernode_agent::node_loop::{self, AgentOptions, Exit};
use powernode_agent::supervisor::{ServiceSpec, ServiceSupervisor};
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
    /// Fetch, verify and mount one module by hand, outside a boot.
    #[command(subcommand)]
    Module(ModuleCommand),
    /// Print a file's fs-verity digest like `fsverity digest`: `sha256:HEX FILE`.
    FsverityDigest {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum ModuleCommand {
    /// Pull `REPOSITORY@DIGEST`, verify its cosign signature and composefs digest, and
    /// store it; prints the composefs image digest.
    Pull {
        /// `HOST[:PORT]/NAME`.
        #[arg(long)]
        repository: String,
        /// Pinned manifest digest, `sha256:HEX`.
        #[arg(long)]
        digest: String,
        /// Trust key PEM file (cosign.pub), repeatable.
        #[arg(long = "trust-key", required = true)]
        trust_keys: Vec<PathBuf>,
        /// The module name the signature must name (`org.powernode.module.name`);
        /// with --version, the signed payload must name both and the repository.
        #[arg(long, requires = "version")]
        name: Option<String>,
        /// The module version the signature must name (`org.powernode.module.version`).
        #[arg(long, requires = "name")]
        version: Option<String>,
        #[arg(long)]
        store: PathBuf,
        /// CA PEM to pin for HTTPS.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Allow plain HTTP to a loopback registry (tests).
        #[arg(long)]
        insecure_http_loopback: bool,
    },
    /// Mount a stored module image (composefs) at PATH.
    Mount {
        #[arg(long)]
        store: PathBuf,
        /// Composefs image digest (what `module pull` printed).
        #[arg(long)]
        image: String,
        #[arg(long)]
        at: PathBuf,
    },
}

fn read_text(path: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// `module` and `fsverity-digest`: blocking, no async runtime (reqwest's blocking
/// client brings its own).
fn module_command(cmd: ModuleCommand) -> i32 {
    use powernode_agent::modules;
    let fail = |msg: String| {
        eprintln!("powernode-agent: {msg}");
        exit_code::FAILURE
    };
    match cmd {
        ModuleCommand::Pull {
            repository,
            digest,
            trust_keys,
            name,
            version,
            store,
            ca,
            insecure_http_loopback,
        } => {
            let pems: Result<Vec<String>, String> =
                trust_keys.iter().map(|p| read_text(p)).collect();
            let ca_pem = match ca.as_deref().map(read_text).transpose() {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            let r = (|| -> Result<modules::pull::PullReport, Box<dyn ModuleErrorCodeError>> {
                let pems =
                    pems.map_err(|e| Box::new(PlainError(e)) as Box<dyn ModuleErrorCodeError>)?;
                let keys = modules::signature::parse_trust_keys(&pems).map_err(boxed)?;
                let repo: modules::registry::Repository = repository.parse().map_err(boxed)?;
                let client =
                    modules::registry::RegistryClient::new(modules::registry::RegistryOptions {
                        ca_pem,
                        allow_http_loopback: insecure_http_loopback,
                        ..Default::default()
                    })
                    .map_err(boxed)?;
                let store = modules::store::ObjectStore::open(&store).map_err(boxed)?;
                let expected = match (&name, &version) {
                    (Some(name), Some(version)) => Some(modules::signature::Expected {
                        repository: &repo.name,
                        name,
                        version,
                    }),
                    _ => None,
                };
                modules::pull::pull_module(
                    &client,
                    &repo,
                    &digest,
                    &keys,
                    expected.as_ref(),
                    &store,
                )
                .map_err(boxed)
            })();
            match r {
                Ok(rep) => {
                    println!(
                        "{} {} bytes_received={} new_objects={} new_bytes={} already_present={}",
                        rep.image(),
                        rep.manifest_digest,
                        rep.bytes_received,
                        rep.install.layers.new_objects,
                        rep.install.layers.new_bytes,
                        rep.install.already_present
                    );
                    exit_code::STOPPED
                }
                Err(e) => fail(format!(
                    "{}: {}",
                    e.code().as_str(),
                    error_chain(e.as_error())
                )),
            }
        }
        ModuleCommand::Mount { store, image, at } => {
            let image: powernode_agent::verity::VerityDigest = match image.parse() {
                Ok(d) => d,
                Err(_) => return fail(format!("{image:?} is not sha256:HEX")),
            };
            let r = modules::store::ObjectStore::open(&store)
                .map_err(boxed)
                .and_then(|store| {
                    let image_mnt = store.root().join("mnt").join(image.to_hex());
                    modules::mount::mount_module(
                        &modules::mount::KernelMounter,
                        &store,
                        &image,
                        &image_mnt,
                        &at,
                        modules::mount::Restrict::RUNTIME,
                    )
                    .map_err(boxed)
                });
            match r {
                Ok(()) => exit_code::STOPPED,
                Err(e) => fail(format!(
                    "{}: {}",
                    e.code().as_str(),
                    error_chain(e.as_error())
                )),
            }
        }
    }
}

/// An error with a wire code, type-erased for the CLI.
trait ModuleErrorCodeError: powernode_agent::modules::ModuleErrorCode {
    fn as_error(&self) -> &(dyn std::error::Error + 'static);
}
impl<E: powernode_agent::modules::ModuleErrorCode + std::error::Error + 'static>
    ModuleErrorCodeError for E
{
    fn as_error(&self) -> &(dyn std::error::Error + 'static) {
        self
    }
}
fn boxed<E: ModuleErrorCodeError + 'static>(e: E) -> Box<dyn ModuleErrorCodeError> {
    Box::new(e)
}

/// A usage problem found before any module code ran (unreadable key file).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct PlainError(String);
impl powernode_agent::modules::ModuleErrorCode for PlainError {
    fn code(&self) -> powernode_proto::ErrorCode {
        powernode_proto::ErrorCode::BadRequest
    }
}

fn fsverity_digest(files: &[PathBuf]) -> i32 {
    let mut code = exit_code::STOPPED;
    for f in files {
        match powernode_agent::verity::digest_file(f) {
            Ok(d) => println!("{d} {}", f.display()),
            Err(e) => {
                eprintln!("powernode-agent: {}: {}", f.display(), error_chain(&e));
                code = exit_code::FAILURE;
            }
        }
    }
    code
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
    /// Module object store. Default: `<state-dir>/store`.
    #[arg(long)]
    module_store: Option<PathBuf>,
    /// Where runtime modules are mounted, one folder per module name.
    #[arg(long, default_value = powernode_agent::modules::module_runtime::RUNTIME_MODULES_DIR)]
    modules_dir: PathBuf,
    /// Allow plain HTTP to a loopback registry a module publication names (tests).
    #[arg(long)]
    insecure_http_loopback: bool,
}

/// The live module runtime: desired runtime modules pulled from the registry (the
/// embedded one is pinned to the control-plane CA the agent keeps in its state dir),
/// verified, then mounted under `modules_dir`.
fn module_runtime(
    args: &RunArgs,
    pinned_keys: &[String],
    services: Arc<ServiceSupervisor>,
) -> Result<Arc<powernode_agent::modules::module_runtime::ModuleRuntime>, String> {
    use powernode_agent::modules::{self, module_runtime::ModuleRuntime, trust};
    let store_dir = args
        .module_store
        .clone()
        .unwrap_or_else(|| args.state_dir.join("store"));
    std::fs::create_dir_all(&store_dir)
        .map_err(|e| format!("creating the module store {}: {e}", store_dir.display()))?;
    let store = modules::store::ObjectStore::open(&store_dir)
        .map_err(|e| format!("module store {}: {}", store_dir.display(), error_chain(&e)))?;
    Ok(Arc::new(
        ModuleRuntime::new(
            store,
            modules::registry::RegistryOptions {
                allow_http_loopback: args.insecure_http_loopback,
                ..Default::default()
            },
            Arc::new(modules::mount::KernelMounter),
            args.modules_dir.clone(),
            Vec::new(),
        )
        .with_ca_file(args.state_dir.join(powernode_agent::state::CA_FILE))
        .with_pinned_keys(pinned_keys.to_vec())
        .with_floor(
            trust::VersionFloor::load(&args.state_dir.join(trust::FLOOR_FILE))
                .map_err(|e| error_chain(&e))?,
        )
        .with_services(services)
        .expose_mountpoints()
        .require_root(),
    ))
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
        // A copy of each line stays in memory for collect_diagnostics.
        .with_writer(powernode_agent::logring::TeeStderr);
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
    // Without a usable store the agent still runs (heartbeats, tasks, drain); a
    // reconcile that wants modules then fails with a clear report upstream.
    // Command-line services and the services of attached modules share one
    // supervisor: a drain stops them all.
    if args.insecure_http_loopback {
        tracing::warn!("plain HTTP to loopback registries allowed (--insecure-http-loopback)");
    }
    let supervisor = Arc::new(ServiceSupervisor::start(args.services.clone()));
    let reconciler: Arc<dyn powernode_agent::module_reconcile::ModuleReconciler> =
        match module_runtime(
            &args,
            &resolved.document.module_trust_keys,
            supervisor.clone(),
        ) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                tracing::error!(error = %e, "no module runtime; desired modules will fail to reconcile");
                Arc::new(powernode_agent::module_reconcile::NoModules)
            }
        };
    let mut opts = AgentOptions::new(&args.state_dir);
    opts.lease_seconds = args.lease_seconds.max(3);
    let hooks = node_loop::Hooks {
        supervisor,
        reconciler,
    };
    match node_loop::run(resolved, opts, hooks, timeline, shutdown_signal()).await {
        Ok(Exit::Stopped) => exit_code::STOPPED,
        // Not PID 1 (`can_reboot` is off): a reboot task fails before this.
        Ok(Exit::Reboot) => exit_code::STOPPED,
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
    let cli = match cli.command {
        Command::Module(cmd) => return ExitCode::from(module_command(cmd) as u8),
        Command::FsverityDigest { files } => return ExitCode::from(fsverity_digest(&files) as u8),
        command => Cli { command, ..cli },
    };
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
            Command::Module(_) | Command::FsverityDigest { .. } => exit_code::USAGE,
        }
    });
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
