//! Microsoft Azure: the Instance Metadata Service at 169.254.169.254, every
//! request with `Metadata: true` and an `api-version` (without the header IMDS
//! answers 400). The document is the VM's `userData`
//! (`/metadata/instance/compute/userData?format=text`, base64; empty when unset).
//! The facts come from `/metadata/instance`: `compute.vmId`, `compute.location`
//! and the interfaces' private and public IPv4 and IPv6 addresses.
//!
//! `customData` is not served by IMDS: it travels in the provisioning ISO's
//! `ovf-env.xml`. When that file is given ([`Azure::with_ovf_env`]) and `userData`
//! is empty, its `CustomData` (base64) is read instead.

use std::path::PathBuf;

use super::http::{Fetcher, MAX_METADATA_BYTES};
use super::metadata::{optional_list, Addresses, BaseUrl};
use super::{CloudFuture, CloudProvider, Dmi, ProviderFacts, SourceError};

pub const NAME: &str = "azure";
pub const DEFAULT_BASE: &str = "http://169.254.169.254";
/// The API version asked for; 2021-02-01 is the first with `userData`.
pub const API_VERSION: &str = "2021-02-01";
/// The asset tag Azure sets on every VM's chassis.
const ASSET_TAG: &str = "7783-7084-3265-9085-8269-3286-77";
const HEADERS: [(&str, &str); 1] = [("Metadata", "true")];

#[derive(Debug, Clone)]
pub struct Azure {
    base: BaseUrl,
    ovf_env: Option<PathBuf>,
}

impl Default for Azure {
    fn default() -> Self {
        Self::new(DEFAULT_BASE)
    }
}

impl Azure {
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            base: BaseUrl::new(base),
            ovf_env: None,
        }
    }

    /// Where the provisioning ISO's `ovf-env.xml` is mounted, for `customData`.
    pub fn with_ovf_env(mut self, path: impl Into<PathBuf>) -> Self {
        self.ovf_env = Some(path.into());
        self
    }

    async fn read(
        &self,
        http: &Fetcher,
    ) -> Result<Option<(powernode_proto::IdentityDocument, ProviderFacts)>, SourceError> {
        // The instance document first: it proves this is Azure and holds the facts.
        let url = self
            .base
            .join(&format!("metadata/instance?api-version={API_VERSION}"));
        let Some(bytes) = http.get(&url, &HEADERS, MAX_METADATA_BYTES).await? else {
            return Ok(None);
        };
        let instance = super::parse_json(http, "instance", &bytes)?;
        let facts = facts(http, &instance)?;

        let url = self.base.join(&format!(
            "metadata/instance/compute/userData?api-version={API_VERSION}&format=text"
        ));
        let encoded = http
            .get(
                &url,
                &HEADERS,
                powernode_proto::identity::MAX_IDENTITY_BYTES * 4 / 3 + 4,
            )
            .await?
            .unwrap_or_default();
        let encoded = String::from_utf8(encoded)
            .map_err(|_| http.field_error("compute.userData", "is not base64 text"))?;
        let mut raw = super::decode_base64(http, "compute.userData", &encoded)?;
        if raw.iter().all(u8::is_ascii_whitespace) {
            raw = match &self.ovf_env {
                Some(path) => custom_data(http, path)?.unwrap_or_default(),
                None => Vec::new(),
            };
        }
        Ok(super::parse_user_data(NAME, &raw)?.map(|doc| (doc, facts)))
    }
}

fn facts(http: &Fetcher, instance: &serde_json::Value) -> Result<ProviderFacts, SourceError> {
    let compute = match instance.get("compute") {
        Some(c @ serde_json::Value::Object(_)) => c,
        _ => return Err(http.field_error("instance.compute", "is missing or not an object")),
    };
    let vm_id = super::json_str(http, "compute", compute, "vmId")?
        .ok_or_else(|| http.field_error("compute.vmId", "is missing"))?;
    let location = super::json_str(http, "compute", compute, "location")?;
    let mut addresses = Addresses::new(http);
    let interfaces = instance.get("network").and_then(|n| n.get("interface"));
    for (at, nic) in optional_list(http, "network.interface", interfaces)? {
        for family in ["ipv4", "ipv6"] {
            let at = format!("{at}.{family}.ipAddress");
            let ips = nic.get(family).and_then(|f| f.get("ipAddress"));
            for (at, ip) in optional_list(http, &at, ips)? {
                for key in ["privateIpAddress", "publicIpAddress"] {
                    addresses.member(&at, ip, key)?;
                }
            }
        }
    }
    Ok(addresses.facts(NAME, vm_id, location))
}

/// `CustomData` from an `ovf-env.xml` (base64 text inside
/// `<ns1:CustomData>...</ns1:CustomData>`, any namespace prefix). `None` when the
/// file or the element is missing.
fn custom_data(http: &Fetcher, path: &std::path::Path) -> Result<Option<Vec<u8>>, SourceError> {
    let Some(bytes) =
        crate::identity::read_bounded(path, 1024 * 1024).map_err(|kind| http.error(kind))?
    else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&bytes);
    let Some(body) = element_text(&text, "CustomData") else {
        return Ok(None);
    };
    super::decode_base64(http, "ovf-env.xml CustomData", body).map(Some)
}

/// The text of the first `<prefix:name>` / `<name>` element; enough XML for the
/// one flat element read here.
fn element_text<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let mut rest = xml;
    while let Some(open) = rest.find('<') {
        rest = &rest[open + 1..];
        let end = rest.find('>')?;
        let tag = &rest[..end];
        let local = tag.split_whitespace().next()?.rsplit(':').next()?;
        if local == name && !tag.ends_with('/') {
            let body = &rest[end + 1..];
            let close = body.find("</")?;
            return Some(&body[..close]);
        }
        rest = &rest[end + 1..];
    }
    None
}

impl CloudProvider for Azure {
    fn name(&self) -> &'static str {
        NAME
    }

    fn detect(&self, dmi: &Dmi) -> bool {
        dmi.chassis_asset_tag == ASSET_TAG
    }

    fn fetch<'a>(&'a self, http: &'a Fetcher) -> CloudFuture<'a> {
        Box::pin(self.read(http))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ovf_env_custom_data() {
        let xml = r#"<?xml version="1.0"?><ns0:Environment xmlns:ns0="x"><ns1:ProvisioningSection>
            <ns1:HostName>vm</ns1:HostName><ns1:CustomData>eyJhIjoxfQ==</ns1:CustomData>
            </ns1:ProvisioningSection></ns0:Environment>"#;
        assert_eq!(element_text(xml, "CustomData"), Some("eyJhIjoxfQ=="));
        assert_eq!(element_text(xml, "HostName"), Some("vm"));
        assert_eq!(element_text(xml, "Missing"), None);
        assert_eq!(element_text("<CustomData/>", "CustomData"), None);
        assert_eq!(element_text("<a", "a"), None);
    }

    #[test]
    fn detection() {
        let dmi = Dmi {
            chassis_asset_tag: ASSET_TAG.into(),
            ..Default::default()
        };
        assert!(Azure::default().detect(&dmi));
        assert!(!Azure::default().detect(&Dmi::default()));
    }
}
