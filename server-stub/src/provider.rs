//! Providers: what makes (and destroys) the machine behind an instance. One trait;
//! here the `recorder` (records exactly what it would do, including the identity
//! document it would hand the VM) and `disabled`. The `real` QEMU provider comes with
//! the netboot work.

use powernode_proto::admin::InstanceType;
use powernode_proto::{IdentityDocument, LifecycleClass};
use serde_json::json;

use crate::config::ProviderMode;

/// Everything a provider needs to start one instance.
#[derive(Debug, Clone)]
pub struct ProvisionSpec {
    pub instance_id: String,
    pub node_id: String,
    pub hostname: String,
    pub lifecycle_class: LifecycleClass,
    pub instance_type: InstanceType,
    pub region: String,
    pub template_id: String,
    pub platform: String,
    pub identity: IdentityDocument,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("no provider is configured (POWERNODE_LIBVIRT_MODE=disabled)")]
    Disabled,
    #[error("provider failed: {0}")]
    Failed(String),
}

/// A provider action's record: what was (or would have been) done, kept in
/// `provider_records` so an operator and the tests can read it back.
pub type ProviderRecord = serde_json::Value;

pub trait Provider: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    /// Whether provisioning can work at all (checked before any row is created).
    fn enabled(&self) -> bool;
    fn provision(&self, spec: &ProvisionSpec) -> Result<ProviderRecord, ProviderError>;
    fn destroy(&self, instance_id: &str) -> Result<ProviderRecord, ProviderError>;
}

pub fn from_mode(mode: ProviderMode) -> Box<dyn Provider> {
    match mode {
        ProviderMode::Recorder => Box::new(Recorder {
            image_base: std::env::var("POWERNODE_IMAGE_BASE").ok(),
        }),
        ProviderMode::Disabled => Box::new(Disabled),
    }
}

/// Records the VM it would boot, instantly.
#[derive(Debug)]
pub struct Recorder {
    pub image_base: Option<String>,
}

impl Provider for Recorder {
    fn name(&self) -> &'static str {
        "recorder"
    }

    fn enabled(&self) -> bool {
        true
    }

    fn provision(&self, spec: &ProvisionSpec) -> Result<ProviderRecord, ProviderError> {
        let base = self
            .image_base
            .clone()
            .unwrap_or_else(|| "<POWERNODE_IMAGE_BASE>".to_string());
        Ok(json!({
            "provider": "recorder",
            "action": "provision",
            "instance_id": spec.instance_id,
            "node_id": spec.node_id,
            "vm": {
                "name": format!("powernode-{}", spec.instance_id),
                "hostname": spec.hostname,
                "platform": spec.platform,
                "template_id": spec.template_id,
                "region": spec.region,
                "instance_type": spec.instance_type.id,
                "vcpus": spec.instance_type.vcpus,
                "memory_mb": spec.instance_type.memory_mb,
                "kernel": format!("{base}/vmlinuz"),
                "initrd": format!("{base}/initramfs.cpio.gz"),
                "persist_disk": spec.lifecycle_class == LifecycleClass::Persistent,
                "fw_cfg": {"opt/org.powernode/identity": "identity"},
                "kernel_cmdline": "console=ttyS0 panic=-1 powernode.identity_source=fw_cfg",
                "network": "user,host=10.0.2.2",
                "rng": "virtio-rng",
            },
            "identity": spec.identity,
        }))
    }

    fn destroy(&self, instance_id: &str) -> Result<ProviderRecord, ProviderError> {
        Ok(json!({
            "provider": "recorder",
            "action": "destroy",
            "instance_id": instance_id,
            "vm": {"name": format!("powernode-{instance_id}")},
        }))
    }
}

/// No provider: provisioning is refused; destroying has nothing to do.
#[derive(Debug)]
pub struct Disabled;

impl Provider for Disabled {
    fn name(&self) -> &'static str {
        "disabled"
    }

    fn enabled(&self) -> bool {
        false
    }

    fn provision(&self, _spec: &ProvisionSpec) -> Result<ProviderRecord, ProviderError> {
        Err(ProviderError::Disabled)
    }

    fn destroy(&self, instance_id: &str) -> Result<ProviderRecord, ProviderError> {
        Ok(
            json!({"provider": "disabled", "action": "destroy", "instance_id": instance_id, "vm": null}),
        )
    }
}
