//! Identity from a JSON file (development, tests, and images that ship one).
//! A missing file means absent; an oversize or broken one is an error.
//!
//! The same reader, named `state`, reads the copy the agent keeps in its state
//! directory, so an agent restarted with only `--state-dir` (a service after the
//! init's hand-off) finds the identity it booted with.

use std::path::PathBuf;

use powernode_proto::identity::MAX_IDENTITY_BYTES;
use powernode_proto::IdentityDocument;

use super::{IdentitySource, ProbeFuture, SourceError, SourceErrorKind};

const NAME: &str = "file";

#[derive(Debug, Clone)]
pub struct FileSource {
    name: &'static str,
    path: PathBuf,
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self::named(NAME, path)
    }

    /// The same source under another name (`state`).
    pub fn named(name: &'static str, path: impl Into<PathBuf>) -> Self {
        Self {
            name,
            path: path.into(),
        }
    }
}

impl IdentitySource for FileSource {
    fn name(&self) -> &'static str {
        self.name
    }

    fn probe(&self) -> ProbeFuture<'_> {
        Box::pin(async move {
            let err = |kind| SourceError::new(self.name, kind);
            match super::read_bounded(&self.path, MAX_IDENTITY_BYTES).map_err(err)? {
                None => Ok(None),
                Some(bytes) => IdentityDocument::parse(&bytes)
                    .map(Some)
                    .map_err(|e| err(SourceErrorKind::Document(e))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_good_oversize_broken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.json");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let src = FileSource::new(&path);
        assert_eq!(rt.block_on(src.probe()).unwrap(), None);
        let doc = crate::identity::tests::doc("inst-file");
        std::fs::write(&path, serde_json::to_vec(&doc).unwrap()).unwrap();
        assert_eq!(rt.block_on(src.probe()).unwrap(), Some(doc));
        std::fs::write(&path, vec![b' '; MAX_IDENTITY_BYTES + 1]).unwrap();
        assert!(matches!(
            rt.block_on(src.probe()).unwrap_err().kind,
            SourceErrorKind::TooLarge { .. }
        ));
        std::fs::write(&path, b"{\"version\":1,").unwrap();
        let err = rt.block_on(src.probe()).unwrap_err();
        assert_eq!(err.strategy, "file");
        assert!(matches!(err.kind, SourceErrorKind::Document(_)));
    }
}
