//! The `powernode-stub` command line: `serve`, and one client subcommand per
//! runbook action. Clients take the admin token and the CA to pin from the data
//! directory, print the API's JSON with `--json` and a readable table otherwise, and
//! exit 1 with the error JSON on stderr for any non-2xx answer.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use powernode_proto::{paths, LifecycleClass};
use serde_json::{json, Value};

use crate::config::{Config, ProviderMode, StuckThresholds};
use client::AdminClient;
use render::write_out;
pub use render::{render_attribution, render_instance, render_table};
use wait::{finish_cluster, finish_waiting, WaitArgs};

pub mod client;
pub mod publish;
pub mod render;
pub mod wait;

#[derive(Debug, Parser)]
#[command(
    name = "powernode-stub",
    version,
    about = "Powernode reference control plane"
)]
pub struct Cli {
    /// Data directory (state, CA, admin token, server URL).
    #[arg(long, global = true, env = "POWERNODE_STUB_DATA")]
    pub data: Option<PathBuf>,
    /// Server URL for client commands (default: read DIR/server-url).
    #[arg(long, global = true)]
    pub server: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free port (see DIR/server-url).
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// Control-plane URL put into identity documents (default: the server URL).
    #[arg(long)]
    pub public_url: Option<String>,
    /// Extra server-certificate name (DNS name or IP); repeatable.
    #[arg(long = "san")]
    pub sans: Vec<String>,
    /// Provider: recorder (records what it would boot), real (local QEMU VMs),
    /// libvirt (the same VMs as libvirt domains) or disabled.
    #[arg(long, env = "POWERNODE_LIBVIRT_MODE", default_value = "recorder", value_parser = parse_provider)]
    pub provider: ProviderMode,
    /// The libvirt connection of `--provider libvirt` (its daemon started by
    /// `scripts/libvirtd`).
    #[arg(long, env = "POWERNODE_LIBVIRT_URI", default_value = powernode_qemu::libvirt::DEFAULT_URI)]
    pub libvirt_uri: String,
    /// Netboot image folder (from `powernode-initramfs build`), published at start.
    #[arg(long, env = "POWERNODE_IMAGE_BASE")]
    pub image_base: Option<PathBuf>,
    #[arg(long, default_value_t = 300)]
    pub silent_after_seconds: u64,
    #[arg(long, default_value_t = 86_400)]
    pub token_ttl_seconds: u64,
    #[arg(long, default_value_t = 86_400)]
    pub cert_ttl_seconds: u64,
    /// How long after its certificate expired a node may re-enroll it with the
    /// same key (`certificate/reissue`); longer outages need a new bootstrap token.
    #[arg(long, default_value_t = crate::config::DEFAULT_REISSUE_GRACE_SECONDS)]
    pub reissue_grace_seconds: u64,
    /// e.g. `pending=300,provisioning=600,running=300` (any subset).
    #[arg(long, value_parser = parse_thresholds)]
    pub stuck_thresholds: Option<StuckThresholds>,
    #[arg(long, default_value_t = 1000)]
    pub sensor_interval_ms: u64,
    /// Longest lease an agent may hold a task without renewing.
    #[arg(long, default_value_t = 3600)]
    pub lease_max_seconds: u64,
    /// Heartbeat interval told to nodes (identity document, enrollment answer).
    #[arg(long, default_value_t = 30)]
    pub heartbeat_interval_seconds: u64,
    /// How often batched heartbeats are written to SQLite.
    #[arg(long, default_value_t = 1000)]
    pub flush_interval_ms: u64,
    /// Largest blob the embedded registry (`/v2/`) accepts.
    #[arg(long, default_value_t = crate::registry::DEFAULT_MAX_BLOB_BYTES)]
    pub registry_max_blob_bytes: u64,
    /// Provider quota: provisions at once per region; more wait in `pending` (0: no
    /// limit).
    #[arg(long, default_value_t = 0)]
    pub quota_concurrent_provisions: u32,
    /// Provider quota: live instances per region; more wait in `pending` (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub quota_instances_per_region: u32,
    /// Days finished tasks, expired certificates, events and inactive signals are
    /// kept; 0 keeps them for ever.
    #[arg(long, default_value_t = 30)]
    pub retention_days: u64,
    /// `on`: the server keeps a module-signing key (DIR/module-signing.key) and
    /// signs on the admin route; `off`: it never makes or reads one, publishers
    /// sign offline (`publish-module --key`) with keys given by --module-trust-key.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub online_signing: OnOff,
    /// Public key (PEM, e.g. cosign.pub) of an offline module signer; repeatable.
    /// Nodes are handed these (and the online key, when on) to verify and pin.
    #[arg(long = "module-trust-key", value_name = "PATH")]
    pub module_trust_keys: Vec<PathBuf>,
}

