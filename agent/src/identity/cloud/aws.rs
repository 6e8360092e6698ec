//! AWS EC2, through IMDSv2: `PUT /latest/api/token` with
//! `X-aws-ec2-metadata-token-ttl-seconds`, then every read with
//! `X-aws-ec2-metadata-token`. The document is the user data
//! (`/latest/user-data`, 404 when the instance has none); the facts are
//! `meta-data/instance-id`, `placement/region` (or the availability zone minus its
//! letter on older IMDS), `local-ipv4`, `public-ipv4` and `ipv6`.
//!
//! IMDSv1 (no token) is not used: a token PUT answered 403 means IMDS is turned off
//! or v2 is blocked, which is reported, not worked around.

use powernode_proto::identity::MAX_IDENTITY_BYTES;

use super::http::{Fetcher, Method};
use super::metadata::{Addresses, BaseUrl};
use super::{CloudFuture, CloudProvider, Dmi, ProviderFacts};

pub const NAME: &str = "aws";
pub const DEFAULT_BASE: &str = "http://169.254.169.254";
/// Token lifetime asked for: the probe is over long before.
const TOKEN_TTL_SECONDS: &str = "300";

#[derive(Debug, Clone)]
pub struct Aws {
    base: BaseUrl,
}

impl Default for Aws {
    fn default() -> Self {
        Self::new(DEFAULT_BASE)
    }
}

impl Aws {
    /// `base`: `http://169.254.169.254` on EC2, a mock's address in tests.
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            base: BaseUrl::new(base),
        }
    }

    async fn read(
        &self,
        http: &Fetcher,
    ) -> Result<Option<(powernode_proto::IdentityDocument, ProviderFacts)>, super::SourceError>
    {
        let token_url = self.base.join("latest/api/token");
        let token = http
            .send(
                Method::Put,
                &token_url,
                &[("X-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL_SECONDS)],
                4096,
            )
            .await?;
        let Some(token) = token else {
            // No token endpoint: not an IMDSv2 service.
            return Ok(None);
        };
        let token = super::http::text_value(&token)
            .ok()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| http.field_error("api/token", "is empty or not a single line"))?;
        let auth = [("X-aws-ec2-metadata-token", token.as_str())];

        let user_data = http
            .get(
                &self.base.join("latest/user-data"),
                &auth,
                MAX_IDENTITY_BYTES,
            )
            .await?;
        let Some(user_data) = user_data else {
            return Ok(None);
        };
        let Some(document) = super::parse_user_data(NAME, &user_data)? else {
            return Ok(None);
        };

        let meta = |path: &str| self.base.join(&format!("latest/meta-data/{path}"));
        let instance_id = http
            .get_text(&meta("instance-id"), &auth, "meta-data/instance-id")
            .await?
            .filter(|s| !s.is_empty())
            .ok_or_else(|| http.field_error("meta-data/instance-id", "is missing or empty"))?;
        let region = match http
            .get_text(
                &meta("placement/region"),
                &auth,
                "meta-data/placement/region",
            )
            .await?
        {
            Some(r) if !r.is_empty() => Some(r),
            _ => http
                .get_text(
                    &meta("placement/availability-zone"),
                    &auth,
                    "meta-data/placement/availability-zone",
                )
                .await?
                .and_then(|az| region_of_zone(&az)),
        };
        let mut addresses = Addresses::new(http);
        for (path, field) in [
            ("local-ipv4", "meta-data/local-ipv4"),
            ("public-ipv4", "meta-data/public-ipv4"),
            ("ipv6", "meta-data/ipv6"),
        ] {
            let value = http.get_text(&meta(path), &auth, field).await?;
            addresses.push(field, value)?;
        }
        Ok(Some((document, addresses.facts(NAME, instance_id, region))))
    }
}

/// `us-east-1a` -> `us-east-1`: a zone is its region plus one letter. Only for
/// services too old to serve `placement/region`.
pub fn region_of_zone(zone: &str) -> Option<String> {
    let bytes = zone.as_bytes();
    match bytes {
        [.., d, l] if d.is_ascii_digit() && l.is_ascii_lowercase() => {
            Some(zone[..zone.len() - 1].to_string())
        }
        _ => None,
    }
}

impl CloudProvider for Aws {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Nitro instances say `Amazon EC2`; Xen ones carry `amazon` in the BIOS
    /// version and an `ec2` UUID.
    fn detect(&self, dmi: &Dmi) -> bool {
        dmi.sys_vendor == "Amazon EC2"
            || dmi.vendor_contains("amazon")
            || dmi.bios_version.to_ascii_lowercase().contains("amazon")
            || dmi.product_uuid.to_ascii_lowercase().starts_with("ec2")
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
        assert_eq!(region_of_zone("us-east-1a").as_deref(), Some("us-east-1"));
        assert_eq!(region_of_zone("eu-west-3c").as_deref(), Some("eu-west-3"));
        assert_eq!(
            region_of_zone("us-west-2-lax-1a").as_deref(),
            Some("us-west-2-lax-1")
        );
        assert_eq!(region_of_zone("weird"), None);
        assert_eq!(region_of_zone(""), None);
    }

    #[test]
    fn detection() {
        let aws = Aws::default();
        let mut dmi = Dmi::default();
        assert!(!aws.detect(&dmi));
        dmi.sys_vendor = "Amazon EC2".into();
        assert!(aws.detect(&dmi));
        let dmi = Dmi {
            bios_version: "4.11.amazon".into(),
            ..Default::default()
        };
        assert!(aws.detect(&dmi));
        let dmi = Dmi {
            sys_vendor: "QEMU".into(),
            ..Default::default()
        };
        assert!(!aws.detect(&dmi));
    }
}
