//! Identity from QEMU fw_cfg: the entry `opt/org.powernode/identity`, exposed by the
//! `qemu_fw_cfg` kernel module under
//! `/sys/firmware/qemu_fw_cfg/by_name/opt/org.powernode/identity/{size,raw}`.
//!
//! `size` is read first and anything over [`MAX_IDENTITY_BYTES`] is refused before
//! `raw` is touched; `raw` is then read in one large read, because each sysfs read
//! of a fw_cfg entry costs time proportional to its offset. A missing entry (or no
//! fw_cfg at all) means absent, not an error.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use powernode_proto::identity::MAX_IDENTITY_BYTES;
use powernode_proto::IdentityDocument;
use powernode_sysfmt::fw_cfg;

use super::{IdentitySource, ProbeFuture, SourceError, SourceErrorKind};

pub const DEFAULT_ROOT: &str = fw_cfg::SYSFS_ROOT;
/// The entry name, as given to QEMU with `-fw_cfg name=opt/org.powernode/identity,...`.
pub const ENTRY: &str = fw_cfg::IDENTITY_ENTRY;
const NAME: &str = "fw_cfg";

/// The fw_cfg source; `root` is injectable (default `/sys/firmware/qemu_fw_cfg`).
#[derive(Debug, Clone)]
pub struct FwCfgSource {
    root: PathBuf,
}

impl FwCfgSource {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn entry_dir(&self) -> PathBuf {
        self.root.join("by_name").join(ENTRY)
    }

    /// Reads the raw entry: `Ok(None)` when it does not exist.
    pub fn read_entry(&self) -> Result<Option<Vec<u8>>, SourceErrorKind> {
        read_entry(&self.entry_dir())
    }
}

fn read_entry(dir: &Path) -> Result<Option<Vec<u8>>, SourceErrorKind> {
    let size_path = dir.join("size");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SourceErrorKind::Io { path, source }
    };
    let size_text = match std::fs::read_to_string(&size_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&size_path)(e)),
    };
    let size = fw_cfg::parse_size(&size_text, MAX_IDENTITY_BYTES).map_err(|e| match e {
        fw_cfg::SizeError::NotANumber(value) => SourceErrorKind::BadSize {
            path: size_path.clone(),
            value,
        },
        fw_cfg::SizeError::TooLarge { size, max } => SourceErrorKind::TooLarge { size, max },
    })?;
    let raw_path = dir.join("raw");
    let mut file = std::fs::File::open(&raw_path).map_err(io(&raw_path))?;
    // `size` is bounded above, so this allocation is bounded too.
    let mut buf = vec![0u8; size];
    let mut got = 0;
    // One read normally returns everything; loop only if the kernel returns less.
    while got < size {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(&raw_path)(e)),
        }
    }
    if got < size {
        return Err(SourceErrorKind::Truncated {
            expected: size as u64,
            got,
        });
    }
    Ok(Some(buf))
}

impl IdentitySource for FwCfgSource {
    fn name(&self) -> &'static str {
        NAME
    }

    fn probe(&self) -> ProbeFuture<'_> {
        Box::pin(async move {
            let err = |kind| SourceError::new(NAME, kind);
            match self.read_entry().map_err(err)? {
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

    fn doc_bytes() -> Vec<u8> {
        serde_json::to_vec(&crate::identity::tests::doc("inst-fw")).unwrap()
    }

    fn probe(root: &Path) -> Result<Option<IdentityDocument>, SourceError> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(FwCfgSource::new(root).probe())
    }

    fn write_entry(root: &Path, size: &str, raw: &[u8]) {
        let dir = root.join("by_name").join(ENTRY);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("size"), size).unwrap();
        std::fs::write(dir.join("raw"), raw).unwrap();
    }

    #[test]
    fn absent_when_no_fw_cfg_or_no_entry() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(probe(&dir.path().join("nothing")).unwrap(), None);
        std::fs::create_dir_all(dir.path().join("by_name/opt/other")).unwrap();
        assert_eq!(probe(dir.path()).unwrap(), None);
    }

    #[test]
    fn good_entry_parses() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = doc_bytes();
        write_entry(dir.path(), &format!("{}\n", bytes.len()), &bytes);
        let doc = probe(dir.path()).unwrap().unwrap();
        assert_eq!(doc.instance_id, "inst-fw");
    }

    #[test]
    fn oversize_is_refused_before_reading_raw() {
        let dir = tempfile::tempdir().unwrap();
        // `raw` is deliberately missing: the size check must come first.
        let entry = dir.path().join("by_name").join(ENTRY);
        std::fs::create_dir_all(&entry).unwrap();
        std::fs::write(entry.join("size"), format!("{}", MAX_IDENTITY_BYTES + 1)).unwrap();
        let err = probe(dir.path()).unwrap_err();
        assert_eq!(err.strategy, "fw_cfg");
        assert!(
            matches!(err.kind, SourceErrorKind::TooLarge { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn truncated_raw_and_bad_size_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = doc_bytes();
        write_entry(
            dir.path(),
            &bytes.len().to_string(),
            &bytes[..bytes.len() / 2],
        );
        assert!(matches!(
            probe(dir.path()).unwrap_err().kind,
            SourceErrorKind::Truncated { .. }
        ));
        write_entry(dir.path(), "lots", &bytes);
        assert!(matches!(
            probe(dir.path()).unwrap_err().kind,
            SourceErrorKind::BadSize { .. }
        ));
    }

    #[test]
    fn broken_document_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = serde_json::to_value(crate::identity::tests::doc("inst-fw")).unwrap();
        v.as_object_mut().unwrap().remove("node_id");
        let bytes = serde_json::to_vec(&v).unwrap();
        write_entry(dir.path(), &bytes.len().to_string(), &bytes);
        let err = probe(dir.path()).unwrap_err();
        let chain = crate::error_chain(&err);
        assert!(
            chain.contains("fw_cfg") && chain.contains("node_id"),
            "{chain}"
        );
    }
}
