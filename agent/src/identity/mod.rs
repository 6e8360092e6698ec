//! Identity strategies: where a node learns its identity document before it has any
//! credentials. One file per source behind [`IdentitySource`]; the [`Selector`] tries
//! them in order and reports which one answered.
//!
//! A source answers `Ok(None)` when it is absent and `Err` when it is present but
//! broken. The selector stops at the first error instead of falling through to the
//! next source: a broken identity is a misconfiguration to report, not a reason to
//! boot with whatever a later source happens to hold (afterburn's OpenStack fallback
//! drops the config-drive error; we do not).
//!
//! Adding a cloud is one new file implementing [`IdentitySource`], one line in
//! [`Selector::standard`]. The trait is async so network sources fit unchanged.

pub mod cloud;
pub mod cmdline;
pub mod file;
pub mod fw_cfg;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use powernode_proto::{IdentityDocument, IdentityError};

/// What [`IdentitySource::probe`] returns.
pub type ProbeFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Option<IdentityDocument>, SourceError>> + Send + 'a>>;

/// One identity strategy.
pub trait IdentitySource: Send + Sync {
    /// Stable name, reported at enrollment (`cmdline`, `fw_cfg`, `file`, `aws`...).
    fn name(&self) -> &'static str;
    /// `Ok(None)`: this source is not present on this machine.
    /// `Err`: it is present but its content is unusable.
    fn probe(&self) -> ProbeFuture<'_>;
}

/// A present-but-broken source. The message names the source; the cause names the
/// field or file at fault.
#[derive(Debug, thiserror::Error)]
#[error("identity source `{strategy}` is present but unusable")]
pub struct SourceError {
    pub strategy: &'static str,
    #[source]
    pub kind: SourceErrorKind,
    /// Where the failure can still be reported: a document that is broken in
    /// another field may still name the control plane and the bootstrap token.
    pub report_to: Option<Box<powernode_proto::boot_report::ReportTarget>>,
}

impl SourceError {
    pub fn new(strategy: &'static str, kind: SourceErrorKind) -> Self {
        Self {
            strategy,
            kind,
            report_to: None,
        }
    }

    /// The same error, reportable to `target` (a boot report) when there is one.
    pub fn with_report_to(
        mut self,
        target: Option<powernode_proto::boot_report::ReportTarget>,
    ) -> Self {
        self.report_to = target.map(Box::new);
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceErrorKind {
    #[error("cannot read {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} holds {value:?}, not a byte count", path.display())]
    BadSize { path: PathBuf, value: String },
    #[error("entry is {size} bytes, more than the {max} allowed")]
    TooLarge { size: u64, max: usize },
    #[error("entry is truncated: {got} of {expected} bytes")]
    Truncated { expected: u64, got: usize },
    #[error("parameter `{key}` {reason}")]
    Parameter { key: String, reason: String },
    #[error("invalid identity document")]
    Document(#[source] IdentityError),
    /// A metadata endpoint answered a status that is neither success, absence
    /// (404) nor retryable (5xx): a refused token, a missing header, a forbidden path.
    #[error("{method} {url} answered HTTP {status}{}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    HttpStatus {
        method: &'static str,
        url: String,
        status: u16,
        detail: String,
    },
    /// Retries ran out (5xx or connection errors) within the bounded wait.
    #[error("{method} {url} gave up after {attempts} attempts in {waited_ms} ms (last: {last})")]
    GaveUp {
        method: &'static str,
        url: String,
        attempts: u32,
        waited_ms: u64,
        last: String,
    },
    /// The provider's own metadata is malformed; `field` names where.
    #[error("metadata field `{field}` {reason}")]
    Metadata { field: String, reason: String },
    /// A URL or TLS setting the source was given cannot be used.
    #[error("{what}: {reason}")]
    Config { what: String, reason: String },
}

/// Why no identity could be selected.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("no identity source answered (tried: {})", tried.join(", "))]
    NotFound { tried: Vec<&'static str> },
    #[error("identity source `{name}` is pinned but unknown (known: {})", known.join(", "))]
    UnknownSource {
        name: String,
        known: Vec<&'static str>,
    },
}

/// The identity and the source that gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub document: IdentityDocument,
    pub source: &'static str,
}

/// Where the standard sources look; every path is injectable for tests.
#[derive(Debug, Clone)]
pub struct SourcePaths {
    pub cmdline: PathBuf,
    pub fw_cfg_root: PathBuf,
    /// The `file` source; `None` leaves it out of the probe order.
    pub file: Option<PathBuf>,
    /// The agent's own copy (`<state-dir>/identity.json`), tried last as `state`.
    pub state: Option<PathBuf>,
}

impl Default for SourcePaths {
    fn default() -> Self {
        Self {
            cmdline: PathBuf::from(cmdline::DEFAULT_PATH),
            fw_cfg_root: PathBuf::from(fw_cfg::DEFAULT_ROOT),
            file: None,
            state: None,
        }
    }
}

/// Tries sources in order; the first to answer wins.
pub struct Selector {
    sources: Vec<Box<dyn IdentitySource>>,
}

impl std::fmt::Debug for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Selector")
            .field("sources", &self.names())
            .finish()
    }
}

