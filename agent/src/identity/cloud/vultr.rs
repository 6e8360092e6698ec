//! Vultr: the metadata service at `http://169.254.169.254`. The identity is
//! `/user-data/user-data` (404 when unset); the facts come from `/v1.json`:
//! `instance-v2-id` (else `instanceid`), `region.regioncode` and the interfaces'
//! `ipv4.address` / `ipv6.address`.

use powernode_proto::identity::MAX_IDENTITY_BYTES;

use super::http::{Fetcher, MAX_METADATA_BYTES};
use super::{CloudFuture, CloudProvider, Dmi, ProviderFacts, SourceError};

pub const NAME: &str = "vultr";
pub const DEFAULT_BASE: &str = "http://169.254.169.254";

#[derive(Debug, Clone)]
pub struct Vultr {
    base: String,
}

impl Default for Vultr {
    fn default() -> Self {
        Self::new(DEFAULT_BASE)
    }
}

impl Vultr {
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            base: base.into().trim_end_matches('/').to_string(),
        }
    }

    async fn read(
        &self,
        http: &Fetcher,
    ) -> Result<Option<(powernode_proto::IdentityDocument, ProviderFacts)>, SourceError> {
        // The instance document first: it proves this is Vultr.
        let url = format!("{}/v1.json", self.base);
        let Some(bytes) = http.get(&url, &[], MAX_METADATA_BYTES).await? else {
            return Ok(None);
        };
        let meta = super::parse_json(http, "v1.json", &bytes)?;
        let url = format!("{}/user-data/user-data", self.base);
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
        let mut addresses = Vec::new();
        match meta.get("interfaces") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Array(list)) => {
                for (i, nic) in list.iter().enumerate() {
                    for family in ["ipv4", "ipv6"] {
                        let Some(f) = nic.get(family).filter(|f| !f.is_null()) else {
                            continue;
                        };
                        let at = format!("v1.json.interfaces[{i}].{family}");
                        let ip = super::json_str(http, &at, f, "address")?;
                        super::push_address(http, &format!("{at}.address"), ip, &mut addresses)?;
                    }
                }
            }
            Some(_) => return Err(http.field_error("v1.json.interfaces", "must be a list")),
        }
        Ok(Some((
            document,
            ProviderFacts {
                provider: NAME.to_string(),
                instance_id: Some(id),
                region,
                addresses,
            },
        )))
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
