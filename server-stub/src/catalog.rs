//! The built-in catalog: templates, platforms, architectures, regions and instance
//! types the stub can provision.

use powernode_proto::admin::{Catalog, InstanceType, Template};

pub const TEMPLATE_EDGE_BASE: &str = "tmpl-edge-base";
pub const PLATFORM_NETBOOT: &str = "powernode-netboot";
pub const ARCH_AMD64: &str = "arch-amd64";
pub const REGION_LOCAL_QEMU: &str = "region-local-qemu";

pub fn catalog() -> Catalog {
    Catalog {
        templates: vec![Template {
            id: TEMPLATE_EDGE_BASE.to_string(),
            name: "Edge base (netboot, composefs root)".to_string(),
            platform: PLATFORM_NETBOOT.to_string(),
            arch: ARCH_AMD64.to_string(),
            default_region: REGION_LOCAL_QEMU.to_string(),
            default_instance_type: "type-qemu-1cpu-512mb".to_string(),
            root_modules: Vec::new(),
            runtime_modules: Vec::new(),
        }],
        platforms: vec![PLATFORM_NETBOOT.to_string()],
        architectures: vec![ARCH_AMD64.to_string()],
        regions: vec![REGION_LOCAL_QEMU.to_string()],
        instance_types: vec![
            InstanceType {
                id: "type-qemu-1cpu-512mb".to_string(),
                vcpus: 1,
                memory_mb: 512,
            },
            InstanceType {
                id: "type-qemu-2cpu-4gb".to_string(),
                vcpus: 2,
                memory_mb: 4096,
            },
        ],
    }
}
