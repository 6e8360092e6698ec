//! The identity document: everything a node learns before it has any credentials.
//!
//! Every identity strategy (command line, fw_cfg, file, cloud metadata) ends in
//! [`IdentityDocument::parse`], so a broken document is reported the same way wherever
//! it came from: the error names the field that is wrong.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The only document version this build understands.
pub const IDENTITY_VERSION: u32 = 1;
/// Upper bound on an encoded document; fw_cfg and metadata entries larger than this
/// are refused before they are read in full.
pub const MAX_IDENTITY_BYTES: usize = 64 * 1024;
/// Default heartbeat interval when the document does not set one.
pub const DEFAULT_HEARTBEAT_SECONDS: u64 = 30;

/// How the node configures its network before enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum NetworkConfig {
    #[default]
    Dhcp,
    Static {
        /// Address with prefix length, e.g. `10.0.2.15/24`.
        address: String,
        gateway: String,
        #[serde(default)]
        dns: Vec<String>,
    },
}

/// Identity document, version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityDocument {
    pub version: u32,
    /// Base URL of the control plane, e.g. `https://10.0.2.2:8443`.
    pub control_plane_url: String,
    /// PEM certificate(s) of the control plane's CA; the node pins these and trusts
    /// nothing else for the control plane.
    pub ca_pem: String,
    pub bootstrap_token: String,
    pub node_id: String,
    pub instance_id: String,
    pub hostname: String,
    #[serde(default)]
    pub network: NetworkConfig,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval_seconds: u64,
    /// Break-glass SSH keys (authorized_keys lines).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// PEM public keys that module signatures must verify against.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub module_trust_keys: Vec<String>,
}

fn default_heartbeat() -> u64 {
    DEFAULT_HEARTBEAT_SECONDS
}

/// Why a document was refused. Every variant names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("identity document is {size} bytes, more than the {max} allowed")]
    TooLarge { size: usize, max: usize },
    #[error("identity document is not valid JSON at line {line} column {column}: {reason}")]
    Json {
        line: usize,
        column: usize,
        reason: String,
    },
    #[error("identity document version {0} is not supported (this node reads version {IDENTITY_VERSION})")]
    UnsupportedVersion(u64),
    #[error("identity document lacks required field `{0}`")]
    MissingField(&'static str),
    #[error("identity document field `{field}` is invalid: {reason}")]
    InvalidField { field: String, reason: String },
    #[error("`powernode.identity` is not valid base64url")]
    Base64,
}

impl IdentityError {
    fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Self::InvalidField {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

impl IdentityDocument {
    /// Parses and validates a JSON document.
    pub fn parse(bytes: &[u8]) -> Result<Self, IdentityError> {
        if bytes.len() > MAX_IDENTITY_BYTES {
            return Err(IdentityError::TooLarge {
                size: bytes.len(),
                max: MAX_IDENTITY_BYTES,
            });
        }
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| IdentityError::Json {
                line: e.line(),
                column: e.column(),
                reason: e.to_string(),
            })?;
        Self::from_value(value)
    }

    /// Parses the value of `powernode.identity=` (base64url JSON, padding optional).
    pub fn parse_base64url(text: &str) -> Result<Self, IdentityError> {
        let text = text.trim();
        if text.len() > MAX_IDENTITY_BYTES * 4 / 3 + 4 {
            return Err(IdentityError::TooLarge {
                size: text.len() * 3 / 4,
                max: MAX_IDENTITY_BYTES,
            });
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text.trim_end_matches('='))
            .map_err(|_| IdentityError::Base64)?;
        Self::parse(&bytes)
    }

    /// Encodes the document for `powernode.identity=`.
    pub fn to_base64url(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    /// Validates a JSON value field by field, so the error names the first bad field
    /// rather than serde's position in the text.
    pub fn from_value(value: serde_json::Value) -> Result<Self, IdentityError> {
        let obj = value
            .as_object()
            .ok_or_else(|| IdentityError::invalid("(document)", "must be a JSON object"))?;
        let version = match obj.get("version") {
            None => return Err(IdentityError::MissingField("version")),
            Some(v) => v
                .as_u64()
                .ok_or_else(|| IdentityError::invalid("version", "must be an integer"))?,
        };
        if version != u64::from(IDENTITY_VERSION) {
            return Err(IdentityError::UnsupportedVersion(version));
        }
        let string = |name: &'static str| -> Result<String, IdentityError> {
            match obj.get(name) {
                None | Some(serde_json::Value::Null) => Err(IdentityError::MissingField(name)),
                Some(serde_json::Value::String(s)) if s.trim().is_empty() => {
                    Err(IdentityError::invalid(name, "must not be empty"))
                }
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(IdentityError::invalid(name, "must be a string")),
            }
        };
        let doc = IdentityDocument {
            version: IDENTITY_VERSION,
            control_plane_url: string("control_plane_url")?,
            ca_pem: string("ca_pem")?,
            bootstrap_token: string("bootstrap_token")?,
            node_id: string("node_id")?,
            instance_id: string("instance_id")?,
            hostname: string("hostname")?,
            network: match obj.get("network") {
                None | Some(serde_json::Value::Null) => NetworkConfig::Dhcp,
                Some(v) => serde_json::from_value(v.clone())
                    .map_err(|e| IdentityError::invalid("network", e.to_string()))?,
            },
            heartbeat_interval_seconds: match obj.get("heartbeat_interval_seconds") {
                None | Some(serde_json::Value::Null) => DEFAULT_HEARTBEAT_SECONDS,
                Some(v) => v.as_u64().ok_or_else(|| {
                    IdentityError::invalid(
                        "heartbeat_interval_seconds",
                        "must be a positive integer",
                    )
                })?,
            },
            ssh_authorized_keys: string_list(obj, "ssh_authorized_keys")?,
            module_trust_keys: string_list(obj, "module_trust_keys")?,
        };
        doc.validate()?;
        Ok(doc)
    }

    /// Checks the semantic rules on an already typed document.
    pub fn validate(&self) -> Result<(), IdentityError> {
        let url = self.control_plane_url.as_str();
        let rest = url.strip_prefix("https://").ok_or_else(|| {
            IdentityError::invalid("control_plane_url", "must be an https:// URL")
        })?;
        if rest.is_empty() || rest.starts_with('/') {
            return Err(IdentityError::invalid("control_plane_url", "has no host"));
        }
        if !self.ca_pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(IdentityError::invalid("ca_pem", "holds no PEM certificate"));
        }
        for (field, value) in [
            ("node_id", &self.node_id),
            ("instance_id", &self.instance_id),
            ("hostname", &self.hostname),
        ] {
            if value.len() > 253 {
                return Err(IdentityError::invalid(field, "is longer than 253 bytes"));
            }
            if !value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
            {
                return Err(IdentityError::invalid(
                    field,
                    "may hold only ASCII letters, digits, '-', '_' and '.'",
                ));
            }
        }
        if self.bootstrap_token.len() > 512 {
            return Err(IdentityError::invalid(
                "bootstrap_token",
                "is longer than 512 bytes",
            ));
        }
        if self.heartbeat_interval_seconds == 0 || self.heartbeat_interval_seconds > 3600 {
            return Err(IdentityError::invalid(
                "heartbeat_interval_seconds",
                "must be between 1 and 3600",
            ));
        }
        if let NetworkConfig::Static {
            address, gateway, ..
        } = &self.network
        {
            let (ip, prefix) = address.split_once('/').ok_or_else(|| {
                IdentityError::invalid("network.address", "must be ADDRESS/PREFIX")
            })?;
            ip.parse::<std::net::IpAddr>()
                .map_err(|_| IdentityError::invalid("network.address", "is not an IP address"))?;
            prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= 128)
                .ok_or_else(|| IdentityError::invalid("network.address", "bad prefix length"))?;
            gateway
                .parse::<std::net::IpAddr>()
                .map_err(|_| IdentityError::invalid("network.gateway", "is not an IP address"))?;
        }
        for (i, key) in self.module_trust_keys.iter().enumerate() {
            if !key.contains("-----BEGIN PUBLIC KEY-----") {
                return Err(IdentityError::invalid(
                    &format!("module_trust_keys[{i}]"),
                    "is not a PEM public key",
                ));
            }
        }
        Ok(())
    }
}

