//! `--wait [--timeout S]` of the long actions: follow the task the action started to
//! its end, showing its progress (one line rewritten in place on a terminal, a plain
//! line per change otherwise), and say how it ended.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use powernode_proto::paths;
use serde_json::Value;

use super::client::AdminClient;
use super::render::{render_table, write_out};

#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    /// Follow the task to its end; exit non-zero with its error when it fails.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up (exit non-zero, the task goes on) after this many seconds.
    #[arg(long, requires = "wait", value_name = "SECONDS", default_value_t = 600)]
    pub timeout: u64,
}

/// How often the task is read: well under the agent's own step times, and a few
/// cheap GETs a second at most.
const POLL: Duration = Duration::from_millis(200);

/// How a followed task ended.
#[derive(Debug)]
pub enum Waited {
    Succeeded(Value),
    /// Failed or cancelled: the task, with its result naming why.
    Ended(Value),
    /// Still not done after the timeout: the task as last read.
    TimedOut(Value),
}

/// One line about the task: kind, status, progress and time so far.
pub fn describe(task: &Value, elapsed: Duration) -> String {
    let mut line = format!(
        "task {} ({}): {}",
        task["id"].as_str().unwrap_or("?"),
        task["kind"].as_str().unwrap_or("?"),
        task["status"].as_str().unwrap_or("?"),
    );
    if let Some(p) = task["progress"].as_str().filter(|p| !p.is_empty()) {
        line.push_str(&format!(" - {p}"));
    }
    line.push_str(&format!(" [{:.1} s]", elapsed.as_secs_f64()));
    line
}

/// The reason a failed or cancelled task gives (its result's message and code).
pub fn failure_reason(task: &Value) -> String {
    let r = &task["result"];
    let code = r["code"].as_str().or_else(|| r["error"]["code"].as_str());
    let message = r["message"]
        .as_str()
        .or_else(|| r["error"]["message"].as_str())
        .or_else(|| r["error"].as_str());
    match (code, message) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (None, Some(m)) => m.to_string(),
        (Some(c), None) => c.to_string(),
        (None, None) if r.is_null() => "no reason recorded".to_string(),
        (None, None) => r.to_string(),
    }
}

/// Follows task `id` until it ends or `timeout` passes; progress goes to stderr.
pub async fn follow(client: &AdminClient, id: &str, timeout: Duration) -> anyhow::Result<Waited> {
    use std::io::{IsTerminal as _, Write as _};
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut last_shown = String::new();
    loop {
        let (status, text) = client
            .call(reqwest::Method::GET, &paths::admin_task(id), None)
            .await?;
        if !status.is_success() {
            anyhow::bail!("reading task {id}: {status} {}", text.trim_end());
        }
        let v: Value = serde_json::from_str(&text).context("server answered non-JSON")?;
        let task = v.get("task").cloned().unwrap_or(v);
        let elapsed = started.elapsed();
        let line = describe(&task, elapsed);
        let state = (task["status"].clone(), task["progress"].clone());
        let key = format!("{state:?}");
        let mut err = std::io::stderr().lock();
        if tty {
            // Rewritten in place: the clock moves even when nothing else does.
            let _ = write!(err, "\r\x1b[2K{line}");
        } else if key != last_shown {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
        last_shown = key;
        let done = match task["status"].as_str() {
            Some("succeeded") => Some(Waited::Succeeded(task.clone())),
            Some("failed" | "cancelled") => Some(Waited::Ended(task.clone())),
            _ if elapsed >= timeout => Some(Waited::TimedOut(task.clone())),
            _ => None,
        };
        if let Some(done) = done {
            if tty {
                let _ = writeln!(err);
            }
            return Ok(done);
        }
        drop(err);
        tokio::time::sleep(POLL).await;
    }
}

/// provision-cluster's answer: the members (and with --wait their tasks' ends); exit
/// 1 when the call stopped early or a member's task did not succeed.
pub async fn finish_cluster(
    client: &AdminClient,
    mut answer: Value,
    wait: &WaitArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut ok = answer["error"].is_null();
    if wait.wait {
        let timeout = std::time::Duration::from_secs(wait.timeout);
        let started = std::time::Instant::now();
        if let Some(members) = answer["members"].as_array_mut() {
            for m in members {
                let Some(task_id) = m["task_id"].as_str().map(str::to_string) else {
                    continue;
                };
                // One budget for the whole cluster.
                let left = timeout.saturating_sub(started.elapsed());
                let task = match follow(client, &task_id, left).await? {
                    Waited::Succeeded(t) => t,
                    Waited::Ended(t) | Waited::TimedOut(t) => {
                        ok = false;
                        t
                    }
                };
                m["task_status"] = task["status"].clone();
            }
        }
    }
    if json {
        write_out(&format!("{answer}\n"))?;
    } else {
        write_out(&render_table(&answer))?;
    }
    if let Some(e) = answer["error"].as_object() {
        eprintln!(
            "powernode-stub: provision-cluster stopped at {}: {}: {} (the members listed were made)",
            e.get("hostname").and_then(Value::as_str).unwrap_or("?"),
            e.get("code").and_then(Value::as_str).unwrap_or("?"),
            e.get("message").and_then(Value::as_str).unwrap_or("?"),
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// After a long action answered: follow its task; print the task as it ended (JSON
/// or a table) and fail with its reason when it did not succeed.
pub async fn finish_waiting(
    client: &AdminClient,
    answer: &Value,
    wait: &WaitArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let task_id = answer["task_id"]
        .as_str()
        .context("the answer names no task_id to wait for")?;
    let waited = follow(
        client,
        task_id,
        std::time::Duration::from_secs(wait.timeout),
    )
    .await?;
    let (task, ok) = match &waited {
        Waited::Succeeded(t) => (t, true),
        Waited::Ended(t) | Waited::TimedOut(t) => (t, false),
    };
    if json {
        write_out(&format!("{}\n", serde_json::json!({"task": task})))?;
    } else {
        write_out(&render_table(&serde_json::json!({"task": task})))?;
    }
    match waited {
        Waited::Succeeded(_) => {}
        Waited::Ended(t) => eprintln!(
            "powernode-stub: task {task_id} {}: {}",
            t["status"].as_str().unwrap_or("ended"),
            failure_reason(&t)
        ),
        Waited::TimedOut(t) => eprintln!(
            "powernode-stub: task {task_id} still {} after {} s (it goes on; follow it with get-task {task_id})",
            t["status"].as_str().unwrap_or("?"),
            wait.timeout
        ),
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lines_and_reasons() {
        let t = json!({"id": "task-1", "kind": "drain", "status": "running",
                       "progress": "stopping services"});
        assert_eq!(
            describe(&t, Duration::from_millis(1500)),
            "task task-1 (drain): running - stopping services [1.5 s]"
        );
        let failed = json!({"status": "failed",
                            "result": {"code": "signature_mismatch", "message": "no key"}});
        assert_eq!(failure_reason(&failed), "signature_mismatch: no key");
        let nested = json!({"result": {"error": {"code": "x", "message": "y"}}});
        assert_eq!(failure_reason(&nested), "x: y");
        assert_eq!(failure_reason(&json!({})), "no reason recorded");
        assert_eq!(
            failure_reason(&json!({"result": {"other": 1}})),
            r#"{"other":1}"#
        );
    }
}
