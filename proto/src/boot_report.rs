//! Boot reports: a failure the node hits before it has credentials (the network,
//! enrollment refused, a broken identity document), sent with the bootstrap token to
//! [`crate::paths::BOOT_REPORT`]. A report never spends the token: enrollment
//! afterwards works as before. The server keeps the last few on the instance and
//! shows them in `get-instance` and as a `bootstrap.reported` signal with the
//! recovery step for the code.
//!
//! The size rule lives here so node and server apply the same one: the message is
//! cut to [`MAX_MESSAGE_BYTES`], the console to its last [`MAX_CONSOLE_LINES`] lines
//! of at most [`MAX_LINE_BYTES`] each (cut at a character boundary); whatever was
//! cut sets `truncated`.

use serde::{Deserialize, Serialize};

use crate::identity::MAX_IDENTITY_BYTES;
use crate::node::Phase;
use crate::{ErrorCode, IdentityDocument, Timestamp};

/// Longest message kept, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 2048;
/// Console lines kept (the newest).
pub const MAX_CONSOLE_LINES: usize = 50;
/// Longest console line kept, in bytes.
pub const MAX_LINE_BYTES: usize = 256;
/// Reports the server keeps per instance (the newest).
pub const KEPT_PER_INSTANCE: usize = 3;
/// Reports the server accepts per token in [`RATE_WINDOW_SECONDS`]; more are
/// answered `429 rate_limited` and not stored.
pub const RATE_LIMIT: u32 = 6;
pub const RATE_WINDOW_SECONDS: u64 = 60;

/// `POST` [`crate::paths::BOOT_REPORT`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootReportRequest {
    pub bootstrap_token: String,
    /// Must be the token's instance.
    pub instance_id: String,
    /// The phase the node was trying to reach.
    pub phase: Phase,
    pub code: ErrorCode,
    pub message: String,
    /// How many times the node has tried so far.
    #[serde(default)]
    pub attempt: u32,
    /// The node's last console lines, oldest first.
    #[serde(default)]
    pub console: Vec<String>,
    #[serde(default)]
    pub agent_version: String,
}

/// The answer: what the server recorded and the recovery it shows the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootReportResponse {
    pub recorded: bool,
    pub recovery: String,
}

/// A boot report as the server keeps and shows it (`boot_reports` of an instance).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootReport {
    /// When the server received it.
    pub at: Timestamp,
    pub phase: Phase,
    pub code: ErrorCode,
    pub message: String,
    #[serde(default)]
    pub attempt: u32,
    #[serde(default)]
    pub console: Vec<String>,
    /// What the operator should do about `code`.
    pub recovery: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_version: String,
    /// Something was cut to the size rule (see the module doc).
    #[serde(default)]
    pub truncated: bool,
}

/// Where a boot report goes and what authenticates it. From a valid identity
/// document, or salvaged from one that failed validation in another field (a cloud's
/// user data with a broken `hostname` still names the control plane and the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportTarget {
    pub control_plane_url: String,
    pub ca_pem: String,
    pub bootstrap_token: String,
    pub instance_id: String,
}

impl From<&IdentityDocument> for ReportTarget {
    fn from(d: &IdentityDocument) -> Self {
        Self {
            control_plane_url: d.control_plane_url.clone(),
            ca_pem: d.ca_pem.clone(),
            bootstrap_token: d.bootstrap_token.clone(),
            instance_id: d.instance_id.clone(),
        }
    }
}

