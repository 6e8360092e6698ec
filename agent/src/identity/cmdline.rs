//! Identity from the kernel command line.
//!
//! Two forms:
//! - `powernode.identity=<base64url JSON>`: the whole document.
//! - `powernode.<field>=<value>` pairs, one per document field. Values that cannot
//!   sit on a command line (PEM, authorized_keys lines) come base64url-encoded under
//!   the field name plus `_b64`: `powernode.ca_pem_b64=...`. List fields take the
//!   singular name repeated (`powernode.module_trust_key_b64=` once per key,
//!   `powernode.dns=1.1.1.1,9.9.9.9`). A static network is `powernode.network=static`
//!   with `powernode.address=`, `powernode.gateway=`, `powernode.dns=`.
//!
//! `powernode.identity_source=<name>` pins one strategy (see [`read_pin`]).
//! Other `powernode.*` keys (the init's own, like a failure policy) are ignored here.
//! Quoting follows the kernel's `next_arg()`: a double quote toggles quoting, a
//! leading quote on the parameter or on the value is dropped with its closing mate.
//! A repeated single-valued key keeps the last value, as the kernel does.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use powernode_proto::IdentityDocument;
use serde_json::{Map, Value};

use super::{IdentitySource, ProbeFuture, SourceError, SourceErrorKind};

pub const DEFAULT_PATH: &str = powernode_sysfmt::cmdline::PATH;
const NAME: &str = "cmdline";
/// The kernel caps the command line far below this; anything bigger is not a
/// command line.
const MAX_CMDLINE_BYTES: usize = 256 * 1024;
const PREFIX: &str = "powernode.";

/// The pinned source name from `powernode.identity_source=`, if any (last wins).
pub fn parse_pin(cmdline: &str) -> Option<String> {
    powernode_sysfmt::cmdline::last_value(cmdline, "powernode.identity_source")
}

/// Reads the pin from a command line file; a missing file means no pin.
pub fn read_pin(path: &Path) -> Result<Option<String>, SourceError> {
    Ok(read(path)?.and_then(|text| parse_pin(&text)))
}

/// The command line's text; a missing file means none.
pub fn read_text(path: &Path) -> Result<Option<String>, SourceError> {
    read(path)
}

fn read(path: &Path) -> Result<Option<String>, SourceError> {
    let bytes = super::read_bounded(path, MAX_CMDLINE_BYTES)
        .map_err(|kind| SourceError::new(NAME, kind))?;
    Ok(bytes.map(|b| String::from_utf8_lossy(&b).into_owned()))
}

/// Fields set from a plain value.
const STRING_FIELDS: &[&str] = &[
    "control_plane_url",
    "bootstrap_token",
    "node_id",
    "instance_id",
    "hostname",
];
const NUMBER_FIELDS: &[&str] = &["version", "heartbeat_interval_seconds"];
const NETWORK_FIELDS: &[&str] = &["network", "address", "gateway", "dns"];

fn param_error(key: &str, reason: impl Into<String>) -> SourceError {
    SourceError::new(
        NAME,
        SourceErrorKind::Parameter {
            key: format!("{PREFIX}{key}"),
            reason: reason.into(),
        },
    )
}

