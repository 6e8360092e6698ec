//! cosign's simple-signing payload, the one definition both sides use: the publisher
//! writes it ([`simple_signing_payload`]), the server checks a publication's
//! signature with it before recording it, and the node checks it before it trusts a
//! module. Checking in one place keeps the server from recording a signature the
//! node would refuse (or the other way round).
//!
//! The payload binds more than the manifest digest: its `docker-reference` names the
//! repository (compared by path, without the registry host: mirrors and the node's
//! view of the host differ) and its annotations (`cosign sign -a
//! org.powernode.module.name=NAME -a org.powernode.module.version=VERSION`) the module
//! and version.
//!
//! It must never accept a payload that names another manifest, repository, module or
//! version than asked for. Whether a trusted key signed it is the caller's check.

use powernode_proto::node::{MODULE_NAME_ANNOTATION, MODULE_VERSION_ANNOTATION};
use serde::Deserialize;

/// `critical.type` of a cosign image signature.
pub const COSIGN_SIGNATURE_TYPE: &str = "cosign container image signature";

/// cosign's payload for `cosign sign -a MODULE_NAME=name -a MODULE_VERSION=version`,
/// byte for byte: Go's `encoding/json` writes map keys sorted and so does
/// `serde_json` (no `preserve_order`); names and versions are OCI tag characters,
/// which Go escapes no differently.
pub fn simple_signing_payload(
    docker_reference: &str,
    digest: &str,
    name: &str,
    version: &str,
) -> Vec<u8> {
    let v = serde_json::json!({
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": digest},
            "type": COSIGN_SIGNATURE_TYPE,
        },
        "optional": {
            MODULE_NAME_ANNOTATION: name,
            MODULE_VERSION_ANNOTATION: version,
        },
    });
    serde_json::to_vec(&v).expect("JSON values serialize")
}

#[derive(Deserialize)]
struct SimpleSigning {
    critical: Critical,
    /// cosign's `-a KEY=VALUE` annotations.
    #[serde(default)]
    optional: Option<serde_json::Map<String, serde_json::Value>>,
}
#[derive(Deserialize)]
struct Critical {
    identity: Option<Identity>,
    image: Image,
    #[serde(rename = "type")]
    kind: String,
}
#[derive(Deserialize)]
struct Identity {
    #[serde(rename = "docker-reference")]
    docker_reference: Option<String>,
}
#[derive(Deserialize)]
struct Image {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

/// What the control plane asked for (or a publication claims), which the signed
/// payload must name too: without it a valid signature of module A, or of an older
/// version of B, would stand in for the version of B asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected<'a> {
    /// The repository path, without the registry host.
    pub repository: &'a str,
    /// `org.powernode.module.name` in the payload's annotations.
    pub name: &'a str,
    /// `org.powernode.module.version` in the payload's annotations.
    pub version: &'a str,
}

/// Why a payload does not stand for what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload: {0}")]
    NotPayload(String),
    #[error("payload type {0:?}")]
    Type(String),
    #[error("payload annotation {key} is not a string: {value}")]
    Annotation { key: String, value: String },
    #[error("payload signs digest {found}, not {expected}")]
    Digest { found: String, expected: String },
    #[error("payload signs repository {found:?}, not {expected:?}")]
    Repository { found: String, expected: String },
    #[error("payload signs {key}={found:?}, not {expected:?}")]
    Field {
        key: &'static str,
        found: String,
        expected: String,
    },
    #[error("payload has no {key} annotation (sign with -a {key}={expected})")]
    Missing { key: &'static str, expected: String },
}

/// A parsed simple-signing payload (not yet known to be signed by anyone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedPayload {
    pub digest: String,
    pub docker_reference: Option<String>,
    pub name: Option<String>,
    pub version: Option<String>,
}

