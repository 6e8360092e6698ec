//! What a module's OCI image config tells the node, beyond its files: where a runtime
//! module is exposed and which services it runs. Standard image configs carry it, so
//! ordinary container tooling builds modules (`LABEL` in a Dockerfile):
//!
//! - `Labels["org.powernode.mountpoint"]`: an absolute path where the module's tree
//!   (mounted at `/run/powernode/modules/NAME`) is also bind-mounted, e.g. `/opt/web`.
//! - `Labels["org.powernode.services"]`: a JSON array of
//!   `{"name", "command": [argv], "env": ["K=V"], "restart": "always|on-failure|never",
//!   "stop_timeout_seconds": 10}`. `command` defaults to the config's
//!   `Entrypoint` + `Cmd`; `env` goes on top of the config's `Env`. An argv\[0\]
//!   with a `/` that is not absolute is relative to the module's tree; a bare name is
//!   looked up in the module's `bin`, `usr/bin`, `sbin` and `usr/sbin`, then the
//!   node's `PATH`. Services run with the module's tree as working directory and
//!   `POWERNODE_MODULE` / `POWERNODE_MODULE_DIR` set. A service may instead name a
//!   systemd unit the root already has (`{"name": "docker", "unit": "docker.service"}`):
//!   on a systemd root it is started, stopped and reported, never written; without
//!   systemd it is reported `failed`.
//! - `Labels["org.powernode.drain"]`: a JSON array of drain steps
//!   `{"name", "command": [argv], "timeout_seconds": 30, "undo": [argv]}`, run in
//!   order by a drain before the node's services stop (e.g. stop the containers a
//!   `--restart=always` daemon would bring back, then let the daemon stop); `undo`
//!   runs when the drain is cancelled. Programs resolve like services' and run in the
//!   module's tree.
//!
//! The config is covered by the module's signature (the signed manifest pins its
//! digest) and is read only after that check. A bad label is a typed error naming
//! the label, never a panic.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::drain::DrainStep;
use crate::supervisor::{RestartPolicy, ServiceSpec, DEFAULT_STOP_TIMEOUT};

pub const MOUNTPOINT_LABEL: &str = "org.powernode.mountpoint";
pub const SERVICES_LABEL: &str = "org.powernode.services";
pub const DRAIN_LABEL: &str = "org.powernode.drain";
/// `suid`, `dev` or both (comma-separated): what a runtime module's mount keeps of
/// what it otherwise refuses (`nosuid,nodev`).
pub const MOUNT_OPTIONS_LABEL: &str = "org.powernode.mount-options";
/// More drain steps than this in one module is a mistake, not a runbook.
const MAX_DRAIN_STEPS: usize = 16;
/// A drain step's time when its declaration names none.
pub const DEFAULT_DRAIN_STEP_TIMEOUT_SECONDS: u64 = 30;
const MAX_DRAIN_STEP_TIMEOUT_SECONDS: u64 = 600;
/// More services than this in one module is a mistake, not a workload.
const MAX_SERVICES: usize = 32;
/// A stop timeout above this would stall drains and updates for too long.
const MAX_STOP_TIMEOUT_SECONDS: u64 = 600;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("the module config is not an OCI image config")]
    Json(#[source] serde_json::Error),
    #[error("label {label}: {reason}")]
    Label { label: &'static str, reason: String },
}

/// A module's declarations, as read from its config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleConfig {
    pub mountpoint: Option<PathBuf>,
    /// Set-user-ID files honoured (`org.powernode.mount-options: suid`).
    pub suid: bool,
    /// Device nodes honoured (`org.powernode.mount-options: dev`).
    pub dev: bool,
    pub services: Vec<ServiceDecl>,
    pub drain: Vec<DrainStepDecl>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: Vec<String>,
}

/// One entry of the services label.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceDecl {
    pub name: String,
    #[serde(default)]
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub restart: RestartPolicy,
    #[serde(default)]
    pub stop_timeout_seconds: Option<u64>,
    /// An existing systemd unit this service is (e.g. `docker.service`).
    #[serde(default)]
    pub unit: Option<String>,
}

