//! The JSON bodies the server parses from nodes and operators.
#![no_main]
use libfuzzer_sys::fuzz_target;
use powernode_proto::{admin, boot_report, node};

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<node::EnrollmentRequest>(data);
    let _ = serde_json::from_slice::<node::HandshakeRequest>(data);
    let _ = serde_json::from_slice::<node::HeartbeatRequest>(data);
    let _ = serde_json::from_slice::<node::RenewRequest>(data);
    let _ = serde_json::from_slice::<node::ReissueRequest>(data);
    let _ = serde_json::from_slice::<node::LeaseRequest>(data);
    let _ = serde_json::from_slice::<node::RenewLeaseRequest>(data);
    let _ = serde_json::from_slice::<node::CompleteTaskRequest>(data);
    let _ = serde_json::from_slice::<boot_report::BootReportRequest>(data);
    let _ = serde_json::from_slice::<admin::CreateNodeRequest>(data);
    let _ = serde_json::from_slice::<admin::ProvisionRequest>(data);
    let _ = serde_json::from_slice::<admin::DrainRequest>(data);
    let _ = serde_json::from_slice::<admin::RebootRequest>(data);
});
