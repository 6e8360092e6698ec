//! The publisher's side of the format: a folder becomes a reproducible OCI tar layer,
//! and layers become the module's composefs image and fs-verity digest, exactly as the
//! node will rebuild them.
//!
//! The image is computed by running the node's own [`Unpacker`] over the layer bytes
//! (into a scratch [`ObjectStore`]) rather than by a second walk of the folder: the
//! unpacker is the one definition of what a layer means, so publisher and node cannot
//! drift apart (modes, owners, times, hardlinks, whiteouts all go through one path).

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::composefs::{self, ImageError};
use crate::store::ObjectStore;
use crate::toc::{self, TocLocation};
use crate::unpack::{UnpackError, Unpacker};
use crate::verity::{self, VerityDigest};

pub const MEDIA_TYPE_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MEDIA_TYPE_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// How the layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LayerCompression {
    None,
    /// gzip with a zero header time and no file name, so the same tar gives the same
    /// blob; one member per file and a table of contents ([`crate::toc`]).
    #[default]
    Gzip,
}

/// What of the folder's metadata goes into the layer. By default owners become 0:0 and
/// times 0, so the same content publishes to the same digests on any machine.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuildOptions {
    pub compression: LayerCompression,
    pub preserve_owners: bool,
    pub preserve_mtimes: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: sockets cannot go into a module")]
    Socket { path: PathBuf },
    #[error("writing the layer")]
    Write(#[source] io::Error),
    #[error("unpacking layer {index}")]
    Unpack {
        index: usize,
        #[source]
        source: UnpackError,
    },
    #[error("building the composefs image")]
    Image(#[from] ImageError),
}

/// A module built from a folder: one layer plus the image its signature covers.
#[derive(Debug, Clone)]
pub struct BuiltModule {
    /// The layer blob as it goes to the registry.
    pub layer: Vec<u8>,
    pub layer_media_type: &'static str,
    /// `sha256:HEX` of [`layer`](Self::layer) (the manifest's descriptor digest).
    pub layer_digest: String,
    /// `sha256:HEX` of the uncompressed tar (the config's `rootfs.diff_ids`).
    pub diff_id: String,
    /// The composefs EROFS image, byte-identical to what the node rebuilds.
    pub image: Vec<u8>,
    /// Its fs-verity digest: the value of `COMPOSEFS_DIGEST_ANNOTATION`.
    pub image_digest: VerityDigest,
    /// Where the layer's table of contents is (gzip layers): its
    /// [`annotations`](TocLocation::annotations) go on the layer descriptor.
    pub toc: Option<TocLocation>,
}

fn sha256_prefixed(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Builds a module from `dir`. File contents pass through `scratch` (a store the caller
/// owns, e.g. in a temp dir; objects already there are reused). Keeps the layer in
/// memory: modules are published one at a time by an operator.
pub fn build_module(
    dir: &Path,
    opts: &BuildOptions,
    scratch: &ObjectStore,
) -> Result<BuiltModule, PublishError> {
    let tar = write_layer_tar(dir, opts, Vec::new())?;
    let diff_id = sha256_prefixed(&tar);
    let (layer, media_type, toc) = match opts.compression {
        LayerCompression::None => (tar, MEDIA_TYPE_TAR, None),
        LayerCompression::Gzip => {
            // One gzip member per file plus the TOC, so nodes can fetch single files.
            let chunked = toc::chunked_gzip_layer(&tar).map_err(PublishError::Write)?;
            (chunked.blob, MEDIA_TYPE_TAR_GZIP, chunked.toc)
        }
    };
    let (image, image_digest) = image_from_layers(scratch, [(media_type, &layer[..])])?;
    Ok(BuiltModule {
        layer_digest: sha256_prefixed(&layer),
        layer,
        layer_media_type: media_type,
        diff_id,
        image,
        image_digest,
        toc,
    })
}

/// The composefs image (and its fs-verity digest) of an image's layers, bottom first:
/// what the publisher records for an image it did not build (an OCI layout), and what
/// [`build_module`] uses. Layers are trusted here (the publisher's own input).
pub fn image_from_layers<'m, R: Read>(
    scratch: &ObjectStore,
    layers: impl IntoIterator<Item = (&'m str, R)>,
) -> Result<(Vec<u8>, VerityDigest), PublishError> {
    let mut unpacker = Unpacker::new(scratch);
    for (index, (media_type, reader)) in layers.into_iter().enumerate() {
        unpacker
            .apply_layer(media_type, reader)
            .map_err(|source| PublishError::Unpack { index, source })?;
    }
    let image = composefs::build_image(unpacker.tree())?;
    let digest = verity::digest_bytes(&image);
    Ok((image, digest))
}

/// Writes `dir` as an uncompressed tar to `out`: entries in byte order of their paths
/// (parents first), relative names without `./`, the root itself omitted, hardlinks kept
/// as links to their first path. Returns `out`.
pub fn write_layer_tar<W: Write>(
    dir: &Path,
    opts: &BuildOptions,
    out: W,
) -> Result<W, PublishError> {
    let mut builder = tar::Builder::new(out);
    builder.mode(tar::HeaderMode::Complete);
    let mut links: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    walk(dir, &[], opts, &mut builder, &mut links)?;
    builder.into_inner().map_err(PublishError::Write)
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> PublishError + '_ {
    move |source| PublishError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn walk<W: Write>(
    dir: &Path,
    prefix: &[u8],
    opts: &BuildOptions,
    builder: &mut tar::Builder<W>,
    links: &mut HashMap<(u64, u64), Vec<u8>>,
) -> Result<(), PublishError> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(io_at(dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io_at(dir))?;
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in names {
        let path = dir.join(&name);
        let mut rel = prefix.to_vec();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(name.as_bytes());
        let md = fs::symlink_metadata(&path).map_err(io_at(&path))?;
        let ft = md.file_type();
        let mut h = tar::Header::new_gnu();
        h.set_mode(md.mode() & 0o7777);
        let (uid, gid) = if opts.preserve_owners {
            (md.uid(), md.gid())
        } else {
            (0, 0)
        };
        h.set_uid(uid.into());
        h.set_gid(gid.into());
        h.set_mtime(if opts.preserve_mtimes {
            md.mtime().max(0) as u64
        } else {
            0
        });
        h.set_size(0);
        let rel_path = Path::new(std::ffi::OsStr::from_bytes(&rel));
        let write_err = PublishError::Write;
        if ft.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            builder
                .append_data(&mut h, rel_path, io::empty())
                .map_err(write_err)?;
            walk(&path, &rel, opts, builder, links)?;
            continue;
        }
        if !ft.is_symlink() && md.nlink() > 1 {
            if let Some(first) = links.get(&(md.dev(), md.ino())) {
                h.set_entry_type(tar::EntryType::Link);
                let target = Path::new(std::ffi::OsStr::from_bytes(first));
                builder
                    .append_link(&mut h, rel_path, target)
                    .map_err(write_err)?;
                continue;
            }
            links.insert((md.dev(), md.ino()), rel.clone());
        }
        if ft.is_file() {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(md.len());
            let f = fs::File::open(&path).map_err(io_at(&path))?;
            // `take`: a file that grows while we read must not overrun its header size.
            builder
                .append_data(&mut h, rel_path, f.take(md.len()))
                .map_err(write_err)?;
        } else if ft.is_symlink() {
            h.set_entry_type(tar::EntryType::Symlink);
            let target = fs::read_link(&path).map_err(io_at(&path))?;
            builder
                .append_link(&mut h, rel_path, &target)
                .map_err(write_err)?;
        } else if ft.is_fifo() || ft.is_char_device() || ft.is_block_device() {
            h.set_entry_type(if ft.is_fifo() {
                tar::EntryType::Fifo
            } else if ft.is_char_device() {
                tar::EntryType::Char
            } else {
                tar::EntryType::Block
            });
            if !ft.is_fifo() {
                let rdev = md.rdev();
                h.set_device_major(rustix::fs::major(rdev))
                    .map_err(write_err)?;
                h.set_device_minor(rustix::fs::minor(rdev))
                    .map_err(write_err)?;
            }
            builder
                .append_data(&mut h, rel_path, io::empty())
                .map_err(write_err)?;
        } else {
            return Err(PublishError::Socket { path });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::install_image;
    use crate::testutil::pseudo_random;
    use crate::unpack::DigestingReader;
    use std::os::unix::fs::PermissionsExt;

    fn sample(root: &Path) {
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        fs::create_dir_all(root.join("etc/empty")).unwrap();
        fs::write(root.join("usr/bin/tool"), pseudo_random(70_000, 3)).unwrap();
        fs::set_permissions(
            root.join("usr/bin/tool"),
            fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        fs::write(root.join("etc/conf"), b"a=1\n").unwrap();
        fs::write(root.join("etc/zero"), b"").unwrap();
        fs::hard_link(root.join("etc/conf"), root.join("etc/conf.link")).unwrap();
        std::os::unix::fs::symlink("../usr/bin/tool", root.join("etc/tool")).unwrap();
        let long = "d".repeat(120);
        fs::create_dir_all(root.join(&long)).unwrap();
        fs::write(root.join(&long).join("f".repeat(150)), b"long").unwrap();
    }

    #[test]
    fn layer_is_reproducible_and_node_rebuilds_the_same_image() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        sample(&src);
        for compression in [LayerCompression::None, LayerCompression::Gzip] {
            let opts = BuildOptions {
                compression,
                ..Default::default()
            };
            let s1 = ObjectStore::open(&tmp.path().join("scratch1")).unwrap();
            let s2 = ObjectStore::open(&tmp.path().join("scratch2")).unwrap();
            let a = build_module(&src, &opts, &s1).unwrap();
            let b = build_module(&src, &opts, &s2).unwrap();
            assert_eq!(a.layer, b.layer, "layer bytes must be reproducible");
            assert_eq!(a.image, b.image);
            assert_eq!(a.image_digest, verity::digest_bytes(&a.image));

            // The node side: a fresh store, the layer through a DigestingReader.
            let node =
                ObjectStore::open(&tmp.path().join(format!("node-{compression:?}"))).unwrap();
            let r = install_image(&node, &a.image_digest, 1, |_| {
                Ok((
                    a.layer_media_type.to_string(),
                    DigestingReader::new(&a.layer[..], &a.layer_digest, 1 << 30),
                ))
            })
            .unwrap();
            assert!(!r.already_present);
            assert_eq!(fs::read(node.image_path(&a.image_digest)).unwrap(), a.image);
        }
    }

    #[test]
    fn tar_is_sorted_with_zero_times_and_owners() {
        let tmp = tempfile::tempdir().unwrap();
        sample(tmp.path());
        let tar = write_layer_tar(tmp.path(), &BuildOptions::default(), Vec::new()).unwrap();
        let mut ar = tar::Archive::new(&tar[..]);
        let mut names = Vec::new();
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            assert_eq!(
                (h.mtime().unwrap(), h.uid().unwrap(), h.gid().unwrap()),
                (0, 0, 0)
            );
            names.push(e.path_bytes().into_owned());
        }
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert!(names.contains(&b"etc/conf.link".to_vec()));
    }

    #[test]
    fn changing_one_file_changes_the_digest() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        sample(&src);
        let s = ObjectStore::open(&tmp.path().join("s")).unwrap();
        let a = build_module(&src, &BuildOptions::default(), &s).unwrap();
        fs::write(src.join("etc/zero"), b"x").unwrap();
        let b = build_module(&src, &BuildOptions::default(), &s).unwrap();
        assert_ne!(a.image_digest, b.image_digest);
        assert_ne!(a.layer_digest, b.layer_digest);
    }

    #[test]
    fn sockets_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let _l = std::os::unix::net::UnixListener::bind(tmp.path().join("sock")).unwrap();
        let err = write_layer_tar(tmp.path(), &BuildOptions::default(), Vec::new()).unwrap_err();
        assert!(matches!(err, PublishError::Socket { .. }), "{err}");
    }
}
