//! Hetzner Cloud: the metadata service at `http://169.254.169.254/hetzner/v1/`.
//! The identity is `/hetzner/v1/userdata` (empty when unset); the facts are read
//! key by key under `/hetzner/v1/metadata/` (`instance-id`, `region`,
//! `public-ipv4`), plus the `ip` entries of `private-networks` (a YAML list, of
//! which only `ip:` lines are read, so no YAML parser is needed).

use powernode_proto::identity::MAX_IDENTITY_BYTES;

use super::http::{Fetcher, MAX_METADATA_BYTES};
use super::metadata::{Addresses, BaseUrl};
use super::{CloudFuture, CloudProvider, Dmi, ProviderFacts, SourceError};

pub const NAME: &str = "hetzner";
pub const DEFAULT_BASE: &str = "http://169.254.169.254";

#[derive(Debug, Clone)]
pub struct Hetzner {
    base: BaseUrl,
}

impl Default for Hetzner {
    fn default() -> Self {
        Self::new(DEFAULT_BASE)
    }
}

impl Hetzner {
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            base: BaseUrl::new(base),
        }
    }

    async fn read(
        &self,
        http: &Fetcher,
    ) -> Result<Option<(powernode_proto::IdentityDocument, ProviderFacts)>, SourceError> {
        let meta = |key: &str| self.base.join(&format!("hetzner/v1/metadata/{key}"));
        // The instance id first: it proves this is Hetzner.
        let Some(id) = http
            .get_text(&meta("instance-id"), &[], "metadata/instance-id")
            .await?
        else {
            return Ok(None);
        };
        if id.is_empty() {
            return Err(http.field_error("metadata/instance-id", "is empty"));
        }
        let url = self.base.join("hetzner/v1/userdata");
        let Some(user_data) = http.get(&url, &[], MAX_IDENTITY_BYTES).await? else {
            return Ok(None);
        };
        let Some(document) = super::parse_user_data(NAME, &user_data)? else {
            return Ok(None);
        };
        let region = http
            .get_text(&meta("region"), &[], "metadata/region")
            .await?
            .filter(|r| !r.is_empty());
        let mut addresses = Addresses::new(http);
        let public = http
            .get_text(&meta("public-ipv4"), &[], "metadata/public-ipv4")
            .await?;
        addresses.push("metadata/public-ipv4", public)?;
        if let Some(yaml) = http
            .get(&meta("private-networks"), &[], MAX_METADATA_BYTES)
            .await?
        {
            for ip in private_ips(&String::from_utf8_lossy(&yaml)) {
                addresses.push("metadata/private-networks[].ip", Some(ip))?;
            }
        }
        Ok(Some((document, addresses.facts(NAME, id, region))))
    }
}

/// The `ip:` values of a YAML list of mappings (`- ip: 10.0.0.2` or an indented
/// `ip: 10.0.0.2` line); quotes removed.
pub fn private_ips(yaml: &str) -> Vec<String> {
    yaml.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let line = line.strip_prefix("- ").unwrap_or(line).trim_start();
            let value = line.strip_prefix("ip:")?.trim();
            let value = value.trim_matches(|c| c == '"' || c == '\'');
            (!value.is_empty()).then(|| value.to_string())
        })
        .collect()
}

impl CloudProvider for Hetzner {
    fn name(&self) -> &'static str {
        NAME
    }

    fn detect(&self, dmi: &Dmi) -> bool {
        dmi.sys_vendor == "Hetzner"
    }

    fn fetch<'a>(&'a self, http: &'a Fetcher) -> CloudFuture<'a> {
        Box::pin(self.read(http))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_network_ips() {
        let yaml = "- ip: 10.0.0.2\n  alias_ips: []\n  interface_num: 1\n  mac_address: 86:00:00:2a:7d:e0\n\
                    - alias_ips: [10.0.1.9]\n  ip: '10.0.1.2'\n";
        assert_eq!(private_ips(yaml), vec!["10.0.0.2", "10.0.1.2"]);
        assert!(private_ips("[]\n").is_empty());
    }
}
