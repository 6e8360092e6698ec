//! Provider quota: a provision over `--quota-instances-per-region` waits in `pending`
//! (saying which limit, with a `provider_quota_exceeded` event and, past the pending
//! threshold, a stuck row naming it) and starts once an instance in its region ends;
//! a cancelled waiting provision never reaches the provider.

mod common;

use std::time::{Duration, Instant};

use common::TestServer;
use powernode_proto::paths;
use reqwest::Method;
use serde_json::{json, Value};

async fn instance(ts: &TestServer, id: &str) -> Value {
    ts.ok(Method::GET, &paths::admin_instance(id), None).await["instance"].clone()
}

async fn wait_status(ts: &TestServer, id: &str, status: &str) -> Value {
    let t = Instant::now();
    loop {
        let i = instance(ts, id).await;
        if i["status"] == status {
            return i;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "never {status}: {i}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_quota_waits_pending_and_starts_when_an_instance_ends() {
    let ts = TestServer::start_with(|cfg| {
        cfg.quota_instances_per_region = 2;
        cfg.stuck.pending = 1;
    })
    .await;
    let c = ts
        .ok(
            Method::POST,
            paths::ADMIN_CLUSTERS,
            Some(json!({"count": 4, "hostname_prefix": "q"})),
        )
        .await;
    assert!(c["error"].is_null(), "{c}");
    let ids: Vec<String> = c["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["instance_id"].as_str().unwrap().to_string())
        .collect();
    for id in &ids[..2] {
        wait_status(&ts, id, "provisioning").await;
    }
    for id in &ids[2..] {
        let i = instance(&ts, id).await;
        assert_eq!(i["status"], "pending", "{i}");
        assert!(
            i["waiting_for_quota"]
                .as_str()
                .is_some_and(|w| w.contains("instances_per_region: 2 of 2")),
            "{i}"
        );
    }
    let events = ts
        .ok(
            Method::GET,
            &format!("{}?limit=200", paths::ADMIN_EVENTS),
            None,
        )
        .await;
    let exceeded = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "provider_quota_exceeded")
        .count();
    assert_eq!(exceeded, 2, "once per waiting instance: {events}");

    // Past the pending threshold the stuck row names the quota and what to do.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let i = instance(&ts, &ids[2]).await;
    assert_eq!(i["stuck"]["reason"], "pending_provider_quota", "{i}");
    let recovery = i["stuck"]["recovery"].as_str().unwrap();
    assert!(
        recovery.contains("--quota-instances-per-region") && recovery.contains("cancel-task"),
        "{recovery}"
    );

    // The fourth is cancelled while waiting: it fails and never reaches the provider.
    let t4 = c["members"][3]["task_id"].as_str().unwrap();
    ts.ok(Method::POST, &paths::admin_cancel_task(t4), Some(json!({})))
        .await;
    wait_status(&ts, &ids[3], "failed").await;

    // One instance ends: the third starts.
    ts.ok(
        Method::POST,
        &paths::admin_terminate(&ids[0]),
        Some(json!({"force": true})),
    )
    .await;
    let i = wait_status(&ts, &ids[2], "provisioning").await;
    assert!(i["waiting_for_quota"].is_null(), "{i}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(instance(&ts, &ids[3]).await["status"], "failed");
}
