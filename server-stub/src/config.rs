//! Server configuration: what `serve` was started with. Parsing helpers for the
//! command-line forms (`--stuck-thresholds pending=300,...`) live here so they are
//! unit-tested apart from clap.

use std::net::SocketAddr;
use std::path::PathBuf;

use powernode_proto::InstanceStatus;

/// Which provider backs `provision` / `terminate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderMode {
    /// Records exactly what it would do, including the identity document; instant.
    Recorder,
    /// No provider: provisioning is refused with `provider_disabled`.
    Disabled,
    /// Local QEMU VMs booted from the published netboot image.
    Real,
    /// The same VMs as libvirt domains (`--libvirt-uri`, through `virsh`).
    Libvirt,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("unknown provider mode {0:?} (recorder, real, libvirt or disabled)")]
    UnknownProvider(String),
    #[error("bad stuck threshold {0:?}: expected STATE=SECONDS")]
    BadThreshold(String),
    #[error("state {0:?} has no stuck threshold (pending, provisioning, bootstrapping, running, draining, terminating)")]
    UnknownThresholdState(String),
}

impl ProviderMode {
    /// Whether instances are local VMs (which reach the server through QEMU's user
    /// network, at 10.0.2.2).
    pub fn boots_vms(self) -> bool {
        matches!(self, Self::Real | Self::Libvirt)
    }
}

impl std::str::FromStr for ProviderMode {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "recorder" => Ok(Self::Recorder),
            "disabled" => Ok(Self::Disabled),
            "real" => Ok(Self::Real),
            "libvirt" => Ok(Self::Libvirt),
            other => Err(ConfigError::UnknownProvider(other.to_string())),
        }
    }
}

/// Seconds an instance may stay in a state before the server calls it stuck
/// (for `running`: seconds without a heartbeat; for `bootstrapping`: since enrollment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StuckThresholds {
    pub pending: u64,
    pub provisioning: u64,
    pub bootstrapping: u64,
    pub running: u64,
    pub draining: u64,
    pub terminating: u64,
}

impl Default for StuckThresholds {
    fn default() -> Self {
        Self {
            pending: 300,
            provisioning: 600,
            bootstrapping: 300,
            running: 300,
            draining: 1800,
            terminating: 300,
        }
    }
}

impl StuckThresholds {
    /// Applies `pending=300,running=60` (any subset) over the defaults.
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let mut t = Self::default();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (state, secs) = part
                .split_once('=')
                .ok_or_else(|| ConfigError::BadThreshold(part.to_string()))?;
            let secs: u64 = secs
                .trim()
                .parse()
                .map_err(|_| ConfigError::BadThreshold(part.to_string()))?;
            let slot = match state.trim() {
                "pending" => &mut t.pending,
                "provisioning" => &mut t.provisioning,
                "bootstrapping" => &mut t.bootstrapping,
                "running" => &mut t.running,
                "draining" => &mut t.draining,
                "terminating" => &mut t.terminating,
                other => return Err(ConfigError::UnknownThresholdState(other.to_string())),
            };
            *slot = secs;
        }
        Ok(t)
    }

    pub fn for_status(&self, status: InstanceStatus) -> Option<u64> {
        match status {
            InstanceStatus::Pending => Some(self.pending),
            InstanceStatus::Provisioning => Some(self.provisioning),
            InstanceStatus::Bootstrapping => Some(self.bootstrapping),
            InstanceStatus::Running => Some(self.running),
            InstanceStatus::Draining => Some(self.draining),
            InstanceStatus::Terminating => Some(self.terminating),
            InstanceStatus::Terminated | InstanceStatus::Failed => None,
        }
    }
}

