//! Google Compute Engine: the metadata server at `metadata.google.internal`
//! (169.254.169.254), every request with `Metadata-Flavor: Google` (without it the
//! server answers 403). The document is the instance attribute
//! `powernode-identity` when set, else `user-data`; the facts are `instance/id`,
//! `instance/zone` (`projects/<n>/zones/<zone>`; the region is the zone minus its
//! last `-x`) and the first interfaces' internal and external addresses from
//! `instance/network-interfaces/?recursive=true`.

use powernode_proto::identity::MAX_IDENTITY_BYTES;

use super::http::{Fetcher, MAX_METADATA_BYTES};
use super::metadata::{list, optional_list, Addresses, BaseUrl};
use super::{CloudFuture, CloudProvider, Dmi, ProviderFacts, SourceError};

pub const NAME: &str = "gcp";
pub const DEFAULT_BASE: &str = "http://169.254.169.254";
const FLAVOR: [(&str, &str); 1] = [("Metadata-Flavor", "Google")];

#[derive(Debug, Clone)]
pub struct Gcp {
    base: BaseUrl,
}

impl Default for Gcp {
    fn default() -> Self {
        Self::new(DEFAULT_BASE)
    }
}

impl Gcp {
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            base: BaseUrl::new(base),
        }
    }

    fn url(&self, path: &str) -> String {
        self.base.join(&format!("computeMetadata/v1/{path}"))
    }

    async fn read(
        &self,
        http: &Fetcher,
    ) -> Result<Option<(powernode_proto::IdentityDocument, ProviderFacts)>, SourceError> {
        // The id first: it proves this is GCE before anything else is asked.
        let Some(id) = http
            .get_text(&self.url("instance/id"), &FLAVOR, "instance/id")
            .await?
        else {
            return Ok(None);
        };
        if id.is_empty() {
            return Err(http.field_error("instance/id", "is empty"));
        }
        let mut user_data = None;
        for attr in ["powernode-identity", "user-data"] {
            let url = self.url(&format!("instance/attributes/{attr}"));
            if let Some(bytes) = http.get(&url, &FLAVOR, MAX_IDENTITY_BYTES).await? {
                user_data = Some(bytes);
                break;
            }
        }
        let Some(user_data) = user_data else {
            return Ok(None);
        };
        let Some(document) = super::parse_user_data(NAME, &user_data)? else {
            return Ok(None);
        };
        let zone = http
            .get_text(&self.url("instance/zone"), &FLAVOR, "instance/zone")
            .await?;
        let region = match zone {
            None => None,
            Some(z) => Some(region_of_zone(&z).ok_or_else(|| {
                http.field_error(
                    "instance/zone",
                    format!("holds {z:?}, not projects/<n>/zones/<region>-<x>"),
                )
            })?),
        };
        let mut addresses = Addresses::new(http);
        if let Some(bytes) = http
            .get(
                &self.url("instance/network-interfaces/?recursive=true"),
                &FLAVOR,
                MAX_METADATA_BYTES,
            )
            .await?
        {
            let doc = "instance/network-interfaces";
            let value = super::parse_json(http, doc, &bytes)?;
            for (at, nic) in list(http, doc, &value)? {
                addresses.member(&at, nic, "ip")?;
                let configs = nic.get("accessConfigs");
                for (at, c) in optional_list(http, &format!("{at}.accessConfigs"), configs)? {
                    addresses.member(&at, c, "externalIp")?;
                }
            }
        }
        Ok(Some((document, addresses.facts(NAME, id, region))))
    }
}

/// `projects/123/zones/us-central1-a` -> `us-central1`.
pub fn region_of_zone(zone: &str) -> Option<String> {
    let zone = zone.rsplit('/').next()?;
    let (region, letter) = zone.rsplit_once('-')?;
    (!region.is_empty() && letter.len() == 1).then(|| region.to_string())
}

impl CloudProvider for Gcp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn detect(&self, dmi: &Dmi) -> bool {
        dmi.product_name == "Google Compute Engine" || dmi.vendor_contains("google")
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
        assert_eq!(
            region_of_zone("projects/123456789/zones/us-central1-a").as_deref(),
            Some("us-central1")
        );
        assert_eq!(
            region_of_zone("europe-west4-b").as_deref(),
            Some("europe-west4")
        );
        assert_eq!(region_of_zone("projects/1/zones/nodash"), None);
        assert_eq!(region_of_zone(""), None);
    }

    #[test]
    fn detection() {
        let dmi = Dmi {
            product_name: "Google Compute Engine".into(),
            sys_vendor: "Google".into(),
            ..Default::default()
        };
        assert!(Gcp::default().detect(&dmi));
        assert!(!Gcp::default().detect(&Dmi::default()));
    }
}