fn string_list(
    obj: &serde_json::Map<String, serde_json::Value>,
    name: &'static str,
) -> Result<Vec<String>, IdentityError> {
    match obj.get(name) {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    IdentityError::invalid(&format!("{name}[{i}]"), "must be a string")
                })
            })
            .collect(),
        Some(_) => Err(IdentityError::invalid(name, "must be a list of strings")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn good() -> serde_json::Value {
        serde_json::json!({
            "version": 1,
            "control_plane_url": "https://10.0.2.2:8443",
            "ca_pem": CA,
            "bootstrap_token": "tok",
            "node_id": "node-1",
            "instance_id": "inst-1",
            "hostname": "edge-1",
        })
    }

    #[test]
    fn good_document_parses_with_defaults() {
        let doc = IdentityDocument::parse(good().to_string().as_bytes()).unwrap();
        assert_eq!(doc.network, NetworkConfig::Dhcp);
        assert_eq!(doc.heartbeat_interval_seconds, 30);
        let again = IdentityDocument::parse_base64url(&doc.to_base64url()).unwrap();
        assert_eq!(again, doc);
    }

    #[test]
    fn errors_name_the_field() {
        let mut v = good();
        v.as_object_mut().unwrap().remove("bootstrap_token");
        assert_eq!(
            IdentityDocument::from_value(v).unwrap_err(),
            IdentityError::MissingField("bootstrap_token")
        );
        let mut v = good();
        v["version"] = 7.into();
        assert_eq!(
            IdentityDocument::from_value(v).unwrap_err(),
            IdentityError::UnsupportedVersion(7)
        );
        let mut v = good();
        v["control_plane_url"] = "http://x".into();
        assert!(matches!(
            IdentityDocument::from_value(v).unwrap_err(),
            IdentityError::InvalidField { field, .. } if field == "control_plane_url"
        ));
        let mut v = good();
        v["hostname"] = "bad host".into();
        assert!(matches!(
            IdentityDocument::from_value(v).unwrap_err(),
            IdentityError::InvalidField { field, .. } if field == "hostname"
        ));
        let mut v = good();
        v["network"] =
            serde_json::json!({"mode":"static","address":"10.0.0.5","gateway":"10.0.0.1"});
        assert!(matches!(
            IdentityDocument::from_value(v).unwrap_err(),
            IdentityError::InvalidField { field, .. } if field == "network.address"
        ));
    }

    #[test]
    fn truncated_and_oversized_input_is_refused() {
        let text = good().to_string();
        let cut = &text.as_bytes()[..text.len() / 2];
        assert!(matches!(
            IdentityDocument::parse(cut).unwrap_err(),
            IdentityError::Json { .. }
        ));
        let huge = vec![b' '; MAX_IDENTITY_BYTES + 1];
        assert!(matches!(
            IdentityDocument::parse(&huge).unwrap_err(),
            IdentityError::TooLarge { .. }
        ));
        assert_eq!(
            IdentityDocument::parse_base64url("!!!").unwrap_err(),
            IdentityError::Base64
        );
    }
}