impl ReportTarget {
    /// The four fields a report needs from a JSON identity document, when each is
    /// usable on its own (an `https://` URL with a host, a PEM certificate, a token
    /// and an instance id that are non-empty strings); `None` otherwise.
    pub fn salvage(bytes: &[u8]) -> Option<Self> {
        if bytes.len() > MAX_IDENTITY_BYTES {
            return None;
        }
        let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        let text = |name: &str| {
            value
                .get(name)
                .and_then(serde_json::Value::as_str)
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let target = Self {
            control_plane_url: text("control_plane_url")?,
            ca_pem: text("ca_pem")?,
            bootstrap_token: text("bootstrap_token")?,
            instance_id: text("instance_id")?,
        };
        let host = target.control_plane_url.strip_prefix("https://")?;
        (!host.is_empty()
            && !host.starts_with('/')
            && target.ca_pem.contains("-----BEGIN CERTIFICATE-----"))
        .then_some(target)
    }
}

/// `text` cut to at most `max` bytes at a character boundary; `true` when cut.
pub fn cut(text: &str, max: usize) -> (&str, bool) {
    if text.len() <= max {
        return (text, false);
    }
    let mut end = max;
    while end > 0 && !text.is_char_boundary(end) {
        end -= 1;
    }
    (text.get(..end).unwrap_or_default(), true)
}

impl BootReportRequest {
    /// The request within the size rule; `true` when something was cut.
    pub fn bounded(mut self) -> (Self, bool) {
        let (message, mut truncated) = cut(&self.message, MAX_MESSAGE_BYTES);
        self.message = message.to_string();
        let (version, cut_version) = cut(&self.agent_version, 64);
        self.agent_version = version.to_string();
        truncated |= cut_version;
        let (lines, cut_lines) = bound_lines(&self.console);
        self.console = lines;
        (self, truncated || cut_lines)
    }
}

/// The last [`MAX_CONSOLE_LINES`] of `lines`, each within [`MAX_LINE_BYTES`];
/// `true` when anything was dropped or cut.
pub fn bound_lines(lines: &[String]) -> (Vec<String>, bool) {
    let skip = lines.len().saturating_sub(MAX_CONSOLE_LINES);
    let mut truncated = skip > 0;
    let kept = lines
        .iter()
        .skip(skip)
        .map(|l| {
            let (l, c) = cut(l, MAX_LINE_BYTES);
            truncated |= c;
            l.to_string()
        })
        .collect();
    (kept, truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(message: String, console: Vec<String>) -> BootReportRequest {
        BootReportRequest {
            bootstrap_token: "t".into(),
            instance_id: "inst-1".into(),
            phase: Phase::Enrolled,
            code: ErrorCode::Network,
            message,
            attempt: 1,
            console,
            agent_version: "v".into(),
        }
    }

    #[test]
    fn a_target_is_salvaged_only_when_its_own_fields_are_usable() {
        let pem = "-----BEGIN CERTIFICATE-----\nAA\n-----END CERTIFICATE-----";
        let doc = serde_json::json!({"version": 1, "control_plane_url": "https://cp:8443",
            "ca_pem": pem, "bootstrap_token": "tok", "instance_id": "inst-1",
            "hostname": "bad host name!"});
        let t = ReportTarget::salvage(doc.to_string().as_bytes()).expect("salvaged");
        assert_eq!(
            (t.control_plane_url.as_str(), t.bootstrap_token.as_str()),
            ("https://cp:8443", "tok")
        );
        for (field, bad) in [
            ("control_plane_url", serde_json::json!("http://cp")),
            ("ca_pem", serde_json::json!("not pem")),
            ("bootstrap_token", serde_json::json!("")),
            ("instance_id", serde_json::json!(7)),
        ] {
            let mut d = doc.clone();
            d[field] = bad;
            assert_eq!(
                ReportTarget::salvage(d.to_string().as_bytes()),
                None,
                "{field}"
            );
        }
        assert_eq!(ReportTarget::salvage(b"{not json"), None);
    }

    #[test]
    fn the_size_rule_keeps_the_newest_lines_and_cuts_at_character_boundaries() {
        let lines: Vec<String> = (0..80).map(|i| format!("line {i}")).collect();
        let (r, truncated) = req("é".repeat(MAX_MESSAGE_BYTES), lines).bounded();
        assert!(truncated);
        assert!(r.message.len() <= MAX_MESSAGE_BYTES);
        assert!(r.message.chars().all(|c| c == 'é'));
        assert_eq!(r.console.len(), MAX_CONSOLE_LINES);
        assert_eq!(r.console.first().map(String::as_str), Some("line 30"));
        assert_eq!(r.console.last().map(String::as_str), Some("line 79"));
        let (r, truncated) = req("x".repeat(10), vec!["y".repeat(MAX_LINE_BYTES + 1)]).bounded();
        assert!(truncated);
        assert_eq!(r.console[0].len(), MAX_LINE_BYTES);
        let (r, truncated) = req("short".into(), vec!["a".into()]).bounded();
        assert!(!truncated);
        assert_eq!((r.message.as_str(), r.console.len()), ("short", 1));
    }
}