/// Parses the identity out of a command line: `Ok(None)` when it carries none.
pub fn parse(cmdline: &str) -> Result<Option<IdentityDocument>, SourceError> {
    let mut whole: Option<String> = None;
    let mut obj = Map::new();
    let mut network = Map::new();
    let mut ssh_keys = Vec::new();
    let mut trust_keys = Vec::new();
    let mut pair_keys = Vec::new();

    for (param, value) in powernode_sysfmt::cmdline::split_params(cmdline) {
        let Some(key) = param.strip_prefix(PREFIX) else {
            continue;
        };
        if key == "identity_source" {
            continue;
        }
        if key == "identity" {
            whole = Some(value.ok_or_else(|| param_error(key, "has no value"))?);
            continue;
        }
        // `_b64` values are decoded first, then treated like the plain field.
        let (field, decoded) = match key.strip_suffix("_b64") {
            Some(field) => {
                let raw = value
                    .as_deref()
                    .ok_or_else(|| param_error(key, "has no value"))?;
                let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(raw.trim_end_matches('='))
                    .map_err(|_| param_error(key, "is not valid base64url"))?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| param_error(key, "does not decode to UTF-8 text"))?;
                (field, Some(text))
            }
            None => (key, value),
        };
        let is_known = STRING_FIELDS.contains(&field)
            || NUMBER_FIELDS.contains(&field)
            || NETWORK_FIELDS.contains(&field)
            || matches!(field, "ca_pem" | "ssh_authorized_key" | "module_trust_key");
        if !is_known {
            // Not an identity field: another component's parameter.
            tracing::debug!(param = %param, "ignoring non-identity powernode parameter");
            continue;
        }
        let value = decoded.ok_or_else(|| param_error(key, "has no value"))?;
        pair_keys.push(key.to_string());
        match field {
            f if STRING_FIELDS.contains(&f) || f == "ca_pem" => {
                obj.insert(f.to_string(), Value::String(value));
            }
            f if NUMBER_FIELDS.contains(&f) => {
                let n: u64 = value
                    .parse()
                    .map_err(|_| param_error(key, "is not a non-negative integer"))?;
                obj.insert(f.to_string(), Value::from(n));
            }
            "network" => match value.as_str() {
                "dhcp" | "static" => {
                    network.insert("mode".into(), Value::String(value));
                }
                _ => return Err(param_error(key, "must be `dhcp` or `static`")),
            },
            "address" | "gateway" => {
                network.insert(field.to_string(), Value::String(value));
            }
            "dns" => {
                let list = value
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| Value::String(s.to_string()))
                    .collect();
                network.insert("dns".into(), Value::Array(list));
            }
            "ssh_authorized_key" => ssh_keys.push(Value::String(value)),
            "module_trust_key" => trust_keys.push(Value::String(value)),
            _ => {}
        }
    }

    if let Some(encoded) = whole {
        if !pair_keys.is_empty() {
            return Err(param_error(
                "identity",
                format!(
                    "is given together with field parameters ({}); use one form",
                    pair_keys.join(", ")
                ),
            ));
        }
        return IdentityDocument::parse_base64url(&encoded)
            .map(Some)
            .map_err(|e| SourceError::new(NAME, SourceErrorKind::Document(e)));
    }
    if pair_keys.is_empty() {
        return Ok(None);
    }
    obj.entry("version")
        .or_insert(Value::from(powernode_proto::identity::IDENTITY_VERSION));
    if !network.is_empty() {
        let mode_static = network.contains_key("address") || network.contains_key("gateway");
        network.entry("mode").or_insert(Value::String(
            if mode_static { "static" } else { "dhcp" }.into(),
        ));
        obj.insert("network".into(), Value::Object(network));
    }
    if !ssh_keys.is_empty() {
        obj.insert("ssh_authorized_keys".into(), Value::Array(ssh_keys));
    }
    if !trust_keys.is_empty() {
        obj.insert("module_trust_keys".into(), Value::Array(trust_keys));
    }
    IdentityDocument::from_value(Value::Object(obj))
        .map(Some)
        .map_err(|e| SourceError::new(NAME, SourceErrorKind::Document(e)))
}

/// The command line source; the path is injectable (default `/proc/cmdline`).
#[derive(Debug, Clone)]
pub struct CmdlineSource {
    path: PathBuf,
}

impl CmdlineSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }
}

