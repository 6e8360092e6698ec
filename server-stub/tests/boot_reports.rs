//! Boot reports: a node that fails before it has credentials posts what happened
//! with its bootstrap token; the report is kept on the instance, shown by
//! get-instance and as a `bootstrap.reported` signal with the recovery step, and
//! never spends the token.

mod common;

use common::process::{cli, ServerProc};
use common::{FakeNode, TestServer};
use powernode_proto::IdentityDocument;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// The route, spelled out so these tests say what the wire is.
const BOOT_REPORT: &str = "/api/v1/system/node_api/boot_report";

fn report(doc: &IdentityDocument, code: &str, message: &str, console: &[&str]) -> Value {
    json!({
        "bootstrap_token": doc.bootstrap_token,
        "instance_id": doc.instance_id,
        "phase": "enrolled",
        "code": code,
        "message": message,
        "attempt": 1,
        "console": console,
        "agent_version": "test-0.1",
    })
}

async fn instance(ts: &TestServer, inst: &str) -> Value {
    ts.ok(
        Method::GET,
        &powernode_proto::paths::admin_instance(inst),
        None,
    )
    .await["instance"]
        .clone()
}

async fn signals(ts: &TestServer, inst: &str) -> Vec<Value> {
    ts.ok(
        Method::GET,
        &format!(
            "{}?instance_id={inst}",
            powernode_proto::paths::ADMIN_SIGNALS
        ),
        None,
    )
    .await["signals"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boot_report_is_stored_shown_and_does_not_spend_the_token() {
    let ts = TestServer::start().await;
    let (_, inst, doc) = ts.provisioned("edge-r").await;
    let mut fake = FakeNode::new(doc.clone(), &ts.url());
    let (s, v) = fake
        .post(
            BOOT_REPORT,
            report(
                &doc,
                "network",
                "bootstrap: enrollment failed: connection refused",
                &[
                    "[ 812ms] powernode-init INFO: network up",
                    "dhcp: lease 10.0.2.15",
                ],
            ),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["recorded"], true);
    assert!(
        v["recovery"]
            .as_str()
            .unwrap()
            .contains("control-plane URL"),
        "{v}"
    );

    let i = instance(&ts, &inst).await;
    let r = &i["boot_reports"][0];
    assert_eq!(r["code"], "network", "{i}");
    assert_eq!(r["phase"], "enrolled");
    assert_eq!(
        r["message"],
        "bootstrap: enrollment failed: connection refused"
    );
    assert_eq!(r["console"][1], "dhcp: lease 10.0.2.15");
    assert_eq!(r["truncated"], false);
    assert!(r["recovery"].as_str().unwrap().contains("reachab"), "{r}");
    assert_eq!(i["status"], "provisioning", "a report changes no state");

    let sig = signals(&ts, &inst).await;
    let s0 = sig
        .iter()
        .find(|s| s["kind"] == "bootstrap.reported")
        .unwrap_or_else(|| panic!("no bootstrap.reported signal: {sig:?}"));
    assert_eq!(s0["active"], true);
    assert_eq!(s0["detail"]["code"], "network");
    assert!(s0["detail"]["recovery"]
        .as_str()
        .unwrap()
        .contains("reachab"));

    // The token still enrolls; once it did, the sensor pass clears the signal.
    fake.enroll().await;
    assert_eq!(instance(&ts, &inst).await["status"], "bootstrapping");
    ts.state().sense().await.unwrap();
    let sig = signals(&ts, &inst).await;
    let s0 = sig
        .iter()
        .find(|s| s["kind"] == "bootstrap.reported")
        .unwrap();
    assert_eq!(s0["active"], false, "{s0}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_token_may_report_its_refusal_with_the_recovery_for_it() {
    let ts = TestServer::start().await;
    let (node, inst, doc) = ts.provisioned("edge-u").await;
    let mut fake = FakeNode::new(doc.clone(), &ts.url());
    fake.enroll().await;
    let second = FakeNode::new(doc.clone(), &ts.url());
    let (s, v) = second
        .post(
            BOOT_REPORT,
            report(
                &doc,
                "bootstrap_token_used",
                "enrollment refused: bootstrap token was already used",
                &[],
            ),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let i = instance(&ts, &inst).await;
    let recovery = i["boot_reports"][0]["recovery"].as_str().unwrap();
    assert!(
        recovery.contains("provision-instance") && recovery.contains(&node),
        "{recovery}"
    );
    assert!(
        recovery.contains(&format!("terminate-instance {inst}")),
        "{recovery}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_token_is_refused_and_nothing_is_stored() {
    let ts = TestServer::start().await;
    let (_, inst, doc) = ts.provisioned("edge-x").await;
    let fake = FakeNode::new(doc.clone(), &ts.url());
    let mut body = report(&doc, "network", "m", &[]);
    body["bootstrap_token"] = json!("not-a-token");
    let (s, v) = fake.post(BOOT_REPORT, body).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("bootstrap_token_invalid")),
        "{v}"
    );
    // A real token naming another instance is refused too.
    let mut body = report(&doc, "network", "m", &[]);
    body["instance_id"] = json!("inst-someone-else");
    let (s, v) = fake.post(BOOT_REPORT, body).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let i = instance(&ts, &inst).await;
    assert!(i.get("boot_reports").is_none(), "{i}");
    let sig = signals(&ts, &inst).await;
    assert!(!sig.iter().any(|s| s["kind"] == "bootstrap.reported"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_of_a_terminated_instance_is_refused() {
    let ts = TestServer::start().await;
    let (_, inst, doc) = ts.provisioned("edge-t").await;
    ts.ok(
        Method::POST,
        &powernode_proto::paths::admin_terminate(&inst),
        Some(json!({"force": true})),
    )
    .await;
    let fake = FakeNode::new(doc.clone(), &ts.url());
    let (s, v) = fake
        .post(BOOT_REPORT, report(&doc, "network", "m", &[]))
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("instance_terminated")),
        "{v}"
    );
    assert!(instance(&ts, &inst).await.get("boot_reports").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_fields_are_cut_to_the_rule_and_marked() {
    let ts = TestServer::start().await;
    let (_, inst, doc) = ts.provisioned("edge-o").await;
    let fake = FakeNode::new(doc.clone(), &ts.url());
    let lines: Vec<String> = (0..200)
        .map(|i| format!("{i:03} {}", "z".repeat(400)))
        .collect();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let (s, v) = fake
        .post(
            BOOT_REPORT,
            report(&doc, "internal", &"m".repeat(10_000), &lines),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let r = instance(&ts, &inst).await["boot_reports"][0].clone();
    assert_eq!(r["truncated"], true);
    assert_eq!(r["message"].as_str().unwrap().len(), 2048);
    let console = r["console"].as_array().unwrap();
    assert_eq!(console.len(), 50, "the newest 50 lines");
    assert!(console[0].as_str().unwrap().starts_with("150 "));
    assert!(console[49].as_str().unwrap().starts_with("199 "));
    assert!(console.iter().all(|l| l.as_str().unwrap().len() <= 256));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_rate_limited_per_token_and_only_the_last_three_are_kept() {
    let ts = TestServer::start().await;
    let (_, inst, doc) = ts.provisioned("edge-l").await;
    let fake = FakeNode::new(doc.clone(), &ts.url());
    for n in 0..6 {
        let (s, v) = fake
            .post(
                BOOT_REPORT,
                report(&doc, "network", &format!("try {n}"), &[]),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "report {n}: {v}");
    }
    let (s, v) = fake
        .post(BOOT_REPORT, report(&doc, "network", "try 6", &[]))
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited")),
        "{v}"
    );
    let i = instance(&ts, &inst).await;
    let kept: Vec<&str> = i["boot_reports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["message"].as_str().unwrap())
        .collect();
    assert_eq!(
        kept,
        ["try 3", "try 4", "try 5"],
        "oldest first, newest three"
    );
    let reported = signals(&ts, &inst)
        .await
        .into_iter()
        .filter(|s| s["kind"] == "bootstrap.reported")
        .collect::<Vec<_>>();
    assert_eq!(reported.len(), 6);
    assert_eq!(
        reported.iter().filter(|s| s["active"] == true).count(),
        1,
        "a new report replaces the active one"
    );
    // The window passes: accepted again.
    ts.clock.advance_secs(61);
    let (s, v) = fake
        .post(BOOT_REPORT, report(&doc, "network", "try 7", &[]))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

/// Through the binary and its CLI, as an operator sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_instance_and_recent_signals_show_the_report_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _server = ServerProc::start(dir);
    let run = |args: &[&str]| {
        let (ok, out, err) = cli(dir, args);
        assert!(ok, "{args:?}: {err}");
        out
    };
    let n: Value = serde_json::from_str(&run(&[
        "create-node",
        "--hostname",
        "cli-r",
        "--lifecycle-class",
        "ephemeral",
        "--json",
    ]))
    .unwrap();
    let node = n["node"]["id"].as_str().unwrap().to_string();
    let p: Value = serde_json::from_str(&run(&["provision-instance", &node, "--json"])).unwrap();
    let inst = p["instance"]["id"].as_str().unwrap().to_string();
    let id: Value = serde_json::from_str(&run(&["instance-identity", &inst, "--json"])).unwrap();
    let doc = IdentityDocument::from_value(id).unwrap();
    let url = std::fs::read_to_string(dir.join("server-url")).unwrap();
    let fake = FakeNode::new(doc.clone(), url.trim());
    let (s, v) = fake
        .post(
            BOOT_REPORT,
            report(
                &doc,
                "identity_invalid",
                "cloud_identity: identity document field `hostname` is invalid",
                &["powernode-init: probing cloud metadata"],
            ),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");

    let i: Value = serde_json::from_str(&run(&["get-instance", &inst, "--json"])).unwrap();
    assert_eq!(i["instance"]["boot_reports"][0]["code"], "identity_invalid");
    let table = run(&["get-instance", &inst]);
    for want in [
        "boot report",
        "identity_invalid",
        "field `hostname` is invalid",
        "probing cloud metadata",
        "identity document",
    ] {
        assert!(table.contains(want), "{want:?} missing from:\n{table}");
    }
    let sig = run(&["recent-signals", "--instance", &inst]);
    assert!(sig.contains("bootstrap.reported"), "{sig}");
    let sig: Value =
        serde_json::from_str(&run(&["recent-signals", "--instance", &inst, "--json"])).unwrap();
    let s0 = &sig["signals"][0];
    assert_eq!(s0["kind"], "bootstrap.reported");
    assert!(
        s0["detail"]["recovery"]
            .as_str()
            .unwrap()
            .contains("identity document"),
        "{s0}"
    );
}
