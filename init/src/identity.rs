//! The init's own identity probe for the local sources, in the design's order:
//! `powernode.identity=` on the command line, then the fw_cfg entry. A missing source
//! is `Ok(None)`; a present but broken one is an error naming the source, never
//! skipped. Cloud metadata needs the network, so it comes later ([`crate::cloud`]):
//! a pin naming a cloud source skips both local sources.

use powernode_proto::identity::{IdentityDocument, IdentityError, MAX_IDENTITY_BYTES};
use powernode_proto::node::ProviderFacts;

use crate::cmdline;
use crate::sys::{Errno, Sys};

/// sysfs folder of the fw_cfg entry (after `qemu_fw_cfg` is loaded).
pub const FW_CFG_ENTRY: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/org.powernode/identity";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityProbeError {
    #[error("{source_name}: cannot read {path}")]
    Read {
        source_name: &'static str,
        path: String,
        #[source]
        errno: Errno,
    },
    #[error("fw_cfg: entry size {0:?} is not a number")]
    BadSize(String),
    #[error("fw_cfg: entry is {size} bytes, more than the {max} allowed")]
    TooLarge { size: usize, max: usize },
    #[error("fw_cfg: read {got} bytes of an entry of {size}")]
    Short { got: usize, size: usize },
    #[error("powernode.identity_source={0} is not a known source (cmdline, fw_cfg, or a cloud: {clouds})", clouds = powernode_agent::identity::cloud::NAMES.join(", "))]
    UnknownPin(String),
    #[error("cloud metadata source `{strategy}` is present but unusable: {message}")]
    Cloud {
        strategy: &'static str,
        message: String,
    },
    #[error("{source_name}: bad identity document")]
    Document {
        source_name: &'static str,
        #[source]
        error: IdentityError,
    },
}

/// A found identity and which source gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub source: &'static str,
    pub document: IdentityDocument,
    /// What a cloud's metadata said about the machine (cloud sources only).
    pub provider: Option<ProviderFacts>,
}

/// `powernode.identity=<base64url JSON>` on the command line.
pub fn from_cmdline(cmdline_text: &str) -> Result<Option<Found>, IdentityProbeError> {
    for word in cmdline::words(cmdline_text) {
        if let Some(value) = word.strip_prefix("powernode.identity=") {
            let document = IdentityDocument::parse_base64url(value).map_err(|error| {
                IdentityProbeError::Document {
                    source_name: "cmdline",
                    error,
                }
            })?;
            return Ok(Some(Found {
                source: "cmdline",
                document,
                provider: None,
            }));
        }
    }
    Ok(None)
}

/// The fw_cfg entry: `size` first, then `raw` in one read of exactly that size.
pub fn from_fw_cfg(sys: &mut dyn Sys) -> Result<Option<Found>, IdentityProbeError> {
    let size_path = format!("{FW_CFG_ENTRY}/size");
    let size_text = match sys.read_file(&size_path, 64) {
        Ok(t) => t,
        Err(Errno::NOENT) => return Ok(None),
        Err(errno) => {
            return Err(IdentityProbeError::Read {
                source_name: "fw_cfg",
                path: size_path,
                errno,
            })
        }
    };
    let size_text = String::from_utf8_lossy(&size_text).trim().to_string();
    let size: usize = size_text
        .parse()
        .map_err(|_| IdentityProbeError::BadSize(size_text.clone()))?;
    if size > MAX_IDENTITY_BYTES {
        return Err(IdentityProbeError::TooLarge {
            size,
            max: MAX_IDENTITY_BYTES,
        });
    }
    let raw_path = format!("{FW_CFG_ENTRY}/raw");
    let raw = sys
        .read_file(&raw_path, size)
        .map_err(|errno| IdentityProbeError::Read {
            source_name: "fw_cfg",
            path: raw_path,
            errno,
        })?;
    if raw.len() != size {
        return Err(IdentityProbeError::Short {
            got: raw.len(),
            size,
        });
    }
    let document = IdentityDocument::parse(&raw).map_err(|error| IdentityProbeError::Document {
        source_name: "fw_cfg",
        error,
    })?;
    Ok(Some(Found {
        source: "fw_cfg",
        document,
        provider: None,
    }))
}

/// `powernode.identity_source=NAME`, if given.
pub fn pinned_source(cmdline_text: &str) -> Option<String> {
    cmdline::words(cmdline_text)
        .into_iter()
        .filter_map(|w| {
            w.strip_prefix("powernode.identity_source=")
                .map(str::to_string)
        })
        .next_back()
}

/// A name the cloud probe answers to (`aws`, `url`, ...).
pub fn is_cloud_source(name: &str) -> bool {
    powernode_agent::identity::cloud::NAMES.contains(&name)
}

