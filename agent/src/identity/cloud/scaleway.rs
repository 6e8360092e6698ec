//! Scaleway: the metadata service at `http://169.254.42.42`. The facts come from
//! `/conf?format=json` (`id`, `zone` -> region, `private_ip`, `public_ip.address`
//! or `public_ips[].address`, `ipv6.address`). User data is served only to
//! requests from a privileged source port (below 1024, so only root can read it):
//! the key `powernode-identity` under `/user_data/`, else `cloud-init`.

use std::ops::RangeInclusive;

use powernode_proto::identity::MAX_IDENTITY_BYTES;

use super::http::{Fetcher, MAX_METADATA_BYTES};
use super::metadata::{optional_list, Addresses, BaseUrl};
use super::{CloudFuture, CloudProvider, Dmi, ProviderFacts, SourceError};

pub const NAME: &str = "scaleway";
pub const DEFAULT_BASE: &str = "http://169.254.42.42";
/// The user-data keys read, in order.
pub const USER_DATA_KEYS: [&str; 2] = ["powernode-identity", "cloud-init"];

#[derive(Debug, Clone)]
pub struct Scaleway {
    base: BaseUrl,
    source_ports: RangeInclusive<u16>,
}

impl Default for Scaleway {
    fn default() -> Self {
        Self::new(DEFAULT_BASE)
    }
}

impl Scaleway {
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            base: BaseUrl::new(base),
            source_ports: 1..=1023,
        }
    }

    /// Source ports for user-data requests (tests use unprivileged ones).
    pub fn with_source_ports(mut self, ports: RangeInclusive<u16>) -> Self {
        self.source_ports = ports;
        self
    }

    async fn read(
        &self,
        http: &Fetcher,
    ) -> Result<Option<(powernode_proto::IdentityDocument, ProviderFacts)>, SourceError> {
        let url = self.base.join("conf?format=json");
        let Some(bytes) = http.get(&url, &[], MAX_METADATA_BYTES).await? else {
            return Ok(None);
        };
        let conf = super::parse_json(http, "conf", &bytes)?;
        let mut user_data = None;
        for key in USER_DATA_KEYS {
            let url = self.base.join(&format!("user_data/{key}"));
            if let Some(b) = http
                .get_from_ports(&url, &[], MAX_IDENTITY_BYTES, self.source_ports.clone())
                .await?
            {
                user_data = Some(b);
                break;
            }
        }
        let Some(user_data) = user_data else {
            return Ok(None);
        };
        let Some(document) = super::parse_user_data(NAME, &user_data)? else {
            return Ok(None);
        };
        let id = super::json_str(http, "conf", &conf, "id")?
            .ok_or_else(|| http.field_error("conf.id", "is missing"))?;
        let zone = match super::json_str(http, "conf", &conf, "zone")? {
            Some(z) => Some(z),
            None => match conf.get("location") {
                Some(l @ serde_json::Value::Object(_)) => {
                    super::json_str(http, "conf.location", l, "zone_id")?
                }
                _ => None,
            },
        };
        let region = zone.map(|z| region_of_zone(&z));
        let mut addresses = Addresses::new(http);
        addresses.member("conf", &conf, "private_ip")?;
        for key in ["public_ip", "ipv6"] {
            match conf.get(key) {
                None | Some(serde_json::Value::Null) => {}
                Some(v @ serde_json::Value::Object(_)) => {
                    addresses.member(&format!("conf.{key}"), v, "address")?
                }
                Some(_) => return Err(http.field_error(format!("conf.{key}"), "must be an object")),
            }
        }
        for (at, v) in optional_list(http, "conf.public_ips", conf.get("public_ips"))? {
            addresses.member(&at, v, "address")?;
        }
        Ok(Some((document, addresses.facts(NAME, id, region))))
    }
}

/// `fr-par-1` -> `fr-par`; a zone without a numeric suffix is its own region.
pub fn region_of_zone(zone: &str) -> String {
    match zone.rsplit_once('-') {
        Some((region, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            region.to_string()
        }
        _ => zone.to_string(),
    }
}

impl CloudProvider for Scaleway {
    fn name(&self) -> &'static str {
        NAME
    }

    fn detect(&self, dmi: &Dmi) -> bool {
        dmi.sys_vendor == "Scaleway"
    }

    fn fetch<'a>(&'a self, http: &'a Fetcher) -> CloudFuture<'a> {
        Box::pin(self.read(http))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zones_to_regions() {
        assert_eq!(region_of_zone("fr-par-1"), "fr-par");
        assert_eq!(region_of_zone("nl-ams-3"), "nl-ams");
        assert_eq!(region_of_zone("par1"), "par1");
    }
}