impl IdentitySource for CmdlineSource {
    fn name(&self) -> &'static str {
        NAME
    }

    fn probe(&self) -> ProbeFuture<'_> {
        Box::pin(async move {
            match read(&self.path)? {
                None => Ok(None),
                Some(text) => parse(&text),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use powernode_proto::{IdentityError, NetworkConfig};

    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    fn pairs() -> String {
        format!(
            "console=ttyS0 powernode.control_plane_url=https://10.0.2.2:8443 \
             powernode.ca_pem_b64={} powernode.bootstrap_token=tok powernode.node_id=node-1 \
             powernode.instance_id=inst-1 powernode.hostname=edge-1",
            b64(CA)
        )
    }

    fn field_of(err: SourceError) -> String {
        match err.kind {
            SourceErrorKind::Document(IdentityError::MissingField(f)) => f.to_string(),
            SourceErrorKind::Document(IdentityError::InvalidField { field, .. }) => field,
            SourceErrorKind::Parameter { key, .. } => key,
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn arbitrary_input_never_panics() {
        use powernode_sysfmt::testutil::{lines, CMDLINE_ALPHABET};
        for line in lines(CMDLINE_ALPHABET, 5000) {
            let _ = parse(&format!("powernode.{line}"));
            let _ = parse(&format!(
                "powernode.hostname={line} powernode.identity={line}"
            ));
        }
    }

    #[test]
    fn no_identity_is_absent() {
        assert_eq!(
            parse("console=ttyS0 quiet powernode.failure=poweroff").unwrap(),
            None
        );
        assert_eq!(parse("").unwrap(), None);
    }

    #[test]
    fn whole_document_in_base64url() {
        let doc = parse(&pairs()).unwrap().unwrap();
        let line = format!("quiet powernode.identity={} rw", doc.to_base64url());
        assert_eq!(parse(&line).unwrap(), Some(doc.clone()));
        // Quoted and padded still parse.
        let padded = format!("powernode.identity=\"{}==\"", doc.to_base64url());
        assert_eq!(parse(&padded).unwrap(), Some(doc));
    }

    #[test]
    fn pairs_build_a_document() {
        let line = format!(
            "{} powernode.heartbeat_interval_seconds=5 powernode.address=10.0.2.15/24 \
             powernode.gateway=10.0.2.2 powernode.dns=10.0.2.3,1.1.1.1 \
             powernode.ssh_authorized_key_b64={} powernode.hostname=edge-2",
            pairs(),
            b64("ssh-ed25519 AAAA test@x")
        );
        let doc = parse(&line).unwrap().unwrap();
        assert_eq!(doc.ca_pem, CA);
        assert_eq!(doc.hostname, "edge-2", "last value wins");
        assert_eq!(doc.heartbeat_interval_seconds, 5);
        assert_eq!(doc.ssh_authorized_keys, vec!["ssh-ed25519 AAAA test@x"]);
        assert_eq!(
            doc.network,
            NetworkConfig::Static {
                address: "10.0.2.15/24".into(),
                gateway: "10.0.2.2".into(),
                dns: vec!["10.0.2.3".into(), "1.1.1.1".into()],
            }
        );
    }

    #[test]
    fn pin_is_read_and_not_an_identity_field() {
        assert_eq!(
            parse_pin("a powernode.identity_source=fw_cfg b").as_deref(),
            Some("fw_cfg")
        );
        assert_eq!(parse_pin("quiet"), None);
        assert_eq!(parse("powernode.identity_source=cmdline").unwrap(), None);
    }

    #[test]
    fn bad_input_names_the_field() {
        let missing = pairs().replace("powernode.bootstrap_token=tok", "");
        assert_eq!(field_of(parse(&missing).unwrap_err()), "bootstrap_token");
        let bad_b64 = pairs() + " powernode.module_trust_key_b64=***";
        assert_eq!(
            field_of(parse(&bad_b64).unwrap_err()),
            "powernode.module_trust_key_b64"
        );
        let bad_num = pairs() + " powernode.heartbeat_interval_seconds=soon";
        assert_eq!(
            field_of(parse(&bad_num).unwrap_err()),
            "powernode.heartbeat_interval_seconds"
        );
        let zero = pairs() + " powernode.heartbeat_interval_seconds=0";
        assert_eq!(
            field_of(parse(&zero).unwrap_err()),
            "heartbeat_interval_seconds"
        );
        let no_value = pairs() + " powernode.node_id";
        assert_eq!(field_of(parse(&no_value).unwrap_err()), "powernode.node_id");
        let bad_net = pairs() + " powernode.network=carrier-pigeon";
        assert_eq!(field_of(parse(&bad_net).unwrap_err()), "powernode.network");
        let truncated = "powernode.identity=eyJ2ZXJzaW9uIjox";
        assert!(matches!(
            parse(truncated).unwrap_err().kind,
            SourceErrorKind::Document(IdentityError::Json { .. })
        ));
        assert!(matches!(
            parse("powernode.identity=@@@").unwrap_err().kind,
            SourceErrorKind::Document(IdentityError::Base64)
        ));
        let both = format!("{} powernode.identity=abc", pairs());
        assert_eq!(field_of(parse(&both).unwrap_err()), "powernode.identity");
        let version = pairs() + " powernode.version=2";
        assert!(matches!(
            parse(&version).unwrap_err().kind,
            SourceErrorKind::Document(IdentityError::UnsupportedVersion(2))
        ));
    }

    #[test]
    fn source_reads_the_injected_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cmdline");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let src = CmdlineSource::new(&path);
        assert_eq!(rt.block_on(src.probe()).unwrap(), None, "missing file");
        std::fs::write(&path, pairs() + "\n").unwrap();
        let doc = rt.block_on(src.probe()).unwrap().unwrap();
        assert_eq!(doc.instance_id, "inst-1");
        std::fs::write(&path, vec![b'x'; MAX_CMDLINE_BYTES + 1]).unwrap();
        assert!(matches!(
            rt.block_on(src.probe()).unwrap_err().kind,
            SourceErrorKind::TooLarge { .. }
        ));
    }
}
