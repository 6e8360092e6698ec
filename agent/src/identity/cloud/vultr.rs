//! Vultr: the metadata service at `http://169.254.169.254`. The identity is
//! `/user-data/user-data` (404 when unset); the facts come from `/v1.json`:
//! `instance-v2-id` (else `instanceid`), `region.regioncode` and the interfaces'
//! `ipv4.address` / `ipv6.address`.

use powernode_proto::identity::MAX_IDENTITY_BYTES;

use super::http::{Fetcher, MAX_METADATA_BYTES};
use super::metadata::{optional_list, Addresses, BaseUrl};
use super::{CloudFuture, CloudProvider, Dmi, ProviderFacts, SourceError};

pub const NAME: &str = "vultr";
pub const DEFAULT_BASE: &str = "http://169.254.169.254";

#[derive(Debug, Clone)]
pub struct Vultr {
    base: BaseUrl,
}

impl Default for Vultr {
    fn default() -> Self {
        Self::new(DEFAULT_BASE)
    }
}

impl Vultr {
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            base: BaseUrl::new(base),
        }
    }

    async fn read(
        &self,
        http: &Fetcher,
    ) -> Result<Option<(powernode_proto::IdentityDocument, ProviderFacts)>, SourceError> {
        // The instance document first: it proves this is Vultr.
        let url = self.base.join("v1.json");
        let Some(bytes) = http.get(&url, &[], MAX_METADATA_BYTES).await? else {
            return Ok(None);
        };
        let meta = super::parse_json(http, "v1.json", &bytes)?;
        let url = self.base.join("user-data/user-data");
        let Some(user_data) = http.get(&url, &[], MAX_IDENTITY_BYTES).await? else {
            return Ok(None);
        };
        let Some(document) = super::parse_user_data(NAME, &user_data)? else {
            return Ok(None);
        };
        let id = match super::json_str(http, "v1.json", &meta, "instance-v2-id")? {
            Some(id) => id,
            None => super::json_str(http, "v1.json", &meta, "instanceid")?
                .ok_or_else(|| http.field_error("v1.json.instanceid", "is missing"))?,
        };
        let region = match meta.get("region") {
            None | Some(serde_json::Value::Null) => None,
            Some(r @ serde_json::Value::Object(_)) => {
                super::json_str(http, "v1.json.region", r, "regioncode")?
            }
            Some(_) => return Err(http.field_error("v1.json.region", "must be an object")),
        };
        let mut addresses = Addresses::new(http);
        for (at, nic) in optional_list(http, "v1.json.interfaces", meta.get("interfaces"))? {
            addresses.per_family(&at, nic, "address")?;
        }
        Ok(Some((document, addresses.facts(NAME, id, region))))
    }
}

impl CloudProvider for Vultr {
    fn name(&self) -> &'static str {
        NAME
    }

    fn detect(&self, dmi: &Dmi) -> bool {
        dmi.sys_vendor == "Vultr"
    }

    fn fetch<'a>(&'a self, http: &'a Fetcher) -> CloudFuture<'a> {
        Box::pin(self.read(http))
    }
}