impl Selector {
    pub fn new(sources: Vec<Box<dyn IdentitySource>>) -> Self {
        Self { sources }
    }

    /// The DESIGN order: command line, fw_cfg, then the file when one is configured,
    /// then the agent's stored copy. Cloud metadata sources go after fw_cfg, since
    /// they need the network.
    pub fn standard(paths: &SourcePaths) -> Self {
        let mut sources: Vec<Box<dyn IdentitySource>> = vec![
            Box::new(cmdline::CmdlineSource::new(&paths.cmdline)),
            Box::new(fw_cfg::FwCfgSource::new(&paths.fw_cfg_root)),
        ];
        if let Some(file) = &paths.file {
            sources.push(Box::new(file::FileSource::new(file)));
        }
        if let Some(state) = &paths.state {
            sources.push(Box::new(file::FileSource::named("state", state)));
        }
        Self::new(sources)
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.sources.iter().map(|s| s.name()).collect()
    }

    /// Resolves the identity. With `pin`, only that source is asked (no probing, so
    /// a QEMU boot never waits on a metadata address); `auto` means no pin.
    pub async fn resolve(&self, pin: Option<&str>) -> Result<Resolved, SelectError> {
        let pin = pin.filter(|p| *p != "auto");
        let candidates: Vec<&dyn IdentitySource> = match pin {
            Some(name) => {
                let found = self.sources.iter().find(|s| s.name() == name);
                match found {
                    Some(s) => vec![s.as_ref()],
                    None => {
                        return Err(SelectError::UnknownSource {
                            name: name.to_string(),
                            known: self.names(),
                        })
                    }
                }
            }
            None => self.sources.iter().map(|s| s.as_ref()).collect(),
        };
        let mut tried = Vec::new();
        for source in candidates {
            tried.push(source.name());
            match source.probe().await? {
                Some(document) => {
                    tracing::info!(source = source.name(), node_id = %document.node_id,
                        instance_id = %document.instance_id, "identity found");
                    return Ok(Resolved {
                        document,
                        source: source.name(),
                    });
                }
                None => tracing::debug!(source = source.name(), "identity source absent"),
            }
        }
        Err(SelectError::NotFound { tried })
    }
}

/// Resolves with the standard sources. The pin comes from `pin_override` (a CLI
/// flag) or else from `powernode.identity_source=` on the command line.
///
/// A pin naming a cloud source (`aws`, `url`, ... see [`cloud::NAMES`]) asks that
/// provider's metadata service, so `powernode-agent identity --identity-source aws`
/// shows what a cloud instance would boot with. Unpinned, the agent never probes
/// metadata addresses: that is the init's job once the network is up.
pub async fn resolve_standard(
    paths: &SourcePaths,
    pin_override: Option<&str>,
) -> Result<Resolved, SelectError> {
    resolve_standard_with_cloud(paths, pin_override, &cloud::CloudOptions::default()).await
}

