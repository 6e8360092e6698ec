//! Oracle Cloud Infrastructure: IMDS v2 at `http://169.254.169.254/opc/v2/`, every
//! request with `Authorization: Bearer Oracle` (v2 answers 401 without it; v1 is
//! not used). `/opc/v2/instance/` is one JSON document: the identity is
//! `metadata.user_data` (base64), the facts `id`, `canonicalRegionName` (else
//! `region`) and the VNICs' `privateIp` from `/opc/v2/vnics/`.

use powernode_proto::identity::MAX_IDENTITY_BYTES;

use super::http::{Fetcher, MAX_METADATA_BYTES};
use super::metadata::{indexed, list, Addresses, BaseUrl};
use super::{CloudFuture, CloudProvider, Dmi, ProviderFacts, SourceError};

pub const NAME: &str = "oracle";
pub const DEFAULT_BASE: &str = "http://169.254.169.254";
const HEADERS: [(&str, &str); 1] = [("Authorization", "Bearer Oracle")];

#[derive(Debug, Clone)]
pub struct Oracle {
    base: BaseUrl,
}

impl Default for Oracle {
    fn default() -> Self {
        Self::new(DEFAULT_BASE)
    }
}

impl Oracle {
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            base: BaseUrl::new(base),
        }
    }

    async fn read(
        &self,
        http: &Fetcher,
    ) -> Result<Option<(powernode_proto::IdentityDocument, ProviderFacts)>, SourceError> {
        let url = self.base.join("opc/v2/instance/");
        let Some(bytes) = http.get(&url, &HEADERS, MAX_METADATA_BYTES).await? else {
            return Ok(None);
        };
        let instance = super::parse_json(http, "instance", &bytes)?;
        let metadata = match instance.get("metadata") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(m @ serde_json::Value::Object(_)) => m,
            Some(_) => return Err(http.field_error("instance.metadata", "must be an object")),
        };
        let encoded = match metadata.get("user_data") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(s)) => s,
            Some(_) => {
                return Err(http.field_error("instance.metadata.user_data", "must be a string"))
            }
        };
        if encoded.len() > MAX_IDENTITY_BYTES * 4 / 3 + 4 {
            return Err(http.field_error("instance.metadata.user_data", "is too large"));
        }
        let raw = super::decode_base64(http, "instance.metadata.user_data", encoded)?;
        let Some(document) = super::parse_user_data(NAME, &raw)? else {
            return Ok(None);
        };
        let id = super::json_str(http, "instance", &instance, "id")?
            .ok_or_else(|| http.field_error("instance.id", "is missing"))?;
        let region = match super::json_str(http, "instance", &instance, "canonicalRegionName")? {
            Some(r) => Some(r),
            None => super::json_str(http, "instance", &instance, "region")?,
        };
        let mut addresses = Addresses::new(http);
        let url = self.base.join("opc/v2/vnics/");
        if let Some(bytes) = http.get(&url, &HEADERS, MAX_METADATA_BYTES).await? {
            let vnics = super::parse_json(http, "vnics", &bytes)?;
            for (at, vnic) in list(http, "vnics", &vnics)? {
                for key in ["privateIp", "ipv6Addresses"] {
                    match vnic.get(key) {
                        Some(serde_json::Value::Array(ips)) => {
                            for (field, ip) in indexed(&format!("{at}.{key}"), ips) {
                                let ip = ip
                                    .as_str()
                                    .ok_or_else(|| http.field_error(&field, "must be a string"))?;
                                addresses.push(&field, Some(ip.to_string()))?;
                            }
                        }
                        _ => addresses.member(&at, vnic, key)?,
                    }
                }
            }
        }
        Ok(Some((document, addresses.facts(NAME, id, region))))
    }
}

impl CloudProvider for Oracle {
    fn name(&self) -> &'static str {
        NAME
    }

    fn detect(&self, dmi: &Dmi) -> bool {
        dmi.chassis_asset_tag == "OracleCloud.com"
    }

    fn fetch<'a>(&'a self, http: &'a Fetcher) -> CloudFuture<'a> {
        Box::pin(self.read(http))
    }
}
