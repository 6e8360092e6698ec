//! URL paths of the control plane, in one place so node and server cannot drift.
//! They follow the platform's naming (`/api/v1/system/...`).

/// Node API: bootstrap-token authenticated (no client certificate yet).
pub const ENROLLMENT: &str = "/api/v1/system/node_api/enrollment";
/// Node API, bootstrap-token authenticated: a failure before enrollment (network,
/// enrollment refused, a broken identity) reported without spending the token.
pub const BOOT_REPORT: &str = "/api/v1/system/node_api/boot_report";
/// Node API, mTLS from here on.
pub const HANDSHAKE: &str = "/api/v1/system/node_api/runtime/handshake";
pub const HEARTBEAT: &str = "/api/v1/system/node_api/runtime/heartbeat";
pub const DESIRED_MODULES: &str = "/api/v1/system/node_api/modules/desired";
pub const CERTIFICATE_RENEW: &str = "/api/v1/system/node_api/certificate/renew";
/// Re-enrollment of an expired certificate: no valid client certificate needed, the
/// body carries the expired certificate and a CSR signed by the same key.
pub const CERTIFICATE_REISSUE: &str = "/api/v1/system/node_api/certificate/reissue";
/// Worker API (mTLS): task lease.
pub const TASK_LEASE: &str = "/api/v1/system/worker_api/tasks/lease";
/// `/api/v1/system/worker_api/tasks/{id}/renew`
pub fn task_renew(task_id: &str) -> String {
    format!("/api/v1/system/worker_api/tasks/{task_id}/renew")
}
/// `/api/v1/system/worker_api/tasks/{id}/complete`
pub fn task_complete(task_id: &str) -> String {
    format!("/api/v1/system/worker_api/tasks/{task_id}/complete")
}

/// Admin API (bearer admin token). One path per runbook action.
pub const ADMIN_NODES: &str = "/api/v1/system/nodes";
/// `POST`: create and provision up to [`crate::admin::MAX_CLUSTER_COUNT`] Nodes at once.
pub const ADMIN_CLUSTERS: &str = "/api/v1/system/clusters";
pub const ADMIN_TEMPLATES: &str = "/api/v1/system/templates";
pub const ADMIN_SIGNALS: &str = "/api/v1/system/signals";
pub const ADMIN_EVENTS: &str = "/api/v1/system/events";
/// `system_list_disk_image_publications` (GET) and publishing an image folder (POST).
pub const ADMIN_DISK_IMAGE_PUBLICATIONS: &str = "/api/v1/system/disk_image_publications";
/// Module publications: list (GET) and record a pushed, signed module (POST).
pub const ADMIN_MODULE_PUBLICATIONS: &str = "/api/v1/system/module_publications";
/// Signs a module manifest with the server's module-signing key (POST).
pub const ADMIN_MODULE_SIGNATURES: &str = "/api/v1/system/module_signatures";
/// The public half of the module-signing key (GET).
pub const ADMIN_MODULE_SIGNING_KEY: &str = "/api/v1/system/module_signing_key";
/// The module trust set and what an offline signer needs (GET): whether the server
/// signs online, the registry host signatures of the embedded registry name.
pub const ADMIN_MODULE_TRUST: &str = "/api/v1/system/module_trust";

pub fn admin_node(node_id: &str) -> String {
    format!("/api/v1/system/nodes/{node_id}")
}
/// `PUT`: the template's root and runtime module lists.
pub fn admin_template_modules(template_id: &str) -> String {
    format!("/api/v1/system/templates/{template_id}/modules")
}
pub fn admin_provision(node_id: &str) -> String {
    format!("/api/v1/system/nodes/{node_id}/provision")
}
pub fn admin_instance(instance_id: &str) -> String {
    format!("/api/v1/system/instances/{instance_id}")
}
pub fn admin_instance_identity(instance_id: &str) -> String {
    format!("/api/v1/system/instances/{instance_id}/identity")
}
pub fn admin_drain(instance_id: &str) -> String {
    format!("/api/v1/system/instances/{instance_id}/drain")
}
pub fn admin_terminate(instance_id: &str) -> String {
    format!("/api/v1/system/instances/{instance_id}/terminate")
}
pub fn admin_drift(instance_id: &str) -> String {
    format!("/api/v1/system/instances/{instance_id}/drift")
}
pub fn admin_task(task_id: &str) -> String {
    format!("/api/v1/system/tasks/{task_id}")
}
pub fn admin_cancel_task(task_id: &str) -> String {
    format!("/api/v1/system/tasks/{task_id}/cancel")
}
pub fn admin_reboot(instance_id: &str) -> String {
    format!("/api/v1/system/instances/{instance_id}/reboot")
}
pub fn admin_collect_diagnostics(instance_id: &str) -> String {
    format!("/api/v1/system/instances/{instance_id}/collect_diagnostics")
}
pub fn admin_module_update(instance_id: &str) -> String {
    format!("/api/v1/system/instances/{instance_id}/module_update")
}
/// `?lookback_hours=N`
pub fn admin_attribute_failure(instance_id: &str) -> String {
    format!("/api/v1/system/instances/{instance_id}/attribute_failure")
}
