//! Cloud metadata identity in the init: when neither the command line nor fw_cfg
//! holds an identity (and none is pinned to them), the `identity` phase defers, the
//! network comes up by DHCP, and then this phase (`cloud_identity`) asks the cloud
//! metadata strategies of the agent library (`powernode_agent::identity::cloud`:
//! AWS IMDSv2, the generic `powernode.identity_url=`, ...). The provider's facts
//! (its instance id, region, addresses) go to enrollment with the document.
//!
//! A provider that is present but broken is an error naming it and the field; the
//! probe is bounded by one deadline (`powernode.cloud_deadline_s=`, default 30 s).
//! This file only asks; the boot's `cloud_identity` phase ([`crate::boot`]) marks the
//! timeline and writes the console event with what it answers.

use std::time::Duration;

use powernode_agent::identity::cloud::{self, CloudIdentity, CloudOptions};
use powernode_agent::identity::SourceError;

use crate::identity::{self, IdentityProbeError};

/// Whether an identity may still come from cloud metadata once the network is up:
/// no pin, `auto`, or a pin naming a cloud source.
pub fn may_probe(cmdline_text: &str) -> bool {
    match identity::pinned_source(cmdline_text).as_deref() {
        None | Some("auto") => true,
        Some(name) => identity::is_cloud_source(name),
    }
}

/// `powernode.cloud_deadline_s=N` (1..=600), else the library's default.
pub fn deadline(cmdline_text: &str) -> Duration {
    powernode_sysfmt::cmdline::last_value(cmdline_text, "powernode.cloud_deadline_s")
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|s| (1..=600).contains(s))
        .map(Duration::from_secs)
        .unwrap_or(cloud::DEFAULT_DEADLINE)
}

/// The probe's options for this command line.
pub fn options(cmdline_text: &str) -> CloudOptions {
    CloudOptions {
        pinned: identity::pinned_source(cmdline_text),
        deadline: deadline(cmdline_text),
        cmdline: Some(cmdline_text.to_string()),
        ..CloudOptions::default()
    }
}

/// The probe itself, as a function so tests can run the phase against a mock
/// metadata server on 127.0.0.1.
pub type Prober = dyn Fn(&CloudOptions) -> Result<Option<CloudIdentity>, SourceError>;

/// The real probe on a current-thread runtime of its own (PID 1 stays one thread).
pub fn real_probe(opts: &CloudOptions) -> Result<Option<CloudIdentity>, SourceError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            SourceError::new(
                "cloud",
                powernode_agent::identity::SourceErrorKind::Io {
                    path: "tokio runtime".into(),
                    source: e,
                },
            )
        })?;
    rt.block_on(cloud::probe(opts))
}

/// Asks cloud metadata with `probe`: `Ok(None)` when no provider answers, an error
/// naming the provider when one is present but broken.
pub fn find_identity(
    cmdline_text: &str,
    probe: &Prober,
) -> Result<Option<CloudIdentity>, IdentityProbeError> {
    let opts = options(cmdline_text);
    log::info!(
        "no identity on the command line or fw_cfg: asking cloud metadata (pin {}, deadline {} s)",
        opts.pinned.as_deref().unwrap_or("none"),
        opts.deadline.as_secs()
    );
    let found = match probe(&opts) {
        Ok(Some(found)) => found,
        Ok(None) => return Ok(None),
        Err(error) => {
            return Err(IdentityProbeError::Cloud {
                strategy: error.strategy,
                message: powernode_agent::error_chain(&error),
                report_to: error.report_to,
            })
        }
    };
    let CloudIdentity {
        source,
        document,
        facts,
    } = &found;
    log::info!(
        "identity from {source}: node {} instance {} ({}); provider instance {} region {}",
        document.node_id,
        document.instance_id,
        document.hostname,
        facts.instance_id.as_deref().unwrap_or("-"),
        facts.region.as_deref().unwrap_or("-"),
    );
    Ok(Some(found))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::identity::tests::doc_json;
    use powernode_proto::node::ProviderFacts;
    use powernode_proto::IdentityDocument;

    pub(crate) fn aws_identity() -> CloudIdentity {
        CloudIdentity {
            source: "aws",
            document: IdentityDocument::parse(doc_json().as_bytes()).unwrap(),
            facts: ProviderFacts {
                provider: "aws".into(),
                instance_id: Some("i-0abc".into()),
                region: Some("eu-west-1".into()),
                addresses: vec!["10.1.2.3".into()],
            },
        }
    }

    #[test]
    fn pins_and_deadlines_from_the_command_line() {
        assert!(may_probe("console=ttyS0"));
        assert!(may_probe("powernode.identity_source=auto"));
        assert!(may_probe("powernode.identity_source=aws"));
        assert!(!may_probe("powernode.identity_source=fw_cfg"));
        assert!(!may_probe("powernode.identity_source=cmdline"));
        assert!(!may_probe("powernode.identity_source=nonesuch"));
        assert_eq!(deadline(""), cloud::DEFAULT_DEADLINE);
        assert_eq!(
            deadline("powernode.cloud_deadline_s=7"),
            Duration::from_secs(7)
        );
        assert_eq!(
            deadline("powernode.cloud_deadline_s=0"),
            cloud::DEFAULT_DEADLINE
        );
        let o = options("powernode.identity_source=aws powernode.cloud_deadline_s=9");
        assert_eq!(o.pinned.as_deref(), Some("aws"));
        assert_eq!(o.deadline, Duration::from_secs(9));
        assert!(o.cmdline.unwrap().contains("cloud_deadline_s"));
    }

    #[test]
    fn absent_and_broken_metadata_are_distinct_errors() {
        assert!(matches!(
            find_identity("", &|_: &CloudOptions| Ok(None)),
            Ok(None)
        ));
        let err = find_identity("", &|_: &CloudOptions| {
            Err(SourceError::new(
                "aws",
                powernode_agent::identity::SourceErrorKind::Parameter {
                    key: "instance-id".into(),
                    reason: "is empty".into(),
                },
            ))
        })
        .unwrap_err();
        assert!(
            matches!(
                err,
                IdentityProbeError::Cloud {
                    strategy: "aws",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("instance-id"), "{err}");
    }

    #[test]
    fn a_found_cloud_identity_is_returned_with_its_facts() {
        let found = find_identity("console=ttyS0", &|o: &CloudOptions| {
            assert_eq!(o.pinned, None);
            Ok(Some(aws_identity()))
        })
        .unwrap()
        .unwrap();
        assert_eq!(found.source, "aws");
        assert_eq!(found.facts.instance_id.as_deref(), Some("i-0abc"));
    }
}
