//! Registry storage on disk: content-addressed blobs (manifests are blobs too),
//! per-repository manifest membership and tags, and upload sessions streamed to
//! temporary files while they are hashed.
//!
//! Layout under `DIR/registry/`: `blobs/sha256/XX/HEX`, `uploads/UUID`,
//! `repos/NAME/manifests/HEX` (holds the media type) and `repos/NAME/tags/TAG`
//! (holds the digest). Names, tags and digests are validated before they touch a
//! path, so no client string can escape the tree.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("registry storage I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("upload {0} unknown")]
    UploadUnknown(String),
    #[error("provided digest {provided} does not match the content ({computed})")]
    DigestMismatch { provided: String, computed: String },
    #[error("upload exceeds the maximum blob size of {0} bytes")]
    TooLarge(u64),
    #[error("upload offset {expected} expected, the request starts at {got}")]
    RangeMismatch { expected: u64, got: u64 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `sha256:` + 64 lowercase hex digits, the only algorithm we store.
pub fn parse_digest(d: &str) -> Option<&str> {
    let hex = d.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(hex)
}

/// Repository names per the distribution spec: lowercase path components
/// separated by `/`, each `[a-z0-9]+([._-][a-z0-9]+)*`.
pub fn valid_repo(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name.split('/').all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
                && c.as_bytes()[0].is_ascii_alphanumeric()
                && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
        })
}

/// Tags: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 128
        && (tag.as_bytes()[0].is_ascii_alphanumeric() || tag.as_bytes()[0] == b'_')
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// An upload nobody touched for this long is dropped (its file deleted).
const UPLOAD_IDLE: std::time::Duration = std::time::Duration::from_secs(3600);

struct Upload {
    repo: String,
    touched: std::time::Instant,
    path: PathBuf,
    hasher: Sha256,
    len: u64,
}

/// The on-disk registry. Cheap to clone.
#[derive(Clone)]
pub struct Storage {
    root: PathBuf,
    max_blob: u64,
    uploads: Arc<Mutex<HashMap<String, Upload>>>,
    /// Blob body bytes served (GET, whole or ranged): what a pull cost the registry.
    served: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("root", &self.root)
            .field("max_blob", &self.max_blob)
            .finish_non_exhaustive()
    }
}

