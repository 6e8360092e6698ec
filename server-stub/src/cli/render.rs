//! How answers are shown: the API's JSON as a readable table, get-instance with its
//! boot reports, attribute-failure's candidates; and the one writer to stdout.

use serde_json::Value;

/// Writes a command's answer to stdout; an error (a closed pipe) is returned, never
/// a panic as `print!` would.
pub fn write_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// A readable rendering of an API answer: `key  value` lines for objects, one row
/// per item for lists.
pub fn render_table(v: &Value) -> String {
    let mut out = String::new();
    match v {
        Value::Object(map) => {
            for (k, val) in map {
                match val {
                    Value::Object(inner) => {
                        out.push_str(&format!("{k}:\n"));
                        let width = inner.keys().map(String::len).max().unwrap_or(0);
                        for (ik, iv) in inner {
                            out.push_str(&format!("  {ik:width$}  {}\n", scalar(iv)));
                        }
                    }
                    Value::Array(items)
                        if items.iter().all(Value::is_object) && !items.is_empty() =>
                    {
                        out.push_str(&format!("{k}:\n"));
                        out.push_str(&rows(items));
                    }
                    other => out.push_str(&format!("{k}  {}\n", scalar(other))),
                }
            }
        }
        other => out.push_str(&format!("{}\n", scalar(other))),
    }
    out
}

/// get-instance as a table, with the node's boot reports (failures before
/// enrollment) written out underneath: code, message, recovery and console lines.
pub fn render_instance(mut v: Value) -> String {
    let reports = v
        .get_mut("instance")
        .and_then(Value::as_object_mut)
        .and_then(|i| i.remove("boot_reports"))
        .and_then(|r| match r {
            Value::Array(items) => Some(items),
            _ => None,
        })
        .unwrap_or_default();
    let mut out = render_table(&v);
    if reports.is_empty() {
        return out;
    }
    out.push_str("boot reports (before enrollment, newest last):\n");
    for r in &reports {
        out.push_str(&format!(
            "  {}  phase {}  code {}  attempt {}{}\n    message   {}\n    recovery  {}\n",
            scalar(&r["at"]),
            scalar(&r["phase"]),
            scalar(&r["code"]),
            scalar(&r["attempt"]),
            if r["truncated"] == true {
                "  (truncated)"
            } else {
                ""
            },
            scalar(&r["message"]),
            scalar(&r["recovery"]),
        ));
        let lines = r["console"].as_array().cloned().unwrap_or_default();
        if !lines.is_empty() {
            out.push_str("    console:\n");
            for l in &lines {
                out.push_str(&format!("      | {}\n", scalar(l)));
            }
        }
    }
    out
}

/// attribute-failure as a table: the failure, then one row per candidate with its
/// reasoning in full underneath (it is the point of the command).
pub fn render_attribution(v: &Value) -> String {
    let f = &v["failure"];
    let mut out = format!(
        "instance {}: {} at {} (source {}{}{})\nwindow: {} h back to {}\n",
        scalar(&v["instance_id"]),
        scalar(&f["status"]),
        scalar(&f["at"]),
        scalar(&f["source"]),
        f["code"]
            .as_str()
            .map(|c| format!(", code {c}"))
            .unwrap_or_default(),
        f["message"]
            .as_str()
            .map(|m| format!(": {m}"))
            .unwrap_or_default(),
        scalar(&v["lookback_hours"]),
        scalar(&v["window_start"]),
    );
    let cands = v["candidates"].as_array().cloned().unwrap_or_default();
    if cands.is_empty() {
        out.push_str("no module or version change in the window\n");
        return out;
    }
    out.push_str(&format!(
        "{:>4} {:>5}  {:<25} {:<21} {:>7}  {:<8} MODULE\n",
        "RANK", "SCORE", "CHANGE", "AT", "MIN", "KIND"
    ));
    for c in &cands {
        out.push_str(&format!(
            "{:>4} {:>5}  {:<25} {:<21} {:>7}  {:<8} {}{}\n      {}\n",
            scalar(&c["rank"]),
            scalar(&c["score"]),
            scalar(&c["change"]),
            scalar(&c["at"]),
            scalar(&c["minutes_before_failure"]),
            c["kind"].as_str().unwrap_or("-"),
            c["module"].as_str().unwrap_or("-"),
            c["version"]
                .as_str()
                .map(|v| format!(" {v}"))
                .unwrap_or_default(),
            scalar(&c["reasoning"]),
        ));
    }
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

fn rows(items: &[Value]) -> String {
    let cols: Vec<String> = items
        .first()
        .and_then(Value::as_object)
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    let cells: Vec<Vec<String>> = items
        .iter()
        .map(|it| {
            cols.iter()
                .map(|c| {
                    let s = scalar(it.get(c).unwrap_or(&Value::Null));
                    if s.len() > 60 {
                        format!(
                            "{}...",
                            &s[..s.char_indices().nth(57).map(|(i, _)| i).unwrap_or(s.len())]
                        )
                    } else {
                        s
                    }
                })
                .collect()
        })
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let line = |vals: &[String]| {
        let mut l = String::from(" ");
        for (i, v) in vals.iter().enumerate() {
            l.push_str(&format!(" {:w$}", v, w = widths[i]));
        }
        l.trim_end().to_string() + "\n"
    };
    out.push_str(&line(
        &cols.iter().map(|c| c.to_uppercase()).collect::<Vec<_>>(),
    ));
    for r in &cells {
        out.push_str(&line(r));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_render_objects_and_lists() {
        let t = render_table(&json!({"node": {"id": "node-1", "status": "no_instance"}}));
        assert!(t.contains("node:"));
        assert!(t.contains("status  no_instance"));
        let t = render_table(&json!({"signals": [{"id": 1, "kind": "instance.silent"}]}));
        assert!(t.contains("KIND"));
        assert!(t.contains("instance.silent"));
    }

    #[test]
    fn get_instance_prints_boot_reports_under_the_table() {
        let v = json!({"instance": {"id": "inst-1", "status": "provisioning",
            "boot_reports": [{"at": "2026-12-07T11:55:22Z", "phase": "enrolled",
                "code": "bootstrap_token_used", "message": "bootstrap: refused", "attempt": 1,
                "console": ["[ 6053ms] powernode-init INFO: starting"],
                "recovery": "provision-instance node-1", "truncated": false}]}});
        let t = render_instance(v);
        println!("{t}");
        assert!(t.contains("status  provisioning"));
        assert!(!t.contains("\"boot_reports\""), "not as a JSON blob: {t}");
        for want in [
            "boot reports (before enrollment, newest last):",
            "code bootstrap_token_used",
            "message   bootstrap: refused",
            "recovery  provision-instance node-1",
            "      | [ 6053ms] powernode-init INFO: starting",
        ] {
            assert!(t.contains(want), "{want:?} in:\n{t}");
        }
    }
}