/// Command line first, then fw_cfg; `powernode.identity_source=` pins one of them
/// and skips the other, or pins a cloud source and skips both (`Ok(None)`: the
/// cloud phase asks after DHCP).
pub fn probe(sys: &mut dyn Sys, cmdline_text: &str) -> Result<Option<Found>, IdentityProbeError> {
    match pinned_source(cmdline_text).as_deref() {
        None | Some("auto") => {}
        Some("cmdline") => return from_cmdline(cmdline_text),
        Some("fw_cfg") => return from_fw_cfg(sys),
        Some(cloud) if is_cloud_source(cloud) => return Ok(None),
        Some(other) => return Err(IdentityProbeError::UnknownPin(other.to_string())),
    }
    if let Some(found) = from_cmdline(cmdline_text)? {
        return Ok(Some(found));
    }
    from_fw_cfg(sys)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sys::fake::FakeSys;

    pub(crate) fn doc_json() -> String {
        serde_json::json!({
            "version": 1,
            "control_plane_url": "https://10.0.2.2:8443",
            "ca_pem": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            "bootstrap_token": "tok-123",
            "node_id": "node-1",
            "instance_id": "inst-1",
            "hostname": "edge-1"
        })
        .to_string()
    }

    pub(crate) fn with_fw_cfg(sys: FakeSys, body: &str) -> FakeSys {
        sys.with_file(&format!("{FW_CFG_ENTRY}/size"), format!("{}\n", body.len()))
            .with_file(&format!("{FW_CFG_ENTRY}/raw"), body)
    }

    #[test]
    fn fw_cfg_reads_size_then_raw() {
        let json = doc_json();
        let mut sys = with_fw_cfg(FakeSys::default(), &json);
        let found = probe(&mut sys, "console=ttyS0").unwrap().unwrap();
        assert_eq!(found.source, "fw_cfg");
        assert_eq!(found.document.instance_id, "inst-1");
        let reads: Vec<_> = sys
            .calls
            .iter()
            .filter_map(|c| match c {
                crate::sys::fake::Call::Read(p) => Some(p.rsplit('/').next().unwrap().to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(reads, ["size", "raw"]);
    }

    #[test]
    fn absent_everywhere_is_none() {
        let mut sys = FakeSys::default();
        assert_eq!(probe(&mut sys, "console=ttyS0").unwrap(), None);
    }

    #[test]
    fn broken_entries_are_errors_naming_the_source_and_field() {
        let mut sys = with_fw_cfg(
            FakeSys::default(),
            &doc_json().replace("\"node_id\"", "\"nodeid\""),
        );
        let err = probe(&mut sys, "").unwrap_err();
        let IdentityProbeError::Document { source_name, error } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(*source_name, "fw_cfg");
        assert!(error.to_string().contains("node_id"), "{error}");

        let mut sys = FakeSys::default()
            .with_file(&format!("{FW_CFG_ENTRY}/size"), "999999\n")
            .with_file(&format!("{FW_CFG_ENTRY}/raw"), "x");
        assert!(matches!(
            probe(&mut sys, ""),
            Err(IdentityProbeError::TooLarge { .. })
        ));

        let mut sys = FakeSys::default()
            .with_file(&format!("{FW_CFG_ENTRY}/size"), "10\n")
            .with_file(&format!("{FW_CFG_ENTRY}/raw"), "{}");
        assert!(matches!(
            probe(&mut sys, ""),
            Err(IdentityProbeError::Short { got: 2, size: 10 })
        ));

        let mut sys = FakeSys::default();
        let err = probe(&mut sys, "powernode.identity=!!!").unwrap_err();
        assert!(matches!(
            err,
            IdentityProbeError::Document {
                source_name: "cmdline",
                ..
            }
        ));
    }

    #[test]
    fn a_pin_skips_the_other_source() {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(doc_json());
        let mut sys = with_fw_cfg(FakeSys::default(), &doc_json());
        let found = probe(
            &mut sys,
            &format!("powernode.identity={b64} powernode.identity_source=fw_cfg"),
        )
        .unwrap()
        .unwrap();
        assert_eq!(found.source, "fw_cfg");
        let mut sys = with_fw_cfg(FakeSys::default(), &doc_json());
        assert_eq!(
            probe(&mut sys, "powernode.identity_source=cmdline").unwrap(),
            None
        );
        assert!(sys.calls.is_empty());
        assert_eq!(
            probe(&mut sys, "powernode.identity_source=nonesuch").unwrap_err(),
            IdentityProbeError::UnknownPin("nonesuch".into())
        );
        // A cloud pin skips both local sources: the cloud phase asks after DHCP.
        assert_eq!(
            probe(&mut sys, "powernode.identity_source=aws").unwrap(),
            None
        );
        assert!(sys.calls.is_empty());
    }

    #[test]
    fn cmdline_wins_over_fw_cfg() {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(doc_json().replace("inst-1", "inst-cmdline"));
        let mut sys = with_fw_cfg(FakeSys::default(), &doc_json());
        let found = probe(&mut sys, &format!("quiet powernode.identity={b64}"))
            .unwrap()
            .unwrap();
        assert_eq!(
            (found.source, found.document.instance_id.as_str()),
            ("cmdline", "inst-cmdline")
        );
        assert!(sys.calls.is_empty(), "fw_cfg not touched");
    }
}
