//! The init's own identity probe for the local sources, in the design's order:
//! `powernode.identity=` on the command line, then the fw_cfg entry. A missing source
//! is `Ok(None)`; a present but broken one is an error naming the source, never
//! skipped. Cloud metadata needs the network, so it comes later ([`crate::cloud`]):
//! a pin naming a cloud source skips both local sources.

use powernode_agent::identity::cmdline as identity_cmdline;
use powernode_agent::identity::SourceErrorKind;
use powernode_proto::identity::{IdentityDocument, IdentityError, MAX_IDENTITY_BYTES};
use powernode_proto::node::ProviderFacts;
use powernode_sysfmt::fw_cfg;

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
    #[error("fw_cfg: bad entry size")]
    Size(#[from] fw_cfg::SizeError),
    #[error("fw_cfg: read {got} bytes of an entry of {size}")]
    Short { got: usize, size: usize },
    #[error("powernode.identity_source={0} is not a known source (cmdline, fw_cfg, or a cloud: {clouds})", clouds = powernode_agent::identity::cloud::NAMES.join(", "))]
    UnknownPin(String),
    #[error("cloud metadata source `{strategy}` is present but unusable: {message}")]
    Cloud {
        strategy: &'static str,
        message: String,
        /// Where the failure can be reported (salvaged from a broken document).
        report_to: Option<Box<powernode_proto::boot_report::ReportTarget>>,
    },
    #[error("cmdline: parameter `{key}` {reason}")]
    Parameter { key: String, reason: String },
    #[error("{source_name}: bad identity document")]
    Document {
        source_name: &'static str,
        #[source]
        error: IdentityError,
    },
}

pub use crate::layout::BUILTIN_TRUST_KEYS;
/// A PEM public key is a few hundred bytes.
const MAX_TRUST_KEY_BYTES: usize = 16 * 1024;

/// The module trust keys built into the initramfs; none when it has none.
pub fn builtin_trust_keys(sys: &mut dyn Sys) -> Result<Vec<String>, IdentityProbeError> {
    let read = |path: &str, errno| IdentityProbeError::Read {
        source_name: "initramfs trust keys",
        path: path.to_string(),
        errno,
    };
    let mut names = match sys.list_dir(BUILTIN_TRUST_KEYS) {
        Ok(n) => n,
        Err(Errno::NOENT) => return Ok(Vec::new()),
        Err(e) => return Err(read(BUILTIN_TRUST_KEYS, e)),
    };
    names.retain(|n| n.ends_with(".pem"));
    names.sort();
    names
        .iter()
        .map(|n| {
            let path = format!("{BUILTIN_TRUST_KEYS}/{n}");
            let bytes = sys
                .read_file(&path, MAX_TRUST_KEY_BYTES)
                .map_err(|e| read(&path, e))?;
            String::from_utf8(bytes).map_err(|_| read(&path, Errno::ILSEQ))
        })
        .collect()
}

/// Keys built into the initramfs are the node's pins: they replace the identity
/// document's (which the control plane wrote). Answers how many of the document's
/// keys were dropped for not being built in.
pub fn pin_builtin_keys(document: &mut IdentityDocument, builtin: Vec<String>) -> usize {
    if builtin.is_empty() {
        return 0;
    }
    let dropped = document
        .module_trust_keys
        .iter()
        .filter(|k| !builtin.contains(k))
        .count();
    document.module_trust_keys = builtin;
    dropped
}

/// A found identity and which source gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub source: &'static str,
    pub document: IdentityDocument,
    /// What a cloud's metadata said about the machine (cloud sources only).
    pub provider: Option<ProviderFacts>,
}

