//! `--wait [--timeout S]` of the long actions: follow the task the action started to
//! its end, showing its progress (one line rewritten in place on a terminal, a plain
//! line per change otherwise), and say how it ended.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use powernode_proto::paths;
use serde_json::Value;

use super::client::AdminClient;

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