/// [`resolve_standard`] with the cloud probe's options (tests point it at a mock;
/// `pinned` and `cmdline` are filled in here).
pub async fn resolve_standard_with_cloud(
    paths: &SourcePaths,
    pin_override: Option<&str>,
    cloud_opts: &cloud::CloudOptions,
) -> Result<Resolved, SelectError> {
    let pin = match pin_override {
        Some(p) => Some(p.to_string()),
        None => cmdline::read_pin(&paths.cmdline)?,
    };
    if let Some(name) = pin
        .as_deref()
        .and_then(|p| cloud::NAMES.iter().find(|n| **n == p))
    {
        let mut opts = cloud_opts.clone();
        opts.pinned = Some((*name).to_string());
        if opts.cmdline.is_none() {
            opts.cmdline = Some(cmdline::read_text(&paths.cmdline)?.unwrap_or_default());
        }
        return match cloud::probe(&opts).await? {
            Some(found) => Ok(Resolved {
                document: found.document,
                source: found.source,
            }),
            None => Err(SelectError::NotFound { tried: vec![name] }),
        };
    }
    Selector::standard(paths).resolve(pin.as_deref()).await
}

/// Reads a whole small file, refusing anything larger than `max` before reading it.
pub(crate) fn read_bounded(
    path: &std::path::Path,
    max: usize,
) -> Result<Option<Vec<u8>>, SourceErrorKind> {
    use std::io::Read as _;
    let io = |source| SourceErrorKind::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let mut bytes = Vec::new();
    // Read one byte past the limit so an oversize file is detected without reading
    // all of it.
    file.take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() > max {
        let size = std::fs::metadata(path)
            .map(|m| m.len())
            .unwrap_or(bytes.len() as u64);
        return Err(SourceErrorKind::TooLarge { size, max });
    }
    Ok(Some(bytes))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    pub(crate) fn doc(instance: &str) -> IdentityDocument {
        IdentityDocument::parse(
            serde_json::json!({
                "version": 1,
                "control_plane_url": "https://127.0.0.1:8443",
                "ca_pem": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
                "bootstrap_token": "tok",
                "node_id": "node-1",
                "instance_id": instance,
                "hostname": "edge-1",
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap()
    }

    enum Answer {
        Absent,
        Doc(&'static str),
        Broken,
    }

    struct Fake {
        name: &'static str,
        answer: Answer,
        calls: Arc<AtomicUsize>,
    }

    impl IdentitySource for Fake {
        fn name(&self) -> &'static str {
            self.name
        }
        fn probe(&self) -> ProbeFuture<'_> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                match self.answer {
                    Answer::Absent => Ok(None),
                    Answer::Doc(i) => Ok(Some(doc(i))),
                    Answer::Broken => Err(SourceError::new(
                        self.name,
                        SourceErrorKind::Document(IdentityError::MissingField("bootstrap_token")),
                    )),
                }
            })
        }
    }

    fn selector(answers: Vec<(&'static str, Answer)>) -> (Selector, Vec<Arc<AtomicUsize>>) {
        let mut calls = Vec::new();
        let sources = answers
            .into_iter()
            .map(|(name, answer)| {
                let c = Arc::new(AtomicUsize::new(0));
                calls.push(c.clone());
                Box::new(Fake {
                    name,
                    answer,
                    calls: c,
                }) as Box<dyn IdentitySource>
            })
            .collect();
        (Selector::new(sources), calls)
    }

    fn block<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn first_present_source_wins_in_order() {
        let (sel, calls) = selector(vec![
            ("cmdline", Answer::Absent),
            ("fw_cfg", Answer::Doc("inst-fw")),
            ("file", Answer::Doc("inst-file")),
        ]);
        let r = block(sel.resolve(None)).unwrap();
        assert_eq!(r.source, "fw_cfg");
        assert_eq!(r.document.instance_id, "inst-fw");
        assert_eq!(
            calls[2].load(Ordering::SeqCst),
            0,
            "later source not probed"
        );
    }

    #[test]
    fn broken_source_stops_the_search_and_is_named() {
        let (sel, calls) = selector(vec![
            ("cmdline", Answer::Broken),
            ("fw_cfg", Answer::Doc("inst-fw")),
        ]);
        let err = block(sel.resolve(None)).unwrap_err();
        match &err {
            SelectError::Source(e) => assert_eq!(e.strategy, "cmdline"),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(calls[1].load(Ordering::SeqCst), 0);
        let chain = crate::error_chain(&err);
        assert!(chain.contains("cmdline"), "{chain}");
        assert!(chain.contains("bootstrap_token"), "{chain}");
    }

    #[test]
    fn pin_skips_probing_and_unknown_pin_is_an_error() {
        let (sel, calls) = selector(vec![
            ("cmdline", Answer::Doc("inst-cmd")),
            ("fw_cfg", Answer::Doc("inst-fw")),
        ]);
        let r = block(sel.resolve(Some("fw_cfg"))).unwrap();
        assert_eq!(r.source, "fw_cfg");
        assert_eq!(calls[0].load(Ordering::SeqCst), 0);
        assert!(matches!(
            block(sel.resolve(Some("aws"))).unwrap_err(),
            SelectError::UnknownSource { .. }
        ));
        // `auto` is the same as no pin.
        assert_eq!(block(sel.resolve(Some("auto"))).unwrap().source, "cmdline");
    }

    #[test]
    fn nothing_present_lists_what_was_tried() {
        let (sel, _) = selector(vec![
            ("cmdline", Answer::Absent),
            ("fw_cfg", Answer::Absent),
        ]);
        match block(sel.resolve(None)).unwrap_err() {
            SelectError::NotFound { tried } => assert_eq!(tried, vec!["cmdline", "fw_cfg"]),
            other => panic!("unexpected {other:?}"),
        }
        // A pinned source that is absent is also "not found", not a silent fallback.
        let (sel, _) = selector(vec![
            ("cmdline", Answer::Doc("x")),
            ("fw_cfg", Answer::Absent),
        ]);
        assert!(matches!(
            block(sel.resolve(Some("fw_cfg"))).unwrap_err(),
            SelectError::NotFound { .. }
        ));
    }

    #[test]
    fn standard_selector_reads_injected_paths() {
        let dir = tempfile::tempdir().unwrap();
        let cmdline = dir.path().join("cmdline");
        std::fs::write(&cmdline, "console=ttyS0 quiet\n").unwrap();
        let file = dir.path().join("identity.json");
        std::fs::write(&file, serde_json::to_vec(&doc("inst-file")).unwrap()).unwrap();
        let paths = SourcePaths {
            cmdline: cmdline.clone(),
            fw_cfg_root: dir.path().join("no-fw-cfg"),
            file: Some(file.clone()),
            state: Some(dir.path().join("state-identity.json")),
        };
        let r = block(resolve_standard(&paths, None)).unwrap();
        assert_eq!(r.source, "file");
        // A pin on the command line restricts the search to fw_cfg, which is absent.
        std::fs::write(&cmdline, "powernode.identity_source=fw_cfg\n").unwrap();
        assert!(matches!(
            block(resolve_standard(&paths, None)).unwrap_err(),
            SelectError::NotFound { .. }
        ));
        // A CLI override wins over the command line pin.
        assert_eq!(
            block(resolve_standard(&paths, Some("file")))
                .unwrap()
                .source,
            "file"
        );
        // The stored copy answers last, once nothing else does.
        std::fs::write(&cmdline, "quiet\n").unwrap();
        std::fs::remove_file(&file).unwrap();
        assert!(matches!(
            block(resolve_standard(&paths, None)).unwrap_err(),
            SelectError::NotFound { tried } if tried == vec!["cmdline", "fw_cfg", "file", "state"]
        ));
        std::fs::write(
            dir.path().join("state-identity.json"),
            serde_json::to_vec(&doc("inst-state")).unwrap(),
        )
        .unwrap();
        let r = block(resolve_standard(&paths, None)).unwrap();
        assert_eq!(
            (r.source, r.document.instance_id.as_str()),
            ("state", "inst-state")
        );
    }
}