/// The identity on the command line, in either of the agent's forms
/// (`powernode.identity=<base64url JSON>` or `powernode.<field>=` pairs): the one
/// parser the agent also uses, so both read a command line the same way.
pub fn from_cmdline(cmdline_text: &str) -> Result<Option<Found>, IdentityProbeError> {
    let document = identity_cmdline::parse(cmdline_text).map_err(|e| match e.kind {
        SourceErrorKind::Document(error) => IdentityProbeError::Document {
            source_name: "cmdline",
            error,
        },
        SourceErrorKind::Parameter { key, reason } => IdentityProbeError::Parameter { key, reason },
        other => IdentityProbeError::Parameter {
            key: "powernode.identity".into(),
            reason: other.to_string(),
        },
    })?;
    Ok(document.map(|document| Found {
        source: "cmdline",
        document,
        provider: None,
    }))
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
    let size = fw_cfg::parse_size(&String::from_utf8_lossy(&size_text), MAX_IDENTITY_BYTES)?;
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

/// `powernode.identity_source=NAME`, if given (the last one, as the agent reads it).
pub fn pinned_source(cmdline_text: &str) -> Option<String> {
    identity_cmdline::parse_pin(cmdline_text)
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
            Err(IdentityProbeError::Size(fw_cfg::SizeError::TooLarge { .. }))
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

    /// The cases where the init's own command-line reader and the agent's disagreed.
    #[test]
    fn the_command_line_reads_as_the_agent_reads_it() {
        use base64::Engine as _;
        let b64 = |id: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(doc_json().replace("inst-1", id))
        };
        // A repeated whole document: the last one counts, as the kernel and the
        // agent have it (the init took the first).
        let mut sys = FakeSys::default();
        let line = format!(
            "powernode.identity={} powernode.identity={}",
            b64("a"),
            b64("b")
        );
        let found = probe(&mut sys, &line).unwrap().unwrap();
        assert_eq!(found.document.instance_id, "b");
        // Field pairs: the init skipped them and went on to fw_cfg.
        let ca = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n");
        let pairs = format!(
            "powernode.control_plane_url=https://10.0.2.2:8443 powernode.ca_pem_b64={ca} \
             powernode.bootstrap_token=tok powernode.node_id=n powernode.instance_id=pairs \
             powernode.hostname=h"
        );
        let mut sys = with_fw_cfg(FakeSys::default(), &doc_json());
        let found = probe(&mut sys, &pairs).unwrap().unwrap();
        assert_eq!(
            (found.source, found.document.instance_id.as_str()),
            ("cmdline", "pairs")
        );
        assert!(sys.calls.is_empty(), "fw_cfg not touched");
        // Pairs that are broken are an error naming the parameter, not a skip.
        let mut sys = with_fw_cfg(FakeSys::default(), &doc_json());
        let err = probe(&mut sys, "powernode.node_id=n powernode.version=x").unwrap_err();
        assert!(
            matches!(&err, IdentityProbeError::Parameter { key, .. } if key == "powernode.version"),
            "{err:?}"
        );
        // A quoted pin is the pin.
        let mut sys = with_fw_cfg(FakeSys::default(), &doc_json());
        let found = probe(&mut sys, "\"powernode.identity_source=fw_cfg\"")
            .unwrap()
            .unwrap();
        assert_eq!(found.source, "fw_cfg");
    }

    #[test]
    fn keys_built_into_the_initramfs_replace_the_documents() {
        let pem = |n: u8| format!("-----BEGIN PUBLIC KEY-----\nK{n}\n-----END PUBLIC KEY-----\n");
        // None built in: the document's keys stay.
        let mut sys = FakeSys::default();
        assert!(builtin_trust_keys(&mut sys).unwrap().is_empty());
        let mut doc: IdentityDocument = serde_json::from_str(&doc_json()).unwrap();
        doc.module_trust_keys = vec![pem(1), pem(9)];
        assert_eq!(pin_builtin_keys(&mut doc, Vec::new()), 0);
        assert_eq!(doc.module_trust_keys.len(), 2);

        let mut sys = FakeSys::default()
            .with_file(&format!("{BUILTIN_TRUST_KEYS}/b.pem"), pem(2))
            .with_file(&format!("{BUILTIN_TRUST_KEYS}/a.pem"), pem(1));
        sys.dirs.insert(
            BUILTIN_TRUST_KEYS.into(),
            vec!["b.pem".into(), "README".into(), "a.pem".into()],
        );
        let keys = builtin_trust_keys(&mut sys).unwrap();
        assert_eq!(keys, vec![pem(1), pem(2)]);
        // The document's key 9 is not built in: dropped.
        assert_eq!(pin_builtin_keys(&mut doc, keys), 1);
        assert_eq!(doc.module_trust_keys, vec![pem(1), pem(2)]);

        // Listed but unreadable: an error naming the file, not an empty pin set.
        let mut sys = FakeSys::default();
        sys.dirs
            .insert(BUILTIN_TRUST_KEYS.into(), vec!["gone.pem".into()]);
        let e = builtin_trust_keys(&mut sys).unwrap_err();
        assert!(e.to_string().contains("gone.pem"), "{e}");
    }

    #[test]
    fn the_fw_cfg_folder_is_sysfmt_s() {
        assert_eq!(
            FW_CFG_ENTRY,
            format!("{}/by_name/{}", fw_cfg::SYSFS_ROOT, fw_cfg::IDENTITY_ENTRY)
        );
    }
}
