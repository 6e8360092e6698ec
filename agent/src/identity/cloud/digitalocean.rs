//! DigitalOcean: the droplet metadata service at
//! `http://169.254.169.254/metadata/v1.json`, one JSON document: the identity is
//! `user_data` (absent when unset), the facts `droplet_id`, `region` and the
//! public and private interfaces' IPv4 and IPv6 `ip_address`.

use super::http::{Fetcher, MAX_METADATA_BYTES};
use super::metadata::{optional_list, Addresses, BaseUrl};
use super::{CloudFuture, CloudProvider, Dmi, ProviderFacts, SourceError};

pub const NAME: &str = "digitalocean";
pub const DEFAULT_BASE: &str = "http://169.254.169.254";

#[derive(Debug, Clone)]
pub struct DigitalOcean {
    base: BaseUrl,
}

impl Default for DigitalOcean {
    fn default() -> Self {
        Self::new(DEFAULT_BASE)
    }
}

impl DigitalOcean {
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            base: BaseUrl::new(base),
        }
    }

    async fn read(
        &self,
        http: &Fetcher,
    ) -> Result<Option<(powernode_proto::IdentityDocument, ProviderFacts)>, SourceError> {
        let url = self.base.join("metadata/v1.json");
        let Some(bytes) = http.get(&url, &[], MAX_METADATA_BYTES).await? else {
            return Ok(None);
        };
        let meta = super::parse_json(http, "v1.json", &bytes)?;
        let user_data = match meta.get("user_data") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(s)) => s.as_bytes(),
            Some(_) => return Err(http.field_error("v1.json.user_data", "must be a string")),
        };
        let Some(document) = super::parse_user_data(NAME, user_data)? else {
            return Ok(None);
        };
        let id = super::json_str(http, "v1.json", &meta, "droplet_id")?
            .ok_or_else(|| http.field_error("v1.json.droplet_id", "is missing"))?;
        let region = super::json_str(http, "v1.json", &meta, "region")?;
        let mut addresses = Addresses::new(http);
        match meta.get("interfaces") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Object(kinds)) => {
                for kind in ["public", "private"] {
                    let at = format!("v1.json.interfaces.{kind}");
                    for (at, nic) in optional_list(http, &at, kinds.get(kind))? {
                        addresses.per_family(&at, nic, "ip_address")?;
                    }
                }
            }
            Some(_) => return Err(http.field_error("v1.json.interfaces", "must be an object")),
        }
        Ok(Some((document, addresses.facts(NAME, id, region))))
    }
}

impl CloudProvider for DigitalOcean {
    fn name(&self) -> &'static str {
        NAME
    }

    fn detect(&self, dmi: &Dmi) -> bool {
        dmi.sys_vendor == "DigitalOcean"
    }

    fn fetch<'a>(&'a self, http: &'a Fetcher) -> CloudFuture<'a> {
        Box::pin(self.read(http))
    }
}