/// A switch flag's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

fn parse_provider(s: &str) -> Result<ProviderMode, String> {
    s.parse()
        .map_err(|e: crate::config::ConfigError| e.to_string())
}

fn parse_thresholds(s: &str) -> Result<StuckThresholds, String> {
    StuckThresholds::parse(s).map_err(|e| e.to_string())
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label {s:?} is not KEY=VALUE"))
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the control plane.
    Serve(ServeArgs),
    /// Create a logical Node (phase 1; no provider resources).
    CreateNode {
        #[arg(long)]
        hostname: String,
        #[arg(long, default_value = "tmpl-edge-base")]
        template: String,
        #[arg(long)]
        lifecycle_class: LifecycleClass,
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Create and provision COUNT Nodes of one template in one call (at most 50):
    /// hostnames PREFIX-1 .. PREFIX-COUNT.
    ProvisionCluster {
        #[arg(long, default_value = "tmpl-edge-base")]
        template: String,
        #[arg(long)]
        count: u32,
        /// Default: `node-` and 6 random hex digits.
        #[arg(long)]
        hostname_prefix: Option<String>,
        #[arg(long, default_value = "ephemeral")]
        lifecycle_class: LifecycleClass,
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[arg(long)]
        instance_type: Option<String>,
        #[arg(long)]
        region: Option<String>,
        /// Follow every member's provision task to its end.
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Show the catalog: templates, platforms, architectures, regions, instance types.
    ListTemplates,
    /// List the recorded netboot image publications (newest first).
    ListDiskImagePublications,
    /// Publish the netboot image folder (reads its manifest.json; default: the
    /// server's --image-base).
    PublishDiskImage {
        #[arg(long)]
        image_base: Option<PathBuf>,
    },
    /// Publish a module: build an OCI image from a folder (or take an OCI image
    /// layout), record its composefs digest in the manifest, push it (default: the
    /// embedded registry), sign it (the server's online key, or --key here) and
    /// record the publication.
    PublishModule {
        /// A folder, or an OCI image layout (a folder with `oci-layout`).
        source: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        /// root (composed into /) or runtime.
        #[arg(long, default_value = "root")]
        kind: String,
        /// External registry base URL, e.g. http://127.0.0.1:5000 (default: embedded).
        #[arg(long)]
        registry: Option<String>,
        /// Keep the folder's file owners (a distribution root); default 0:0.
        #[arg(long)]
        preserve_owners: bool,
        /// An image config label, KEY=VALUE (repeatable): org.powernode.services,
        /// org.powernode.drain, org.powernode.mountpoint.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Sign offline with this key: `cosign generate-key-pair`'s cosign.key
        /// (password from COSIGN_PASSWORD, empty allowed) or an unencrypted PKCS#8
        /// P-256 PEM. The key never leaves this machine; the server must trust its
        /// public key (serve --module-trust-key).
        #[arg(long, value_name = "PATH")]
        key: Option<PathBuf>,
    },
    /// List module publications (newest first).
    ListModulePublications,
    /// Set the module names a template composes (root) and runs (runtime).
    SetTemplateModules {
        template: String,
        #[arg(long = "root")]
        root: Vec<String>,
        #[arg(long = "runtime")]
        runtime: Vec<String>,
    },
    /// Print the module-signing public key (PEM) nodes and cosign verify with.
    ModuleSigningKey,
    /// List every Node.
    ListNodes,
    /// Show a Node (`status` is its live instance's status or `no_instance`).
    GetNode { id: String },
    /// Change a Node's lifecycle class (refused once an instance was provisioned).
    UpdateNode {
        id: String,
        #[arg(long)]
        lifecycle_class: Option<LifecycleClass>,
    },
    /// Delete a retired Node (refused while it has a live instance).
    DeleteNode { id: String },
    /// Provision an instance into a Node (phase 2).
    ProvisionInstance {
        node_id: String,
        #[arg(long)]
        instance_type: Option<String>,
        #[arg(long)]
        region: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Show an instance, with `stuck` and its recovery when a threshold is crossed,
    /// and the failures the node reported before it enrolled (boot reports).
    GetInstance { id: String },
    /// Print the identity document the provider handed (or would hand) the VM.
    InstanceIdentity { id: String },
    /// Show a task.
    GetTask { id: String },
    /// Cancel a task (a drain: uncordon; a provision: fail the instance).
    CancelTask { id: String },
    /// Drain an instance (phase 5): cordon, stop module services.
    DrainInstance {
        id: String,
        #[arg(long, default_value_t = 300)]
        timeout_seconds: u64,
        #[arg(long)]
        cordon_only: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Terminate an instance (phase 6): destroy, revoke certificates, expire tokens.
    TerminateInstance {
        id: String,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Desired vs running modules of an instance.
    DriftReport { id: String },
    /// Reboot an instance through its agent (a `reboot` task): how root-module
    /// changes are applied.
    RebootInstance {
        id: String,
        #[arg(long)]
        reason: Option<String>,
        /// Seconds the agent may take to stop services first.
        #[arg(long, default_value_t = 60)]
        drain_timeout_seconds: u64,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Ask the agent for diagnostics (a `collect_diagnostics` task; read the result
    /// with get-task).
    CollectDiagnostics {
        id: String,
        #[arg(long, default_value_t = 100)]
        log_lines: u32,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Ask the agent to reconcile its modules now (a `module_update` task with the
    /// current drift).
    UpdateModules {
        id: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// The module and version changes before an instance's failure that could
    /// explain it, ranked, with the reasoning.
    AttributeFailure {
        id: String,
        #[arg(long, default_value_t = 24)]
        lookback_hours: u64,
    },
    /// Recent sensor findings (silent, stuck, drift, bootstrap failures and reports).
    RecentSignals {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        instance: Option<String>,
    },
    /// Recent audit events.
    RecentEvents {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        instance: Option<String>,
    },
}

/// The binary's `main`.
pub fn main_entry() -> ExitCode {
    let cli = Cli::parse();
    let serving = matches!(cli.cmd, Cmd::Serve(_));
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if serving { "info" } else { "warn" })
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = if serving {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("powernode-stub: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        // The reader went away (`| head`): end quietly, with the status a tool killed
        // by SIGPIPE reports (Rust ignores SIGPIPE, so writes fail with EPIPE instead).
        Err(e) if closed_pipe(&e) => ExitCode::from(128 + 13),
        Err(e) => {
            eprintln!("powernode-stub: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn closed_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let Cli {
        data,
        server,
        json,
        cmd,
    } = cli;
    if let Cmd::Serve(args) = cmd {
        let data = data.context("serve needs --data DIR")?;
        let mut cfg = Config::new(data, args.listen);
        cfg.public_url = args.public_url;
        cfg.sans = args.sans;
        cfg.provider = args.provider;
        cfg.image_base = args.image_base;
        cfg.libvirt_uri = args.libvirt_uri;
        cfg.silent_after_seconds = args.silent_after_seconds;
        cfg.token_ttl_seconds = args.token_ttl_seconds;
        cfg.cert_ttl_seconds = args.cert_ttl_seconds;
        cfg.reissue_grace_seconds = args.reissue_grace_seconds;
        cfg.retention_days = args.retention_days;
        cfg.stuck = args.stuck_thresholds.unwrap_or_default();
        cfg.sensor_interval_ms = args.sensor_interval_ms;
        cfg.lease_max_seconds = args.lease_max_seconds;
        cfg.heartbeat_interval_seconds = args.heartbeat_interval_seconds;
        cfg.flush_interval_ms = args.flush_interval_ms;
        cfg.registry_max_blob_bytes = args.registry_max_blob_bytes;
        cfg.quota_concurrent_provisions = args.quota_concurrent_provisions;
        cfg.quota_instances_per_region = args.quota_instances_per_region;
        cfg.online_signing = args.online_signing == OnOff::On;
        cfg.module_trust_keys = args
            .module_trust_keys
            .iter()
            .map(|p| crate::signing::PublicKey::from_file(p))
            .collect::<Result<_, _>>()?;
        crate::server::run_until_signal(cfg).await?;
        return Ok(ExitCode::SUCCESS);
    }
    let data = data.context("client commands need --data DIR (admin token and CA)")?;
    let client = AdminClient::from_data_dir(&data, server.as_deref())?;
    if let Cmd::PublishModule {
        source,
        name,
        version,
        kind,
        registry,
        preserve_owners,
        labels,
        key,
    } = &cmd
    {
        // Read (and opened) first: a wrong password fails before anything is built.
        let offline = key
            .as_deref()
            .map(|p| {
                let password = crate::signing::key_file::password_from_env();
                crate::signing::key_file::load(p, password.as_deref())
            })
            .transpose()?;
        let mut folder = publish::FolderOptions {
            preserve_owners: *preserve_owners,
            ..Default::default()
        };
        for label in labels {
            let (k, v) = label
                .split_once('=')
                .with_context(|| format!("--label {label:?} is not KEY=VALUE"))?;
            if k.is_empty() {
                bail!("--label {label:?} has an empty key");
            }
            folder.labels.insert(k.to_string(), v.to_string());
        }
        let args = publish::PublishArgs {
            source: source.clone(),
            name: name.clone(),
            version: version.clone(),
            kind: kind.clone(),
            registry: registry.clone(),
            folder,
        };
        let out = match &offline {
            Some(key) => {
                publish::publish_module_offline(
                    &client,
                    client.http.clone(),
                    &client.base,
                    &client.token,
                    &args,
                    key,
                )
                .await?
            }
            None => {
                publish::publish_module(
                    &client,
                    client.http.clone(),
                    &client.base,
                    &client.token,
                    &args,
                )
                .await?
            }
        };
        if json {
            write_out(&format!("{out}\n"))?;
        } else {
            write_out(&render_table(&out["publication"]))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Cmd::ModuleSigningKey = &cmd {
        let (status, text) = client
            .call(reqwest::Method::GET, paths::ADMIN_MODULE_SIGNING_KEY, None)
            .await?;
        if !status.is_success() {
            eprintln!("{}", text.trim_end());
            return Ok(ExitCode::FAILURE);
        }
        let v: Value = serde_json::from_str(&text).context("server answered non-JSON")?;
        write_out(v["public_key_pem"].as_str().unwrap_or_default())?;
        return Ok(ExitCode::SUCCESS);
    }
    let (method, path, body) = request_for(&cmd)?;
    let (status, text) = client.call(method, &path, body).await?;
    if !status.is_success() {
        eprintln!("{}", text.trim_end());
        return Ok(ExitCode::FAILURE);
    }
    let value: Value = serde_json::from_str(&text).context("server answered non-JSON")?;
    if let Cmd::ProvisionCluster { wait, .. } = &cmd {
        return finish_cluster(&client, value, wait, json).await;
    }
    if let Some(wait) = cmd.wait().filter(|w| w.wait) {
        return finish_waiting(&client, &value, wait, json).await;
    }
    if json || matches!(cmd, Cmd::InstanceIdentity { .. }) {
        write_out(&format!("{}\n", text.trim_end()))?;
    } else if matches!(cmd, Cmd::AttributeFailure { .. }) {
        write_out(&render_attribution(&value))?;
    } else if matches!(cmd, Cmd::GetInstance { .. }) {
        write_out(&render_instance(value))?;
    } else {
        write_out(&render_table(&value))?;
    }
    Ok(ExitCode::SUCCESS)
}

impl Cmd {
    /// `--wait` of the long actions (they answer a `task_id`).
    fn wait(&self) -> Option<&WaitArgs> {
        match self {
            Cmd::ProvisionInstance { wait, .. }
            | Cmd::DrainInstance { wait, .. }
            | Cmd::TerminateInstance { wait, .. }
            | Cmd::RebootInstance { wait, .. }
            | Cmd::CollectDiagnostics { wait, .. }
            | Cmd::UpdateModules { wait, .. } => Some(wait),
            _ => None,
        }
    }
}

/// Method, path and body of the admin call behind a client subcommand.
fn request_for(cmd: &Cmd) -> anyhow::Result<(reqwest::Method, String, Option<Value>)> {
    use reqwest::Method;
    Ok(match cmd {
        Cmd::Serve(_) => bail!("serve is not a client command"),
        Cmd::CreateNode {
            hostname,
            template,
            lifecycle_class,
            labels,
        } => (
            Method::POST,
            paths::ADMIN_NODES.to_string(),
            Some(json!({
                "hostname": hostname,
                "template_id": template,
                "lifecycle_class": lifecycle_class,
                "labels": labels.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            })),
        ),
        Cmd::ProvisionCluster {
            template,
            count,
            hostname_prefix,
            lifecycle_class,
            labels,
            instance_type,
            region,
            ..
        } => (
            Method::POST,
            paths::ADMIN_CLUSTERS.to_string(),
            Some(json!({
                "template_id": template,
                "count": count,
                "hostname_prefix": hostname_prefix,
                "lifecycle_class": lifecycle_class,
                "labels": labels.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
                "instance_type": instance_type,
                "region": region,
            })),
        ),
        Cmd::ListTemplates => (Method::GET, paths::ADMIN_TEMPLATES.to_string(), None),
        Cmd::ListDiskImagePublications => (
            Method::GET,
            paths::ADMIN_DISK_IMAGE_PUBLICATIONS.to_string(),
            None,
        ),
        Cmd::PublishDiskImage { image_base } => (
            Method::POST,
            paths::ADMIN_DISK_IMAGE_PUBLICATIONS.to_string(),
            Some(json!({ "image_base": image_base })),
        ),
        Cmd::PublishModule { .. } | Cmd::ModuleSigningKey => {
            bail!("handled before request_for")
        }
        Cmd::ListModulePublications => (
            Method::GET,
            paths::ADMIN_MODULE_PUBLICATIONS.to_string(),
            None,
        ),
        Cmd::SetTemplateModules {
            template,
            root,
            runtime,
        } => (
            Method::PUT,
            paths::admin_template_modules(template),
            Some(json!({"root_modules": root, "runtime_modules": runtime})),
        ),
        Cmd::ListNodes => (Method::GET, paths::ADMIN_NODES.to_string(), None),
        Cmd::GetNode { id } => (Method::GET, paths::admin_node(id), None),
        Cmd::UpdateNode {
            id,
            lifecycle_class,
        } => (
            Method::PATCH,
            paths::admin_node(id),
            Some(json!({ "lifecycle_class": lifecycle_class })),
        ),
        Cmd::DeleteNode { id } => (Method::DELETE, paths::admin_node(id), None),
        Cmd::ProvisionInstance {
            node_id,
            instance_type,
            region,
            ..
        } => (
            Method::POST,
            paths::admin_provision(node_id),
            Some(json!({"instance_type": instance_type, "region": region})),
        ),
        Cmd::GetInstance { id } => (Method::GET, paths::admin_instance(id), None),
        Cmd::InstanceIdentity { id } => (Method::GET, paths::admin_instance_identity(id), None),
        Cmd::GetTask { id } => (Method::GET, paths::admin_task(id), None),
        Cmd::CancelTask { id } => (Method::POST, paths::admin_cancel_task(id), Some(json!({}))),
        Cmd::DrainInstance {
            id,
            timeout_seconds,
            cordon_only,
            ..
        } => (
            Method::POST,
            paths::admin_drain(id),
            Some(json!({"timeout_seconds": timeout_seconds, "cordon_only": cordon_only})),
        ),
        Cmd::TerminateInstance { id, force, .. } => (
            Method::POST,
            paths::admin_terminate(id),
            Some(json!({ "force": force })),
        ),
        Cmd::DriftReport { id } => (Method::GET, paths::admin_drift(id), None),
        Cmd::RebootInstance {
            id,
            reason,
            drain_timeout_seconds,
            ..
        } => (
            Method::POST,
            paths::admin_reboot(id),
            Some(json!({"reason": reason, "drain_timeout_seconds": drain_timeout_seconds})),
        ),
        Cmd::CollectDiagnostics { id, log_lines, .. } => (
            Method::POST,
            paths::admin_collect_diagnostics(id),
            Some(json!({ "log_lines": log_lines })),
        ),
        Cmd::UpdateModules { id, .. } => (
            Method::POST,
            paths::admin_module_update(id),
            Some(json!({})),
        ),
        Cmd::AttributeFailure { id, lookback_hours } => (
            Method::GET,
            format!(
                "{}?lookback_hours={lookback_hours}",
                paths::admin_attribute_failure(id)
            ),
            None,
        ),
        Cmd::RecentSignals { limit, instance } => (
            Method::GET,
            list_path(paths::ADMIN_SIGNALS, *limit, instance.as_deref()),
            None,
        ),
        Cmd::RecentEvents { limit, instance } => (
            Method::GET,
            list_path(paths::ADMIN_EVENTS, *limit, instance.as_deref()),
            None,
        ),
    })
}

fn list_path(base: &str, limit: u32, instance: Option<&str>) -> String {
    match instance {
        // Instance ids are `[a-z0-9-]`; anything else would not match anyway.
        Some(i) => format!(
            "{base}?limit={limit}&instance_id={}",
            i.replace(
                |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_' && c != '.',
                ""
            )
        ),
        None => format!("{base}?limit={limit}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses_the_runbook_commands() {
        let cli = Cli::try_parse_from([
            "powernode-stub",
            "--data",
            "/tmp/x",
            "create-node",
            "--hostname",
            "edge-1",
            "--lifecycle-class",
            "ephemeral",
            "--label",
            "a=b",
            "--json",
        ])
        .unwrap();
        assert!(cli.json);
        assert!(matches!(cli.cmd, Cmd::CreateNode { .. }));
        let err = Cli::try_parse_from([
            "powernode-stub",
            "serve",
            "--data",
            "/tmp/x",
            "--provider",
            "vmware",
        ])
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("recorder, real, libvirt or disabled"),
            "{err}"
        );
        let cli = Cli::try_parse_from([
            "powernode-stub",
            "serve",
            "--data",
            "/tmp/x",
            "--provider",
            "libvirt",
            "--libvirt-uri",
            "qemu+ssh://host/system",
        ])
        .unwrap();
        let Cmd::Serve(args) = cli.cmd else {
            panic!("not serve")
        };
        assert_eq!(args.provider, ProviderMode::Libvirt);
        assert_eq!(args.libvirt_uri, "qemu+ssh://host/system");
        let cli = Cli::try_parse_from([
            "powernode-stub",
            "serve",
            "--data",
            "/tmp/x",
            "--provider",
            "real",
            "--image-base",
            "build",
        ])
        .unwrap();
        let Cmd::Serve(args) = cli.cmd else {
            panic!("not serve")
        };
        assert_eq!(args.provider, ProviderMode::Real);
        assert_eq!(
            args.image_base.as_deref(),
            Some(std::path::Path::new("build"))
        );
        let cli = Cli::try_parse_from([
            "powernode-stub",
            "serve",
            "--data",
            "/tmp/x",
            "--listen",
            "127.0.0.1:0",
            "--stuck-thresholds",
            "pending=5",
            "--san",
            "a.example",
            "--san",
            "10.1.1.1",
        ])
        .unwrap();
        let Cmd::Serve(args) = cli.cmd else {
            panic!("not serve")
        };
        assert_eq!(args.stuck_thresholds.unwrap().pending, 5);
        assert_eq!(args.sans.len(), 2);
    }
}
