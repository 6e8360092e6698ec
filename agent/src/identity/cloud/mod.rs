//! Cloud metadata identity: the identity document travels in the instance's user
//! data, and the provider's own instance id, region and addresses travel with it to
//! enrollment ([`ProviderFacts`]). One file per provider behind [`CloudProvider`];
//! [`probe`] is what the init calls once the network is up.
//!
//! Which providers are asked:
//! - a pin (`powernode.identity_source=aws`) asks that one provider only, patiently;
//! - else the providers the firmware's DMI strings point at (every cloud sets them:
//!   `Amazon EC2`, `Google Compute Engine`, ...), plus the generic URL when the
//!   command line gives one, plus an OpenStack config drive when one is attached,
//!   all patiently;
//! - else every provider in turn, as a guess: until one request of a provider has
//!   succeeded, any failure (no connection, a refusal, a 5xx) means "not this
//!   cloud" and is not retried, so a machine elsewhere does not wait out retries on
//!   nine metadata addresses. Once a guess has had a success it is held to the
//!   patient rules.
//!
//! Patient means: 404 is absent, 5xx and connection errors are retried within the
//! one deadline shared by the whole probe, and any other failure is an error naming
//! the provider, the URL or the metadata field. A provider that is present but
//! broken stops the probe; it is never skipped in favour of the next.
//!
//! Every provider takes its base URL in its constructor (a [`metadata::BaseUrl`],
//! the real address by default), so tests point it at a mock server on 127.0.0.1,
//! and collects its addresses with the shared walk in [`metadata`]. Adding a cloud
//! is one file here (with its `mod` line) and one line in `CLOUDS`.

pub mod aws;
pub mod azure;
pub mod digitalocean;
pub mod dmi;
pub mod gcp;
pub mod hetzner;
pub mod http;
pub mod metadata;
pub mod openstack;
pub mod oracle;
pub mod scaleway;
pub mod url;
pub mod vultr;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

pub use powernode_proto::node::ProviderFacts;
use powernode_proto::IdentityDocument;

pub use dmi::Dmi;
pub use http::{Fetcher, RetryPolicy};

use super::{SourceError, SourceErrorKind};

/// Default bound on the whole probe, every provider and retry included.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

/// What a provider found: the document from user data and the provider's facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudIdentity {
    /// The provider's name (`aws`, `gcp`, ... `url`), reported as the identity source.
    pub source: &'static str,
    pub document: IdentityDocument,
    pub facts: ProviderFacts,
}

/// What [`CloudProvider::fetch`] returns.
pub type CloudFuture<'a> = Pin<
    Box<
        dyn Future<Output = Result<Option<(IdentityDocument, ProviderFacts)>, SourceError>>
            + Send
            + 'a,
    >,
>;

/// One cloud's metadata service.
pub trait CloudProvider: Send + Sync {
    /// Stable name, as pinned by `powernode.identity_source=` and reported at enrollment.
    fn name(&self) -> &'static str;
    /// Whether local evidence (DMI strings, an attached config drive, a URL on the
    /// command line) says this provider is here, so it is asked patiently.
    fn detect(&self, dmi: &Dmi) -> bool;
    /// Reads the identity through `http`. `Ok(None)`: no identity here (no user
    /// data, or not this cloud).
    fn fetch<'a>(&'a self, http: &'a Fetcher) -> CloudFuture<'a>;
    /// HTTPS trust for this provider's requests; metadata services are plain HTTP.
    fn tls(&self) -> Result<Option<rustls::ClientConfig>, SourceError> {
        Ok(None)
    }
    /// Metadata services never redirect; a user's URL may.
    fn follow_redirects(&self) -> bool {
        false
    }
}

/// How [`probe`] runs. `Default` is the real machine: `/proc/cmdline`, DMI from
/// sysfs, real metadata addresses, a 30 s deadline.
#[derive(Debug, Clone)]
pub struct CloudOptions {
    /// The pinned source (`powernode.identity_source=`). `None` or `auto`: probe.
    /// A name that is not a cloud provider (`fw_cfg`) makes the probe answer
    /// `Ok(None)` without asking anything.
    pub pinned: Option<String>,
    /// Bound on the whole probe.
    pub deadline: Duration,
    pub retry: RetryPolicy,
    /// Kernel command line text, for `powernode.identity_url=`. `None`: read
    /// [`super::cmdline::DEFAULT_PATH`].
    pub cmdline: Option<String>,
    /// `/sys/class/dmi/id`.
    pub dmi_root: PathBuf,
    /// Where an OpenStack config drive is looked for.
    pub config_drive: openstack::ConfigDrive,
}