/// Parses a simple-signing payload: cosign's container image signature type, the
/// digest it signs, its reference and the module annotations (strings only).
pub fn parse_payload(payload: &[u8]) -> Result<SignedPayload, PayloadError> {
    let p: SimpleSigning =
        serde_json::from_slice(payload).map_err(|e| PayloadError::NotPayload(e.to_string()))?;
    if p.critical.kind != COSIGN_SIGNATURE_TYPE {
        return Err(PayloadError::Type(p.critical.kind));
    }
    let annotation = |key: &str| -> Result<Option<String>, PayloadError> {
        match p.optional.as_ref().and_then(|o| o.get(key)) {
            None => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(PayloadError::Annotation {
                key: key.to_string(),
                value: other.to_string(),
            }),
        }
    };
    Ok(SignedPayload {
        name: annotation(MODULE_NAME_ANNOTATION)?,
        version: annotation(MODULE_VERSION_ANNOTATION)?,
        digest: p.critical.image.docker_manifest_digest,
        docker_reference: p.critical.identity.and_then(|i| i.docker_reference),
    })
}

/// The repository path of a docker reference: without its registry host (a first
/// component with `.` or `:`, or `localhost`, as docker's reference grammar has it)
/// and without a tag or digest.
pub fn reference_path(reference: &str) -> &str {
    let path = match reference.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            rest
        }
        _ => reference,
    };
    let path = path.split_once('@').map_or(path, |(p, _)| p);
    match path.rsplit_once(':') {
        // A colon after the last slash starts a tag.
        Some((p, tag)) if !tag.contains('/') => p,
        _ => path,
    }
}

impl SignedPayload {
    /// `Ok(())` when the payload names `digest` and, with `expected`, that module's
    /// repository, name and version; otherwise what differs.
    pub fn check(&self, digest: &str, expected: Option<&Expected<'_>>) -> Result<(), PayloadError> {
        if !self.digest.eq_ignore_ascii_case(digest) {
            return Err(PayloadError::Digest {
                found: self.digest.clone(),
                expected: digest.to_string(),
            });
        }
        let Some(want) = expected else {
            return Ok(());
        };
        let reference = self.docker_reference.as_deref().unwrap_or("");
        if reference_path(reference) != want.repository {
            return Err(PayloadError::Repository {
                found: reference.to_string(),
                expected: want.repository.to_string(),
            });
        }
        let field = |got: &Option<String>, key: &'static str, want: &str| match got {
            Some(g) if g == want => Ok(()),
            Some(g) => Err(PayloadError::Field {
                key,
                found: g.clone(),
                expected: want.to_string(),
            }),
            None => Err(PayloadError::Missing {
                key,
                expected: want.to_string(),
            }),
        };
        field(&self.name, MODULE_NAME_ANNOTATION, want.name)?;
        field(&self.version, MODULE_VERSION_ANNOTATION, want.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_publisher_writes_the_checker_accepts() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let p = simple_signing_payload("10.0.2.2:8443/modules/base", &d, "base", "2");
        let want = Expected {
            repository: "modules/base",
            name: "base",
            version: "2",
        };
        parse_payload(&p).unwrap().check(&d, Some(&want)).unwrap();
        let e = parse_payload(&p)
            .unwrap()
            .check(
                &d,
                Some(&Expected {
                    version: "3",
                    ..want
                }),
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"payload signs org.powernode.module.version="2", not "3""#
        );
    }

    #[test]
    fn reference_paths() {
        assert_eq!(reference_path("10.0.2.2:8443/modules/base"), "modules/base");
        assert_eq!(reference_path("localhost/a/b"), "a/b");
        assert_eq!(reference_path("reg.example/a"), "a");
        assert_eq!(reference_path("library/busybox"), "library/busybox");
        assert_eq!(reference_path("h:5000/a/b:v1"), "a/b");
        assert_eq!(reference_path("h:5000/a/b@sha256:aa"), "a/b");
        assert_eq!(reference_path(""), "");
    }
}