/// One entry of the drain label.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainStepDecl {
    pub name: String,
    pub command: Vec<String>,
    #[serde(default = "default_drain_step_timeout")]
    pub timeout_seconds: u64,
    #[serde(default)]
    pub undo: Option<Vec<String>>,
}

fn default_drain_step_timeout() -> u64 {
    DEFAULT_DRAIN_STEP_TIMEOUT_SECONDS
}

/// A systemd unit name a service may name: a `.service`, no path, no oddities.
fn unit_name_ok(u: &str) -> bool {
    u.len() <= 255
        && u.len() > ".service".len()
        && u.ends_with(".service")
        && !u.starts_with('.')
        && !u.starts_with('-')
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":_.@\\-".contains(&b))
}

#[derive(Debug, Default, Deserialize)]
struct ImageConfig {
    #[serde(default)]
    config: Option<ContainerConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

fn label_err(label: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Label {
        label,
        reason: reason.into(),
    }
}

fn safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Parses an OCI image config (`application/vnd.oci.image.config.v1+json` or
/// Docker's). A config without labels declares nothing.
pub fn parse(bytes: &[u8]) -> Result<ModuleConfig, ConfigError> {
    let image: ImageConfig = serde_json::from_slice(bytes).map_err(ConfigError::Json)?;
    let c = image.config.unwrap_or_default();
    let labels = c.labels.unwrap_or_default();
    let mountpoint = match labels.get(MOUNTPOINT_LABEL) {
        None => None,
        Some(p) => Some(check_mountpoint(p)?),
    };
    let services: Vec<ServiceDecl> = match labels.get(SERVICES_LABEL) {
        None => Vec::new(),
        Some(json) => serde_json::from_str(json)
            .map_err(|e| label_err(SERVICES_LABEL, format!("not a JSON array of services: {e}")))?,
    };
    if services.len() > MAX_SERVICES {
        return Err(label_err(
            SERVICES_LABEL,
            format!("{} services (at most {MAX_SERVICES})", services.len()),
        ));
    }
    let drain = match labels.get(DRAIN_LABEL) {
        None => Vec::new(),
        Some(json) => parse_drain(json)?,
    };
    let (mut suid, mut dev) = (false, false);
    for opt in labels
        .get(MOUNT_OPTIONS_LABEL)
        .map(String::as_str)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
    {
        match opt {
            "suid" => suid = true,
            "dev" => dev = true,
            other => {
                return Err(label_err(
                    MOUNT_OPTIONS_LABEL,
                    format!("{other:?} is not a mount option here (suid, dev)"),
                ))
            }
        }
    }
    let cfg = ModuleConfig {
        mountpoint,
        suid,
        dev,
        services,
        drain,
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
        env: c.env.unwrap_or_default(),
    };
    let mut seen = std::collections::BTreeSet::new();
    for s in &cfg.services {
        if !safe_name(&s.name) {
            return Err(label_err(
                SERVICES_LABEL,
                format!("service name {:?}: letters, digits and inner . _ -", s.name),
            ));
        }
        if !seen.insert(s.name.as_str()) {
            return Err(label_err(
                SERVICES_LABEL,
                format!("service {:?} twice", s.name),
            ));
        }
        if let Some(unit) = &s.unit {
            if !unit_name_ok(unit) {
                return Err(label_err(
                    SERVICES_LABEL,
                    format!("service {:?}: unit {unit:?} is not a NAME.service", s.name),
                ));
            }
            if s.command.is_some() || !s.env.is_empty() {
                return Err(label_err(
                    SERVICES_LABEL,
                    format!(
                        "service {:?} names unit {unit:?}: the unit has its own command and environment",
                        s.name
                    ),
                ));
            }
            continue;
        }
        if cfg.command_of(s).first().is_none_or(|a| a.is_empty()) {
            return Err(label_err(
                SERVICES_LABEL,
                format!(
                    "service {:?} has no command and the config has no Entrypoint/Cmd",
                    s.name
                ),
            ));
        }
        if let Some(bad) = s.env.iter().chain(&cfg.env).find(|e| !e.contains('=')) {
            return Err(label_err(
                SERVICES_LABEL,
                format!("service {:?}: environment entry {bad:?} is not K=V", s.name),
            ));
        }
        if s.stop_timeout_seconds
            .is_some_and(|t| t == 0 || t > MAX_STOP_TIMEOUT_SECONDS)
        {
            return Err(label_err(
                SERVICES_LABEL,
                format!(
                    "service {:?}: stop_timeout_seconds must be 1..={MAX_STOP_TIMEOUT_SECONDS}",
                    s.name
                ),
            ));
        }
    }
    Ok(cfg)
}

fn parse_drain(json: &str) -> Result<Vec<DrainStepDecl>, ConfigError> {
    let err = |reason: String| label_err(DRAIN_LABEL, reason);
    let steps: Vec<DrainStepDecl> = serde_json::from_str(json)
        .map_err(|e| err(format!("not a JSON array of drain steps: {e}")))?;
    if steps.len() > MAX_DRAIN_STEPS {
        return Err(err(format!(
            "{} drain steps (at most {MAX_DRAIN_STEPS})",
            steps.len()
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for s in &steps {
        if !safe_name(&s.name) {
            return Err(err(format!(
                "step name {:?}: letters, digits and inner . _ -",
                s.name
            )));
        }
        if !seen.insert(s.name.as_str()) {
            return Err(err(format!("step {:?} twice", s.name)));
        }
        if s.command.first().is_none_or(|a| a.is_empty()) {
            return Err(err(format!("step {:?} has no command", s.name)));
        }
        if s.undo
            .as_ref()
            .is_some_and(|u| u.first().is_none_or(|a| a.is_empty()))
        {
            return Err(err(format!("step {:?}: undo is an empty command", s.name)));
        }
        if !(1..=MAX_DRAIN_STEP_TIMEOUT_SECONDS).contains(&s.timeout_seconds) {
            return Err(err(format!(
                "step {:?}: timeout_seconds must be 1..={MAX_DRAIN_STEP_TIMEOUT_SECONDS}",
                s.name
            )));
        }
    }
    Ok(steps)
}

fn check_mountpoint(p: &str) -> Result<PathBuf, ConfigError> {
    let path = Path::new(p);
    if !path.is_absolute() {
        return Err(label_err(
            MOUNTPOINT_LABEL,
            format!("{p:?} is not absolute"),
        ));
    }
    if path
        .components()
        .any(|c| !matches!(c, Component::RootDir | Component::Normal(_)))
    {
        return Err(label_err(
            MOUNTPOINT_LABEL,
            format!("{p:?} is not a plain path"),
        ));
    }
    // Never over the node's own trees: the root, the kernel's, the agent's, the
    // node's configuration and its persistent disk (where credentials live).
    let first = path.components().nth(1);
    let reserved = ["proc", "sys", "dev", "run", "etc", "persist"];
    match first {
        None => Err(label_err(
            MOUNTPOINT_LABEL,
            "the root cannot be a mount point",
        )),
        Some(Component::Normal(c)) if reserved.iter().any(|r| c == *r) => Err(label_err(
            MOUNTPOINT_LABEL,
            format!("{p:?} is under a reserved tree (/proc, /sys, /dev, /run, /etc, /persist)"),
        )),
        Some(_) => Ok(path.to_path_buf()),
    }
}

impl ModuleConfig {
    /// How the module's tree is mounted: `nosuid,nodev` unless it asked otherwise.
    pub fn restrict(&self) -> super::mount::Restrict {
        super::mount::Restrict {
            nosuid: !self.suid,
            nodev: !self.dev,
        }
    }

    fn command_of(&self, s: &ServiceDecl) -> Vec<String> {
        match &s.command {
            Some(c) => c.clone(),
            None => self.entrypoint.iter().chain(&self.cmd).cloned().collect(),
        }
    }

    /// The module's drain steps as the runtime runs them, with its tree at `dir`.
    pub fn drain_steps(&self, module: &str, dir: &Path) -> Vec<DrainStep> {
        let env: Vec<(String, String)> = self
            .env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain([
                ("POWERNODE_MODULE".to_string(), module.to_string()),
                (
                    "POWERNODE_MODULE_DIR".to_string(),
                    dir.to_string_lossy().into_owned(),
                ),
            ])
            .collect();
        let resolve = |argv: &[String]| {
            let mut argv = argv.to_vec();
            if let Some(first) = argv.first_mut() {
                *first = resolve_program(first, dir, &env);
            }
            argv
        };
        self.drain
            .iter()
            .map(|d| DrainStep {
                module: module.to_string(),
                name: d.name.clone(),
                argv: resolve(&d.command),
                undo: d.undo.as_deref().map(resolve),
                timeout: Duration::from_secs(d.timeout_seconds),
                env: env.clone(),
                cwd: Some(dir.to_path_buf()),
            })
            .collect()
    }

    /// The module's services as the supervisor runs them, with the module's tree at
    /// `dir`.
    pub fn service_specs(&self, module: &str, dir: &Path) -> Vec<ServiceSpec> {
        self.services
            .iter()
            .map(|s| {
                if let Some(unit) = &s.unit {
                    let mut spec = ServiceSpec::new(&s.name, module, Vec::new());
                    spec.unit = Some(unit.clone());
                    spec.restart = s.restart;
                    if let Some(t) = s.stop_timeout_seconds {
                        spec.stop_timeout = Duration::from_secs(t);
                    }
                    return spec;
                }
                let mut argv = self.command_of(s);
                let mut env: Vec<(String, String)> = self
                    .env
                    .iter()
                    .chain(&s.env)
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                if let Some(first) = argv.first_mut() {
                    *first = resolve_program(first, dir, &env);
                }
                env.push(("POWERNODE_MODULE".into(), module.to_string()));
                env.push((
                    "POWERNODE_MODULE_DIR".into(),
                    dir.to_string_lossy().into_owned(),
                ));
                ServiceSpec {
                    name: s.name.clone(),
                    module: module.to_string(),
                    argv,
                    env,
                    cwd: Some(dir.to_path_buf()),
                    restart: s.restart,
                    stop_timeout: s
                        .stop_timeout_seconds
                        .map(Duration::from_secs)
                        .unwrap_or(DEFAULT_STOP_TIMEOUT),
                    unit: None,
                }
            })
            .collect()
    }
}

/// argv\[0\] as a path: module-relative with a `/`, else looked up in the module's
/// bin folders, then the PATH the service gets (or the node's).
fn resolve_program(program: &str, dir: &Path, env: &[(String, String)]) -> String {
    if program.starts_with('/') {
        return program.to_string();
    }
    if program.contains('/') {
        return dir.join(program).to_string_lossy().into_owned();
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_default();
    let module_bins = ["bin", "usr/bin", "sbin", "usr/sbin"].map(|b| dir.join(b));
    module_bins
        .into_iter()
        .chain(std::env::split_paths(&path))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| program.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(labels: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Entrypoint": ["bin/server"], "Cmd": ["--port", "80"],
                       "Env": ["A=1", "PATH=/usr/bin:/bin"], "Labels": labels},
        }))
        .unwrap()
    }

    #[test]
    fn a_config_without_labels_declares_nothing() {
        let cfg = parse(br#"{"architecture":"amd64","os":"linux","config":{}}"#).unwrap();
        assert_eq!(cfg.mountpoint, None);
        assert!(cfg.services.is_empty());
        assert!(parse(br#"{"architecture":"amd64"}"#)
            .unwrap()
            .services
            .is_empty());
        assert!(matches!(parse(b"not json"), Err(ConfigError::Json(_))));
    }

    #[test]
    fn services_and_mountpoint_become_specs() {
        let services = serde_json::json!([
            {"name": "web"},
            {"name": "worker", "command": ["busybox", "sleep", "9"], "env": ["B=2"],
             "restart": "always", "stop_timeout_seconds": 3},
            {"name": "abs", "command": ["/bin/true"], "restart": "never"},
        ]);
        let cfg = parse(&config(serde_json::json!({
            MOUNTPOINT_LABEL: "/opt/demo",
            SERVICES_LABEL: services.to_string(),
        })))
        .unwrap();
        assert_eq!(cfg.mountpoint.as_deref(), Some(Path::new("/opt/demo")));
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        std::fs::write(dir.path().join("bin/busybox"), b"").unwrap();
        let specs = cfg.service_specs("demo", dir.path());
        let d = dir.path().display();
        assert_eq!(
            specs[0].argv,
            vec![format!("{d}/bin/server"), "--port".into(), "80".into()]
        );
        assert_eq!(specs[0].restart, RestartPolicy::OnFailure);
        assert_eq!(specs[0].stop_timeout, DEFAULT_STOP_TIMEOUT);
        assert_eq!(specs[1].argv[0], format!("{d}/bin/busybox"));
        assert_eq!(specs[1].restart, RestartPolicy::Always);
        assert_eq!(specs[1].stop_timeout, Duration::from_secs(3));
        assert!(specs[1].env.contains(&("A".into(), "1".into())));
        assert!(specs[1].env.contains(&("B".into(), "2".into())));
        assert!(specs[1]
            .env
            .contains(&("POWERNODE_MODULE".into(), "demo".into())));
        assert_eq!(specs[1].cwd.as_deref(), Some(dir.path()));
        assert_eq!(specs[2].argv, vec!["/bin/true"]);
        assert!(specs.iter().all(|s| s.module == "demo"));
    }

    #[test]
    fn a_runtime_module_is_nosuid_nodev_unless_it_asks() {
        use super::super::mount::Restrict;
        let cfg = |labels| parse(&config(labels)).unwrap().restrict();
        assert_eq!(cfg(serde_json::json!({})), Restrict::RUNTIME);
        assert_eq!(
            cfg(serde_json::json!({ MOUNT_OPTIONS_LABEL: "suid" })),
            Restrict {
                nosuid: false,
                nodev: true
            }
        );
        assert_eq!(
            cfg(serde_json::json!({ MOUNT_OPTIONS_LABEL: "dev, suid" })),
            Restrict::default()
        );
    }

    #[test]
    fn bad_labels_are_named() {
        let bad = |labels: serde_json::Value| match parse(&config(labels)) {
            Err(ConfigError::Label { label, reason }) => format!("{label}: {reason}"),
            other => panic!("{other:?}"),
        };
        for p in [
            "opt/x",
            "/",
            "/proc/x",
            "/run/powernode/x",
            "/opt/../etc",
            "/etc",
            "/etc/ssh",
            "/persist/powernode",
        ] {
            let e = bad(serde_json::json!({ MOUNTPOINT_LABEL: p }));
            assert!(e.starts_with(MOUNTPOINT_LABEL), "{p}: {e}");
        }
        for o in ["exec", "suid,rw", "nosuid"] {
            let e = bad(serde_json::json!({ MOUNT_OPTIONS_LABEL: o }));
            assert!(e.starts_with(MOUNT_OPTIONS_LABEL), "{o}: {e}");
        }
        let cases = [
            serde_json::json!("not json").to_string(),
            r#"{"name":"x"}"#.into(),
            r#"[{"name":"../x","command":["a"]}]"#.into(),
            r#"[{"name":"a","command":["x"]},{"name":"a","command":["y"]}]"#.into(),
            r#"[{"name":"a","command":["x"],"env":["NOEQUALS"]}]"#.into(),
            r#"[{"name":"a","command":["x"],"restart":"sometimes"}]"#.into(),
            r#"[{"name":"a","command":["x"],"stop_timeout_seconds":0}]"#.into(),
            r#"[{"name":"a","command":["x"],"unknown":1}]"#.into(),
            r#"[{"name":"a","command":[]}]"#.into(),
        ];
        for c in cases {
            let e = bad(serde_json::json!({ SERVICES_LABEL: c }));
            assert!(e.starts_with(SERVICES_LABEL), "{c}: {e}");
        }
        // No command and no Entrypoint/Cmd to fall back on.
        let e = parse(
            &serde_json::to_vec(
                &serde_json::json!({"config": {"Labels": {SERVICES_LABEL: r#"[{"name":"a"}]"#}}}),
            )
            .unwrap(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("no command"), "{e}");
    }

    #[test]
    fn drain_steps_parse_with_defaults_and_resolve_in_the_module() {
        let drain = serde_json::json!([
            {"name": "containers", "command": ["bin/stop-containers", "--all"],
             "undo": ["bin/start-containers"]},
            {"name": "flush", "command": ["/bin/sync"], "timeout_seconds": 5},
        ]);
        let cfg = parse(&config(
            serde_json::json!({ DRAIN_LABEL: drain.to_string() }),
        ))
        .unwrap();
        assert_eq!(cfg.drain.len(), 2);
        assert_eq!(
            cfg.drain[0].timeout_seconds,
            DEFAULT_DRAIN_STEP_TIMEOUT_SECONDS
        );
        let steps = cfg.drain_steps("web", Path::new("/opt/web"));
        assert_eq!(steps[0].label(), "step:web/containers");
        assert_eq!(steps[0].argv, ["/opt/web/bin/stop-containers", "--all"]);
        assert_eq!(
            steps[0].undo.as_deref(),
            Some(&["/opt/web/bin/start-containers".to_string()][..])
        );
        assert_eq!(steps[0].cwd.as_deref(), Some(Path::new("/opt/web")));
        assert!(steps[0]
            .env
            .contains(&("POWERNODE_MODULE".into(), "web".into())));
        assert!(steps[0].env.contains(&("A".into(), "1".into())));
        assert_eq!(steps[1].timeout, Duration::from_secs(5));
        assert_eq!(steps[1].undo, None);
    }

    #[test]
    fn bad_drain_steps_are_named() {
        let cases = [
            "not json".to_string(),
            r#"{"name":"x","command":["a"]}"#.into(),
            r#"[{"name":"x"}]"#.into(),
            r#"[{"name":"x","command":[]}]"#.into(),
            r#"[{"name":"x","command":[""]}]"#.into(),
            r#"[{"name":"../x","command":["a"]}]"#.into(),
            r#"[{"name":"x","command":["a"]},{"name":"x","command":["b"]}]"#.into(),
            r#"[{"name":"x","command":["a"],"timeout_seconds":0}]"#.into(),
            r#"[{"name":"x","command":["a"],"timeout_seconds":601}]"#.into(),
            r#"[{"name":"x","command":["a"],"undo":[]}]"#.into(),
            r#"[{"name":"x","command":["a"],"retries":3}]"#.into(),
            serde_json::to_string(
                &(0..17)
                    .map(|i| serde_json::json!({"name": format!("s{i}"), "command": ["a"]}))
                    .collect::<Vec<_>>(),
            )
            .unwrap(),
        ];
        for c in cases {
            match parse(&config(serde_json::json!({ DRAIN_LABEL: c }))) {
                Err(ConfigError::Label { label, .. }) => assert_eq!(label, DRAIN_LABEL, "{c}"),
                other => panic!("{c}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_service_may_name_an_existing_unit_only() {
        let services = serde_json::json!([{"name": "docker", "unit": "docker.service",
                                          "stop_timeout_seconds": 60}]);
        let cfg = parse(&config(
            serde_json::json!({ SERVICES_LABEL: services.to_string() }),
        ))
        .unwrap();
        let specs = cfg.service_specs("dockerhost", Path::new("/"));
        assert_eq!(specs[0].unit.as_deref(), Some("docker.service"));
        assert!(specs[0].argv.is_empty());
        assert_eq!(specs[0].stop_timeout, Duration::from_secs(60));
        for bad in [
            r#"[{"name":"d","unit":"docker"}]"#,
            r#"[{"name":"d","unit":"../x.service"}]"#,
            r#"[{"name":"d","unit":"a b.service"}]"#,
            r#"[{"name":"d","unit":"docker.service","command":["x"]}]"#,
            r#"[{"name":"d","unit":"docker.service","env":["A=1"]}]"#,
        ] {
            match parse(&config(serde_json::json!({ SERVICES_LABEL: bad }))) {
                Err(ConfigError::Label { label, .. }) => assert_eq!(label, SERVICES_LABEL, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