impl Default for CloudOptions {
    fn default() -> Self {
        Self {
            pinned: None,
            deadline: DEFAULT_DEADLINE,
            retry: RetryPolicy::default(),
            cmdline: None,
            dmi_root: PathBuf::from(dmi::DEFAULT_ROOT),
            config_drive: openstack::ConfigDrive::default(),
        }
    }
}

impl CloudOptions {
    /// The command line text, read from `/proc/cmdline` when not given.
    fn cmdline_text(&self) -> Result<String, SourceError> {
        match &self.cmdline {
            Some(t) => Ok(t.clone()),
            None => {
                let path = std::path::Path::new(super::cmdline::DEFAULT_PATH);
                let bytes = super::read_bounded(path, 256 * 1024)
                    .map_err(|kind| SourceError::new("cmdline", kind))?;
                Ok(bytes
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default())
            }
        }
    }
}

/// How a cloud source is built for a probe: from the probe's options and the
/// kernel command line text.
type Build = fn(&CloudOptions, &str) -> Result<Box<dyn CloudProvider>, SourceError>;

/// Every cloud source at its real address, in probe order: the one list a new
/// cloud is added to. The explicit URL first, then OpenStack (its config drive is
/// local and instant), then the clouds. AWS leads the 169.254.169.254 services:
/// its first request (the IMDSv2 token PUT) is the most specific, so other clouds
/// refuse it quickly.
const CLOUDS: &[(&str, Build)] = &[
    (url::NAME, |_, cmdline| {
        Ok(Box::new(url::UrlSource::from_cmdline(cmdline)?))
    }),
    (openstack::NAME, |opts, _| {
        Ok(Box::new(openstack::OpenStack::new(
            openstack::DEFAULT_BASE,
            opts.config_drive.clone(),
        )))
    }),
    (aws::NAME, |_, _| Ok(Box::new(aws::Aws::default()))),
    (gcp::NAME, |_, _| Ok(Box::new(gcp::Gcp::default()))),
    (azure::NAME, |_, _| Ok(Box::new(azure::Azure::default()))),
    (oracle::NAME, |_, _| Ok(Box::new(oracle::Oracle::default()))),
    (digitalocean::NAME, |_, _| {
        Ok(Box::new(digitalocean::DigitalOcean::default()))
    }),
    (hetzner::NAME, |_, _| {
        Ok(Box::new(hetzner::Hetzner::default()))
    }),
    (vultr::NAME, |_, _| Ok(Box::new(vultr::Vultr::default()))),
    (scaleway::NAME, |_, _| {
        Ok(Box::new(scaleway::Scaleway::default()))
    }),
];

/// Every provider of [`CLOUDS`], in probe order.
pub fn standard_providers(opts: &CloudOptions) -> Result<Vec<Box<dyn CloudProvider>>, SourceError> {
    let cmdline = opts.cmdline_text()?;
    CLOUDS
        .iter()
        .map(|(_, build)| build(opts, &cmdline))
        .collect()
}

/// The names of the cloud sources, for pins and error messages.
pub const NAMES: &[&str] = &names();

const fn names() -> [&'static str; CLOUDS.len()] {
    let mut out = [""; CLOUDS.len()];
    let mut i = 0;
    while i < CLOUDS.len() {
        out[i] = CLOUDS[i].0;
        i += 1;
    }
    out
}

/// Probes the standard providers (see the module doc for which are asked).
/// `Ok(None)`: no cloud identity (or the pin names a non-cloud source).
pub async fn probe(opts: &CloudOptions) -> Result<Option<CloudIdentity>, SourceError> {
    let providers = standard_providers(opts)?;
    probe_with(&providers, opts).await
}