/// Default of [`Config::reissue_grace_seconds`]: a week, so a node rides out an
/// outage over a long weekend and more, yet a node gone for longer must be
/// provisioned afresh.
pub const DEFAULT_REISSUE_GRACE_SECONDS: u64 = 7 * 86_400;

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Control-plane URL put into identity documents; `None`: `https://<bound addr>`.
    pub public_url: Option<String>,
    /// Extra server-certificate SANs.
    pub sans: Vec<String>,
    pub provider: ProviderMode,
    /// Netboot image folder (`vmlinuz`, `initramfs.img`, `cmdline`, `manifest.json`);
    /// `real` and `libvirt` also keep their per-instance folders under
    /// `DIR/instances/`.
    pub image_base: Option<PathBuf>,
    /// The libvirt connection of the `libvirt` provider.
    pub libvirt_uri: String,
    pub silent_after_seconds: u64,
    pub token_ttl_seconds: u64,
    pub cert_ttl_seconds: u64,
    /// How long after its certificate expired a node may still re-enroll it
    /// (`certificate/reissue`, same key): the longest control-plane outage (or node
    /// downtime) a node survives without a new bootstrap token.
    pub reissue_grace_seconds: u64,
    pub stuck: StuckThresholds,
    pub sensor_interval_ms: u64,
    pub lease_max_seconds: u64,
    pub heartbeat_interval_seconds: u64,
    /// How often batched heartbeat state is written to SQLite.
    pub flush_interval_ms: u64,
    /// Largest blob the embedded registry accepts (uploads stream to disk).
    pub registry_max_blob_bytes: u64,
    /// Provider quota: at most this many provisions at once per region (0: no limit).
    pub quota_concurrent_provisions: u32,
    /// Provider quota: at most this many live instances per region (0: no limit).
    pub quota_instances_per_region: u32,
    /// Finished tasks, expired certificates, events and inactive signals older than
    /// this are deleted (see `service::retention`); 0 keeps everything.
    pub retention_days: u64,
    /// Print `{"listening": ADDR}` on stdout once bound (the binary does; in-process
    /// tests need not).
    pub announce: bool,
    /// Whether the server keeps an online module-signing key
    /// (`DIR/module-signing.key`) and signs on the admin route; off, it never makes
    /// or reads one and publishers sign offline (`publish-module --key`).
    pub online_signing: bool,
    /// Public keys of offline signers (`--module-trust-key`); with the online key
    /// (when on) they are the trust set nodes are handed and publications are
    /// checked against.
    pub module_trust_keys: Vec<crate::signing::PublicKey>,
}

impl Config {
    /// The retention in ms, `None` when records are kept for ever.
    pub fn retention_ms(&self) -> Option<crate::clock::Millis> {
        (self.retention_days > 0).then(|| {
            i64::try_from(self.retention_days)
                .unwrap_or(i64::MAX)
                .saturating_mul(86_400_000)
        })
    }

    /// Defaults for everything but the data directory and listen address.
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> Self {
        Self {
            data_dir,
            listen,
            public_url: None,
            sans: Vec::new(),
            provider: ProviderMode::Recorder,
            image_base: None,
            libvirt_uri: powernode_qemu::libvirt::DEFAULT_URI.to_string(),
            silent_after_seconds: 300,
            token_ttl_seconds: 86_400,
            cert_ttl_seconds: 86_400,
            reissue_grace_seconds: DEFAULT_REISSUE_GRACE_SECONDS,
            stuck: StuckThresholds::default(),
            sensor_interval_ms: 1000,
            lease_max_seconds: 3600,
            heartbeat_interval_seconds: 30,
            registry_max_blob_bytes: crate::registry::DEFAULT_MAX_BLOB_BYTES,
            quota_concurrent_provisions: 0,
            quota_instances_per_region: 0,
            flush_interval_ms: 1000,
            retention_days: 30,
            announce: true,
            online_signing: true,
            module_trust_keys: Vec::new(),
        }
    }
}

/// `host[:port]` of a URL.
pub fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.split('/').next().filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_parse_subsets_and_refuse_junk() {
        let t = StuckThresholds::parse("pending=5, running=7").unwrap();
        assert_eq!(t.pending, 5);
        assert_eq!(t.running, 7);
        assert_eq!(t.draining, 1800);
        assert_eq!(
            StuckThresholds::parse("nope=1"),
            Err(ConfigError::UnknownThresholdState("nope".into()))
        );
        assert!(matches!(
            StuckThresholds::parse("pending"),
            Err(ConfigError::BadThreshold(_))
        ));
    }

    #[test]
    fn provider_modes() {
        assert_eq!("recorder".parse(), Ok(ProviderMode::Recorder));
        assert_eq!("disabled".parse(), Ok(ProviderMode::Disabled));
        assert_eq!("real".parse(), Ok(ProviderMode::Real));
        assert_eq!("libvirt".parse(), Ok(ProviderMode::Libvirt));
        assert_eq!(
            "virtualbox".parse::<ProviderMode>(),
            Err(ConfigError::UnknownProvider("virtualbox".into()))
        );
    }
}