impl Storage {
    /// Directories are made on first write, so opening never fails. Sessions live
    /// in memory: files left in `uploads/` by an earlier process are orphans and go.
    /// Blob body bytes served so far (the dedup test and bench read it).
    pub fn blob_bytes_served(&self) -> u64 {
        self.served.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn served_counter(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.served.clone()
    }

    pub fn new(root: PathBuf, max_blob: u64) -> Self {
        if let Ok(rd) = std::fs::read_dir(root.join("uploads")) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Self {
            root,
            max_blob,
            uploads: Arc::default(),
            served: Arc::default(),
        }
    }

    pub fn max_blob(&self) -> u64 {
        self.max_blob
    }

    pub fn blob_path(&self, hex: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(&hex[..2]).join(hex)
    }

    fn repo_dir(&self, repo: &str) -> PathBuf {
        self.root.join("repos").join(repo)
    }

    /// Size of a stored blob, `None` when absent.
    pub async fn blob_size(&self, hex: &str) -> Result<Option<u64>, StorageError> {
        let p = self.blob_path(hex);
        match tokio::fs::metadata(&p).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&p)(e)),
        }
    }

    /// Starts an upload session; answers its id.
    pub async fn start_upload(&self, repo: &str) -> Result<String, StorageError> {
        let dir = self.root.join("uploads");
        tokio::fs::create_dir_all(&dir).await.map_err(io(&dir))?;
        let id = format!("{:032x}", rand::random::<u128>());
        let path = dir.join(&id);
        tokio::fs::File::create(&path).await.map_err(io(&path))?;
        let stale: Vec<PathBuf> = {
            let mut map = self.uploads.lock().expect("uploads lock");
            let old: Vec<String> = map
                .iter()
                .filter(|(_, u)| u.touched.elapsed() > UPLOAD_IDLE)
                .map(|(k, _)| k.clone())
                .collect();
            old.iter()
                .filter_map(|k| map.remove(k))
                .map(|u| u.path)
                .collect()
        };
        for p in stale {
            let _ = tokio::fs::remove_file(p).await;
        }
        self.uploads.lock().expect("uploads lock").insert(
            id.clone(),
            Upload {
                repo: repo.to_string(),
                touched: std::time::Instant::now(),
                path,
                hasher: Sha256::new(),
                len: 0,
            },
        );
        Ok(id)
    }

    /// Bytes received so far by an upload of `repo`.
    pub fn upload_len(&self, repo: &str, id: &str) -> Result<u64, StorageError> {
        let map = self.uploads.lock().expect("uploads lock");
        match map.get(id) {
            Some(u) if u.repo == repo => Ok(u.len),
            _ => Err(StorageError::UploadUnknown(id.to_string())),
        }
    }

    /// Takes the session out of the table while a request writes to it, so two
    /// concurrent PATCHes cannot interleave; it goes back on success.
    fn take(&self, repo: &str, id: &str) -> Result<Upload, StorageError> {
        let mut map = self.uploads.lock().expect("uploads lock");
        match map.get(id) {
            Some(u) if u.repo == repo => Ok(map.remove(id).expect("present")),
            _ => Err(StorageError::UploadUnknown(id.to_string())),
        }
    }

    fn put_back(&self, id: &str, u: Upload) {
        self.uploads
            .lock()
            .expect("uploads lock")
            .insert(id.to_string(), u);
    }

    pub async fn cancel_upload(&self, repo: &str, id: &str) -> Result<(), StorageError> {
        let u = self.take(repo, id)?;
        let _ = tokio::fs::remove_file(&u.path).await;
        Ok(())
    }

    /// Appends a body to an upload, hashing as it streams. `start` is the offset the
    /// client claims (Content-Range), checked against what we hold. On failure the
    /// session is dropped (its data is in an unknown state).
    pub async fn append<B>(
        &self,
        repo: &str,
        id: &str,
        start: Option<u64>,
        body: B,
    ) -> Result<u64, StorageError>
    where
        B: http_body::Body<Data = bytes::Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let mut u = self.take(repo, id)?;
        if let Some(s) = start {
            if s != u.len {
                let expected = u.len;
                self.put_back(id, u);
                return Err(StorageError::RangeMismatch { expected, got: s });
            }
        }
        match self.write_body(&mut u, body).await {
            Ok(()) => {
                let len = u.len;
                u.touched = std::time::Instant::now();
                self.put_back(id, u);
                Ok(len)
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&u.path).await;
                Err(e)
            }
        }
    }

    async fn write_body<B>(&self, u: &mut Upload, mut body: B) -> Result<(), StorageError>
    where
        B: http_body::Body<Data = bytes::Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        use http_body_util::BodyExt;
        let path = u.path.clone();
        let mut f = tokio::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .await
            .map_err(io(&path))?;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                io(&path)(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    format!("request body: {e}"),
                ))
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if u.len + data.len() as u64 > self.max_blob {
                return Err(StorageError::TooLarge(self.max_blob));
            }
            u.hasher.update(&data);
            u.len += data.len() as u64;
            f.write_all(&data).await.map_err(io(&path))?;
        }
        f.flush().await.map_err(io(&path))?;
        Ok(())
    }

    /// Ends an upload: the content must hash to `digest`; then it becomes a blob.
    pub async fn finish_upload(
        &self,
        repo: &str,
        id: &str,
        digest: &str,
    ) -> Result<u64, StorageError> {
        let u = self.take(repo, id)?;
        let computed = format!("sha256:{}", hex::encode(u.hasher.clone().finalize()));
        if computed != digest {
            let _ = tokio::fs::remove_file(&u.path).await;
            return Err(StorageError::DigestMismatch {
                provided: digest.to_string(),
                computed,
            });
        }
        let hex = &computed["sha256:".len()..];
        self.commit_file(&u.path, hex).await?;
        Ok(u.len)
    }

    /// Moves a verified file into the blob tree (fsync first: a blob that is there
    /// must be whole).
    async fn commit_file(&self, tmp: &Path, hex: &str) -> Result<(), StorageError> {
        let dst = self.blob_path(hex);
        let parent = dst.parent().expect("blob path has a parent").to_path_buf();
        tokio::fs::create_dir_all(&parent)
            .await
            .map_err(io(&parent))?;
        let f = tokio::fs::File::open(tmp).await.map_err(io(tmp))?;
        f.sync_all().await.map_err(io(tmp))?;
        tokio::fs::rename(tmp, &dst).await.map_err(io(&dst))?;
        Ok(())
    }

    /// Stores small content (a manifest) as a blob; answers its digest.
    pub async fn put_bytes(&self, data: &[u8]) -> Result<String, StorageError> {
        let hex = hex::encode(Sha256::digest(data));
        if self.blob_size(&hex).await?.is_none() {
            let dir = self.root.join("uploads");
            tokio::fs::create_dir_all(&dir).await.map_err(io(&dir))?;
            let tmp = dir.join(format!("m-{:032x}", rand::random::<u128>()));
            tokio::fs::write(&tmp, data).await.map_err(io(&tmp))?;
            self.commit_file(&tmp, &hex).await?;
        }
        Ok(format!("sha256:{hex}"))
    }

    pub async fn read_blob(&self, hex: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let p = self.blob_path(hex);
        match tokio::fs::read(&p).await {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&p)(e)),
        }
    }

    /// Records that `repo` holds manifest `hex` of `media_type`, and tags it.
    pub async fn link_manifest(
        &self,
        repo: &str,
        hex: &str,
        media_type: &str,
        tag: Option<&str>,
    ) -> Result<(), StorageError> {
        let dir = self.repo_dir(repo).join("manifests");
        tokio::fs::create_dir_all(&dir).await.map_err(io(&dir))?;
        write_atomic(&dir.join(hex), media_type.as_bytes()).await?;
        if let Some(tag) = tag {
            let dir = self.repo_dir(repo).join("tags");
            tokio::fs::create_dir_all(&dir).await.map_err(io(&dir))?;
            write_atomic(&dir.join(tag), format!("sha256:{hex}").as_bytes()).await?;
        }
        Ok(())
    }

    /// The media type of manifest `hex` in `repo`, `None` when the repo does not hold it.
    pub async fn manifest_type(
        &self,
        repo: &str,
        hex: &str,
    ) -> Result<Option<String>, StorageError> {
        let p = self.repo_dir(repo).join("manifests").join(hex);
        match tokio::fs::read_to_string(&p).await {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&p)(e)),
        }
    }

    pub async fn resolve_tag(&self, repo: &str, tag: &str) -> Result<Option<String>, StorageError> {
        let p = self.repo_dir(repo).join("tags").join(tag);
        match tokio::fs::read_to_string(&p).await {
            // The full `sha256:HEX`, not just the hex part.
            Ok(t) => Ok(parse_digest(t.trim()).map(|_| t.trim().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&p)(e)),
        }
    }

    /// Tags of a repository, sorted; `None` when the repository is unknown.
    pub async fn tags(&self, repo: &str) -> Result<Option<Vec<String>>, StorageError> {
        let rd = self.repo_dir(repo);
        if tokio::fs::metadata(rd.join("manifests")).await.is_err() {
            return Ok(None);
        }
        let dir = rd.join("tags");
        let mut out = Vec::new();
        match tokio::fs::read_dir(&dir).await {
            Ok(mut rd) => {
                while let Some(e) = rd.next_entry().await.map_err(io(&dir))? {
                    if let Some(n) = e.file_name().to_str() {
                        if valid_tag(n) {
                            out.push(n.to_string());
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&dir)(e)),
        }
        out.sort();
        Ok(Some(out))
    }

    pub async fn delete_tag(&self, repo: &str, tag: &str) -> Result<bool, StorageError> {
        let p = self.repo_dir(repo).join("tags").join(tag);
        match tokio::fs::remove_file(&p).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io(&p)(e)),
        }
    }
}

async fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StorageError> {
    let tmp = path.with_extension(format!("tmp{:016x}", rand::random::<u64>()));
    tokio::fs::write(&tmp, data).await.map_err(io(&tmp))?;
    tokio::fs::rename(&tmp, path).await.map_err(io(path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_tags_digests() {
        assert!(valid_repo("modules/base"));
        assert!(valid_repo("a.b-c_d/e"));
        for bad in ["", "../x", "a//b", "A", "a/", "/a", "a/..", "a/.b", "a b"] {
            assert!(!valid_repo(bad), "{bad}");
        }
        assert!(valid_tag("v1.0"));
        assert!(valid_tag("sha256-abc.sig"));
        for bad in ["", ".x", "-x", "a/b", "a:b", &"x".repeat(129)] {
            assert!(!valid_tag(bad), "{bad}");
        }
        let d = format!("sha256:{}", "a".repeat(64));
        assert!(parse_digest(&d).is_some());
        assert!(parse_digest("sha256:AA").is_none());
        assert!(parse_digest(&format!("sha512:{}", "a".repeat(64))).is_none());
        assert!(parse_digest(&format!("sha256:{}", "A".repeat(64))).is_none());
    }
}