/// [`probe`] over the given providers (tests build them on a mock's address).
pub async fn probe_with(
    providers: &[Box<dyn CloudProvider>],
    opts: &CloudOptions,
) -> Result<Option<CloudIdentity>, SourceError> {
    let deadline = tokio::time::Instant::now() + opts.deadline;
    let dmi = Dmi::read(&opts.dmi_root);
    let pin = opts.pinned.as_deref().filter(|p| *p != "auto");
    let plan: Vec<(&dyn CloudProvider, bool)> = match pin {
        Some(name) => match providers.iter().find(|p| p.name() == name) {
            Some(p) => vec![(p.as_ref(), true)],
            None => {
                tracing::debug!(pin = name, "identity pinned to a non-cloud source");
                return Ok(None);
            }
        },
        None => {
            let detected: Vec<(&dyn CloudProvider, bool)> = providers
                .iter()
                .filter(|p| p.detect(&dmi))
                .map(|p| (p.as_ref(), true))
                .collect();
            if detected.is_empty() {
                providers.iter().map(|p| (p.as_ref(), false)).collect()
            } else {
                detected
            }
        }
    };
    for (provider, patient) in plan {
        let name = provider.name();
        let fetcher = Fetcher::new(
            name,
            opts.retry,
            deadline,
            patient,
            provider.tls()?,
            provider.follow_redirects(),
        )?;
        match provider.fetch(&fetcher).await {
            Ok(Some((document, facts))) => {
                tracing::info!(source = name, node_id = %document.node_id,
                    instance_id = %document.instance_id,
                    provider_instance = facts.instance_id.as_deref().unwrap_or("-"),
                    region = facts.region.as_deref().unwrap_or("-"), "cloud identity found");
                return Ok(Some(CloudIdentity {
                    source: name,
                    document,
                    facts,
                }));
            }
            Ok(None) => tracing::debug!(source = name, patient, "no identity from this provider"),
            // A guess that never got a successful answer was not this cloud.
            Err(e) if !patient && !fetcher.confirmed() => {
                tracing::debug!(source = name, error = %crate::error_chain(&e), "not this cloud")
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// User data as an identity document. Empty user data holds no identity
/// (`Ok(None)`); anything else must be the JSON document, or it is an error: the
/// instance was started from this image with the wrong user data. A document broken
/// in one field that still names the control plane and the token carries them in
/// the error, so the node can report it (a boot report).
pub fn parse_user_data(
    strategy: &'static str,
    bytes: &[u8],
) -> Result<Option<IdentityDocument>, SourceError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let bytes = &bytes[start..];
    if bytes.is_empty() {
        return Ok(None);
    }
    IdentityDocument::parse(bytes).map(Some).map_err(|e| {
        SourceError::new(strategy, SourceErrorKind::Document(e))
            .with_report_to(powernode_proto::boot_report::ReportTarget::salvage(bytes))
    })
}

/// Decodes standard base64 (Azure `userData`, Oracle `user_data`), naming `field`.
pub fn decode_base64(http: &Fetcher, field: &str, text: &str) -> Result<Vec<u8>, SourceError> {
    use base64::Engine as _;
    let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| http.field_error(field, format!("is not valid base64: {e}")))
}

/// Parses a provider's JSON document, naming `field` when it is not JSON.
pub fn parse_json(
    http: &Fetcher,
    field: &str,
    bytes: &[u8],
) -> Result<serde_json::Value, SourceError> {
    serde_json::from_slice(bytes).map_err(|e| {
        http.field_error(
            field,
            format!(
                "is not valid JSON (line {} column {}): {e}",
                e.line(),
                e.column()
            ),
        )
    })
}

/// Reads an optional string member of a JSON object; a non-string is an error
/// naming `doc.key`.
pub fn json_str(
    http: &Fetcher,
    doc: &str,
    value: &serde_json::Value,
    key: &str,
) -> Result<Option<String>, SourceError> {
    match value.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => http::text_value(s.as_bytes())
            .map(|s| Some(s).filter(|s| !s.is_empty()))
            .map_err(|reason| http.field_error(format!("{doc}.{key}"), reason)),
        // Numeric ids (DigitalOcean, Vultr) are ids too.
        Some(serde_json::Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(http.field_error(format!("{doc}.{key}"), "must be a string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_whitespace_and_bom() {
        let doc = crate::identity::tests::doc("inst-ud");
        let mut bytes = b"\xEF\xBB\xBF\n  ".to_vec();
        bytes.extend(serde_json::to_vec(&doc).unwrap());
        assert_eq!(parse_user_data("aws", &bytes).unwrap(), Some(doc));
        assert_eq!(parse_user_data("aws", b" \n").unwrap(), None);
        let err = parse_user_data("aws", b"#cloud-config\n").unwrap_err();
        assert_eq!(err.strategy, "aws");
        assert!(matches!(err.kind, SourceErrorKind::Document(_)));
    }

    #[test]
    fn names_are_unique_and_match_the_providers() {
        let opts = CloudOptions {
            cmdline: Some(String::new()),
            ..Default::default()
        };
        let names: Vec<&str> = standard_providers(&opts)
            .unwrap()
            .iter()
            .map(|p| p.name())
            .collect();
        assert_eq!(names, NAMES);
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
    }
}
