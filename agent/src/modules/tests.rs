//! Tests across the module pipeline: layers -> store + tree -> composefs image -> mount.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use powernode_proto::ErrorCode;

use super::composefs::build_image;
use super::mount::{mount_module, mount_union, KernelMounter, RecordingMounter, Restrict, Upper};
use super::store::{ObjectStore, StoreError, VerityMode};
use super::tree::{FsTree, Kind};
use super::unpack::{DigestingReader, UnpackError, Unpacker};
use super::{check_image_digest, install_image, InstallError, ModuleErrorCode};
use crate::verity::{self, VerityDigest};

const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const TGZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TZST: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Builds tar layers entry by entry, including ones `tar::Builder` would refuse.
struct Layer {
    b: tar::Builder<Vec<u8>>,
}

impl Layer {
    fn new() -> Self {
        Self {
            b: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: tar::EntryType, path: &[u8], mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        // Raw bytes: `set_path` refuses `..`, which is exactly what some tests need.
        let name = &mut h.as_old_mut().name;
        name.fill(0);
        name[..path.len()].copy_from_slice(path);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(size);
        h.set_cksum();
        h
    }

    fn dir(mut self, path: &str, mode: u32) -> Self {
        let h = Self::header(tar::EntryType::Directory, path.as_bytes(), mode, 0);
        self.b.append(&h, &[][..]).unwrap();
        self
    }

    fn file(mut self, path: &str, mode: u32, data: &[u8]) -> Self {
        let h = Self::header(
            tar::EntryType::Regular,
            path.as_bytes(),
            mode,
            data.len() as u64,
        );
        self.b.append(&h, data).unwrap();
        self
    }

    fn file_with_pax(mut self, path: &str, mode: u32, data: &[u8], pax: &[(&str, &[u8])]) -> Self {
        self.b.append_pax_extensions(pax.iter().copied()).unwrap();
        let h = Self::header(
            tar::EntryType::Regular,
            path.as_bytes(),
            mode,
            data.len() as u64,
        );
        self.b.append(&h, data).unwrap();
        self
    }

    fn link(mut self, kind: tar::EntryType, path: &str, target: &str) -> Self {
        if target.len() > 100 {
            self.b
                .append_pax_extensions([("linkpath", target.as_bytes())])
                .unwrap();
        }
        let mut h = Self::header(kind, path.as_bytes(), 0o777, 0);
        let ln = &mut h.as_old_mut().linkname;
        ln.fill(0);
        let short = &target.as_bytes()[..target.len().min(100)];
        ln[..short.len()].copy_from_slice(short);
        h.set_cksum();
        self.b.append(&h, &[][..]).unwrap();
        self
    }

    fn symlink(self, path: &str, target: &str) -> Self {
        self.link(tar::EntryType::Symlink, path, target)
    }

    fn hardlink(self, path: &str, target: &str) -> Self {
        self.link(tar::EntryType::Link, path, target)
    }

    fn special(mut self, kind: tar::EntryType, path: &str, major: u32, minor: u32) -> Self {
        let mut h = Self::header(kind, path.as_bytes(), 0o644, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        h.set_cksum();
        self.b.append(&h, &[][..]).unwrap();
        self
    }

    fn tar(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }

    fn gzip(self) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&self.tar()).unwrap();
        e.finish().unwrap()
    }

    fn zstd(self) -> Vec<u8> {
        zstd::stream::encode_all(&self.tar()[..], 3).unwrap()
    }
}

fn store() -> (tempfile::TempDir, ObjectStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = ObjectStore::open_with_mode(&dir.path().join("store"), VerityMode::Userspace).unwrap();
    (dir, s)
}

fn tree_of(store: &ObjectStore, layers: &[(&str, Vec<u8>)]) -> Result<FsTree, UnpackError> {
    let mut u = Unpacker::new(store);
    for (mt, blob) in layers {
        u.apply_layer(mt, &blob[..])?;
    }
    Ok(u.into_tree())
}

fn names(tree: &FsTree, path: &[&[u8]]) -> Vec<String> {
    let id = tree.lookup(path).unwrap().unwrap();
    match &tree.inode(id).kind {
        Kind::Dir(c) => c
            .keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect(),
        _ => panic!("not a dir"),
    }
}

/// The sample module used by the image and mount tests.
fn sample_layers() -> Vec<(&'static str, Vec<u8>)> {
    let big = pseudo_random(3 * 1024 * 1024 + 17, 11);
    let base = Layer::new()
        .dir("./", 0o755)
        .dir("etc/", 0o755)
        .file("etc/hostname", 0o644, b"node\n")
        .file("etc/shadow", 0o600, b"root:*:1::::::\n")
        .dir("usr/bin/", 0o755)
        .file("usr/bin/tool", 0o4755, b"#!/bin/sh\necho tool\n")
        .hardlink("usr/bin/tool-alias", "usr/bin/tool")
        .symlink("bin", "usr/bin")
        .symlink("etc/abs", "/etc/hostname")
        .symlink("etc/escape", "../../../../etc/passwd")
        .file("empty", 0o644, b"")
        .file("big.bin", 0o644, &big)
        .file_with_pax(
            "etc/xattrs",
            0o640,
            b"with xattrs",
            &[
                ("SCHILY.xattr.user.color", b"blue"),
                ("SCHILY.xattr.trusted.overlay.redirect", b"/evil"),
            ],
        )
        .dir("var/cache/old/", 0o755)
        .file("var/cache/old/junk", 0o644, b"junk")
        .file("var/gone", 0o644, b"to be whited out")
        .special(tar::EntryType::Fifo, "run-fifo", 0, 0)
        .special(tar::EntryType::Char, "dev-null", 1, 3)
        .gzip();
    let top = Layer::new()
        .file("var/cache/.wh..wh..opq", 0o644, b"")
        .file("var/cache/new", 0o644, b"fresh")
        .file("var/.wh.gone", 0o644, b"")
        .file("etc/hostname", 0o644, b"node-2\n")
        .zstd();
    vec![(TGZ, base), (TZST, top)]
}

#[test]
fn layers_apply_with_whiteouts_and_opaque_dirs() {
    let (_d, s) = store();
    let t = tree_of(&s, &sample_layers()).unwrap();
    assert_eq!(names(&t, &[b"var", b"cache"]), vec!["new"]);
    assert_eq!(names(&t, &[b"var"]), vec!["cache"]);
    let host = t.lookup(&[b"etc", b"hostname"]).unwrap().unwrap();
    let Kind::File {
        digest: Some(d),
        size,
    } = t.inode(host).kind
    else {
        panic!()
    };
    assert_eq!(size, 7);
    assert_eq!(std::fs::read(s.object_path(&d)).unwrap(), b"node-2\n");
    // Hardlink: one inode, two names.
    assert_eq!(
        t.lookup(&[b"usr", b"bin", b"tool"]).unwrap(),
        t.lookup(&[b"usr", b"bin", b"tool-alias"]).unwrap()
    );
    // trusted.overlay.* from the archive is escaped, user.* kept.
    let x = t.lookup(&[b"etc", b"xattrs"]).unwrap().unwrap();
    let xattrs = &t.inode(x).meta.xattrs;
    assert_eq!(
        xattrs.get(&b"user.color"[..]).map(|v| &v[..]),
        Some(&b"blue"[..])
    );
    assert!(xattrs.contains_key(&b"trusted.overlay.overlay.redirect"[..]));
    assert!(!xattrs.contains_key(&b"trusted.overlay.redirect"[..]));
}

#[test]
fn whiteout_in_the_same_layer_does_not_hide_that_layers_file() {
    let (_d, s) = store();
    let l = Layer::new()
        .file("a/keep", 0o644, b"k")
        .file("a/.wh.keep", 0o644, b"")
        .file("a/.wh..wh..opq", 0o644, b"")
        .tar();
    let t = tree_of(&s, &[(TAR, l)]).unwrap();
    assert_eq!(names(&t, &[b"a"]), vec!["keep"]);
}

#[test]
fn unsafe_entries_are_refused_with_their_name() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (Layer::new().file("../evil", 0o644, b"x").tar(), "../evil"),
        (
            Layer::new().file("a/../../evil", 0o644, b"x").tar(),
            "a/../../evil",
        ),
        (
            Layer::new()
                .file("f", 0o644, b"x")
                .hardlink("h", "../f")
                .tar(),
            "h",
        ),
        (Layer::new().hardlink("h", "/etc/passwd").tar(), "h"),
        (Layer::new().hardlink("h", "./").tar(), "h"),
        (Layer::new().hardlink("h", "missing").tar(), "h"),
        (Layer::new().dir("d/", 0o755).hardlink("h", "d").tar(), "h"),
        // A symlink is stored, but nothing is ever written through it.
        (
            Layer::new()
                .symlink("up", "/")
                .file("up/etc/passwd", 0o644, b"x")
                .tar(),
            "up/etc/passwd",
        ),
        (
            Layer::new()
                .symlink("up", "../..")
                .file("up/x", 0o644, b"x")
                .tar(),
            "up/x",
        ),
    ];
    for (blob, entry) in cases {
        let (_d, s) = store();
        let err = tree_of(&s, &[(TAR, blob)]).unwrap_err();
        assert_eq!(err.code(), ErrorCode::UnsafePath, "{entry}: {err}");
        match &err {
            UnpackError::UnsafePath { entry: e, .. } => assert_eq!(e, entry),
            other => panic!("{other:?}"),
        }
    }
    // A NUL smuggled in through a PAX path record.
    let (_d, s) = store();
    let mut b = Layer::new();
    b.b.append_pax_extensions([("path", &b"a\0b"[..])]).unwrap();
    let nul = b.file("placeholder", 0o644, b"x").tar();
    let err = tree_of(&s, &[(TAR, nul)]).unwrap_err();
    assert_eq!(err.code(), ErrorCode::UnsafePath, "{err}");
    // The symlink targets themselves are fine as data.
    let (_d, s) = store();
    let t = tree_of(&s, &[(TAR, Layer::new().symlink("up", "../../..").tar())]).unwrap();
    let id = t.lookup(&[b"up"]).unwrap().unwrap();
    assert_eq!(t.inode(id).kind, Kind::Symlink(b"../../..".to_vec()));
}

#[test]
fn media_types_and_stream_errors_have_codes() {
    let (_d, s) = store();
    let mut u = Unpacker::new(&s);
    let err = u
        .apply_layer("application/vnd.oci.image.layer.v1.tar+bzip2", &b""[..])
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::UnsupportedMediaType);

    // Device numbers Linux cannot represent.
    let dev = Layer::new()
        .special(tar::EntryType::Char, "d", 5000, 1)
        .tar();
    let err = u.apply_layer(TAR, &dev[..]).unwrap_err();
    assert_eq!(err.code(), ErrorCode::UnsupportedMediaType, "{err}");

    // Garbage that claims to be gzip.
    let err = u.apply_layer(TGZ, &b"not gzip at all"[..]).unwrap_err();
    assert_eq!(err.code(), ErrorCode::UnsupportedMediaType);

    // A layer whose bytes do not match the manifest digest: digest_mismatch, even
    // though the tar itself is fine.
    let blob = Layer::new().file("a", 0o644, b"a").gzip();
    let wrong = format!("sha256:{}", "0".repeat(64));
    let r = DigestingReader::new(&blob[..], &wrong, 1 << 20);
    let err = u.apply_layer(TGZ, r).unwrap_err();
    assert_eq!(err.code(), ErrorCode::DigestMismatch, "{err}");

    // The right digest passes; a flipped byte in the blob does not.
    let right = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&blob))
    );
    let mut u = Unpacker::new(&s);
    u.apply_layer(TGZ, DigestingReader::new(&blob[..], &right, 1 << 20))
        .unwrap();
    let mut bad = blob.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    let err = Unpacker::new(&s)
        .apply_layer(TGZ, DigestingReader::new(&bad[..], &right, 1 << 20))
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            ErrorCode::DigestMismatch | ErrorCode::UnsupportedMediaType
        ),
        "{err}"
    );
    // Oversize streams stop early.
    let err = Unpacker::new(&s)
        .apply_layer(TGZ, DigestingReader::new(&blob[..], &right, 10))
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::DigestMismatch);
}

/// Decompression bombs stop with `layer_too_large` at the bound, never by filling
/// memory or the store: a file that inflates past it (gzip and zstd), zeros that
/// inflate after the end of the archive, a PAX header larger than any real one.
#[test]
fn decompression_bombs_are_refused_at_their_bound() {
    use powernode_modfmt::unpack::MAX_LAYER_UNPACKED_BYTES;
    let (_d, s) = store();
    let zeros = vec![0u8; 8 << 20];
    let bound = 1 << 20;
    let gz = Layer::new().file("bomb", 0o644, &zeros).gzip();
    let zst = Layer::new().file("bomb", 0o644, &zeros).zstd();
    assert!(
        gz.len() < 128 << 10 && zst.len() < 128 << 10,
        "{} {}",
        gz.len(),
        zst.len()
    );
    for (media, blob) in [(TGZ, &gz), (TZST, &zst)] {
        let err = Unpacker::new(&s)
            .with_max_unpacked(bound)
            .apply_layer(media, &blob[..])
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::LayerTooLarge, "{media}: {err}");
        assert!(
            chain(&err).contains("more than 1048576 bytes"),
            "{}",
            chain(&err)
        );
        // Under the bound the same layer unpacks.
        Unpacker::new(&s)
            .with_max_unpacked(16 << 20)
            .apply_layer(media, &blob[..])
            .unwrap();
    }
    // A small archive, then megabytes of zeros the decoder would inflate after its end.
    let mut tar = Layer::new().file("a", 0o644, b"a").tar();
    tar.extend(std::iter::repeat_n(0u8, 8 << 20));
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(&tar).unwrap();
    let trailing = e.finish().unwrap();
    let err = Unpacker::new(&s)
        .with_max_unpacked(bound)
        .apply_layer(TGZ, &trailing[..])
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::LayerTooLarge, "{err}");
    // A PAX header of 2 MiB: refused before it is read into memory.
    let big = vec![b'x'; 2 << 20];
    let pax = Layer::new()
        .file_with_pax("a", 0o644, b"a", &[("SCHILY.xattr.user.big", &big)])
        .tar();
    let err = Unpacker::new(&s).apply_layer(TAR, &pax[..]).unwrap_err();
    assert_eq!(err.code(), ErrorCode::LayerTooLarge, "{err}");
    assert!(chain(&err).contains("extension header"), "{}", chain(&err));
    // The default bound is the store's free space, at most 64 GiB.
    assert_eq!(MAX_LAYER_UNPACKED_BYTES, 64 << 30);
    assert!(s.available_bytes().is_some_and(|b| b > 0));
}

#[test]
fn same_tree_gives_the_same_image_bytes() {
    let (_d1, s1) = store();
    let (_d2, s2) = store();
    let a = build_image(&tree_of(&s1, &sample_layers()).unwrap()).unwrap();
    let b = build_image(&tree_of(&s2, &sample_layers()).unwrap()).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.len() % 4096, 0);
    let d1 = s1
        .commit_image(&tree_of(&s1, &sample_layers()).unwrap())
        .unwrap();
    assert_eq!(d1, verity::digest_bytes(&a));
    // One changed byte of content changes the image digest.
    let mut layers = sample_layers();
    layers.push((
        TAR,
        Layer::new().file("etc/hostname", 0o644, b"node-3\n").tar(),
    ));
    let d2 = s1.commit_image(&tree_of(&s1, &layers).unwrap()).unwrap();
    assert_ne!(d1, d2);
    assert!(check_image_digest(&d1, &d2).is_err_and(|e| e.code() == ErrorCode::VerityMismatch));
}

/// A directory with many entries spans several blocks, names sort bytewise.
fn wide_layer() -> Vec<u8> {
    let mut l = Layer::new().dir("wide/", 0o755);
    for i in 0..700 {
        l = l.file(
            &format!("wide/entry-with-a-longish-name-{i:04}"),
            0o644,
            b"",
        );
    }
    l.symlink("longlink", &"x/".repeat(1500)).tar()
}

/// An erofs-utils tool; missing fails the test naming it (scripts/setup installs
/// erofs-utils, so CI always has it).
fn erofs_tool(name: &str) -> PathBuf {
    powernode_modfmt::testutil::test_tool(name)
        .unwrap_or_else(|| panic!("`{name}` (erofs-utils) is missing: scripts/setup installs it"))
}

#[test]
fn fsck_erofs_accepts_and_extracts_the_image() {
    let fsck = erofs_tool("fsck.erofs");
    let (d, s) = store();
    let mut layers = sample_layers();
    layers.push((TAR, wide_layer()));
    let tree = tree_of(&s, &layers).unwrap();
    let img = d.path().join("img");
    std::fs::write(&img, build_image(&tree).unwrap()).unwrap();
    if let Ok(keep) = std::env::var("COMPOSEFS_KEEP_IMAGE") {
        std::fs::copy(&img, keep).unwrap();
    }
    let out_dir = d.path().join("out");
    let out = Command::new(&fsck)
        .arg(format!("--extract={}", out_dir.display()))
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fsck.erofs: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Names, types, link targets, sizes and modes survive.
    let md = |p: &str| std::fs::symlink_metadata(out_dir.join(p)).unwrap();
    assert_eq!(
        std::fs::read_link(out_dir.join("bin")).unwrap(),
        Path::new("usr/bin")
    );
    assert_eq!(
        std::fs::read_link(out_dir.join("etc/escape")).unwrap(),
        Path::new("../../../../etc/passwd")
    );
    // erofs-utils 1.5 extracts holes as empty files; dump.erofs shows the inode.
    let dump = Command::new(erofs_tool("dump.erofs"))
        .args(["--path=/big.bin"])
        .arg(&img)
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("Size: 3145745"), "{dump}");
    assert_eq!(md("etc/shadow").permissions().mode() & 0o7777, 0o600);
    assert_eq!(md("empty").len(), 0);
    assert_eq!(
        std::fs::read_dir(out_dir.join("wide")).unwrap().count(),
        700
    );
    assert_eq!(
        std::fs::read_link(out_dir.join("longlink"))
            .unwrap()
            .as_os_str()
            .len(),
        3000
    );
    assert_eq!(
        std::fs::read_dir(out_dir.join("var/cache"))
            .unwrap()
            .count(),
        1
    );
}

#[test]
fn store_dedups_verifies_and_collects() {
    let (_d, s) = store();
    let a = s.insert_bytes(b"alpha").unwrap();
    assert!(a.new);
    let again = s.insert_bytes(b"alpha").unwrap();
    assert!(!again.new);
    assert_eq!(a.digest, again.digest);
    assert_eq!(a.digest, verity::digest_bytes(b"alpha"));
    let p = s.object_path(&a.digest);
    let hex = a.digest.to_hex();
    assert!(p.ends_with(format!("objects/{}/{}", &hex[..2], &hex[2..])));
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o444
    );
    s.verify(&a.digest).unwrap();

    // Expected digest enforced while streaming; nothing is left behind.
    let other = verity::digest_bytes(b"beta");
    let err = s.insert(&b"not beta"[..], Some(&other)).unwrap_err();
    assert_eq!(err.code(), ErrorCode::VerityMismatch);
    assert!(!s.contains(&other));

    // A byte flipped on disk is caught before use (by the next boot: a handle
    // trusts the files it wrote itself).
    let s = ObjectStore::open_with_mode(s.root(), VerityMode::Userspace).unwrap();
    let mut perm = std::fs::metadata(&p).unwrap().permissions();
    perm.set_mode(0o644);
    std::fs::set_permissions(&p, perm).unwrap();
    std::fs::write(&p, b"alphA").unwrap();
    let err = s.verify(&a.digest).unwrap_err();
    assert!(matches!(err, StoreError::VerityMismatch { .. }));
    assert_eq!(err.code(), ErrorCode::VerityMismatch);
    // ... and moved aside, so the next insert stores the good content again.
    assert!(!s.contains(&a.digest));
    assert!(s.insert_bytes(b"alpha").unwrap().new);
    s.verify(&a.digest).unwrap();
    // A torn (short) object under the right name is replaced, not reused.
    let p = s.object_path(&a.digest);
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&p, b"").unwrap();
    assert!(s.insert_bytes(b"alpha").unwrap().new);
    s.verify(&a.digest).unwrap();

    // gc keeps what live images reference, drops the rest.
    let (_d, s) = store();
    let t1 = tree_of(&s, &sample_layers()).unwrap();
    let img1 = s.commit_image(&t1).unwrap();
    let loose = s.insert_bytes(b"unreferenced").unwrap();
    let mut layers = sample_layers();
    layers.push((TAR, Layer::new().file("only-in-2", 0o644, b"two").tar()));
    let img2 = s.commit_image(&tree_of(&s, &layers).unwrap()).unwrap();
    let only2 = verity::digest_bytes(b"two");
    let stats = s.gc(&[img1]).unwrap();
    assert!(s.has_image(&img1) && !s.has_image(&img2));
    assert!(!s.contains(&loose.digest) && !s.contains(&only2) && !s.contains(&img2));
    for d in t1.objects() {
        assert!(s.contains(&d));
    }
    s.verify_image(&img1).unwrap();
    assert_eq!(stats.removed_images, 1);
    // loose, only-in-2, image 2, and what layer 2 shadowed or whited out in layer 1
    // (old hostname, var/gone, var/cache/old/junk).
    assert_eq!(stats.removed_objects, 6, "{stats:?}");
    for gone in [&b"node\n"[..], b"to be whited out", b"junk"] {
        assert!(!s.contains(&verity::digest_bytes(gone)));
    }
    // A live image whose reference list is gone stops gc instead of guessing.
    let err = s.gc(&[img2]).unwrap_err();
    assert!(matches!(err, StoreError::ImageMissing(_)));
}

#[test]
fn dedup_counts_only_new_content() {
    let (_d, s) = store();
    let mut v1 = Layer::new();
    for i in 0..1000 {
        v1 = v1.file(&format!("f/{i}"), 0o644, &pseudo_random(100 + i, i as u64));
    }
    let mut u = Unpacker::new(&s);
    let st1 = u.apply_layer(TAR, &v1.tar()[..]).unwrap();
    assert_eq!(st1.new_objects, 1000);
    let mut v2 = Layer::new();
    for i in 0..1000 {
        let data = if i == 500 {
            b"changed".to_vec()
        } else {
            pseudo_random(100 + i, i as u64)
        };
        v2 = v2.file(&format!("f/{i}"), 0o644, &data);
    }
    let st2 = Unpacker::new(&s).apply_layer(TAR, &v2.tar()[..]).unwrap();
    assert_eq!(
        (st2.new_objects, st2.new_bytes, st2.deduplicated_objects),
        (1, 7, 999)
    );
}

#[test]
fn a_root_installed_in_this_boot_mounts_without_a_re_hash_and_the_next_boot_re_hashes_it() {
    let (d, s) = store();
    let layers = sample_layers();
    let want = verity::digest_bytes(&build_image(&tree_of(&store().1, &layers).unwrap()).unwrap());
    install_image(&s, &want, layers.len(), |i| {
        Ok((layers[i].0.to_string(), &layers[i].1[..]))
    })
    .unwrap();
    let work = d.path().join("work");
    let m = RecordingMounter::default();
    let root = mount_union(
        &m,
        &s,
        &[want],
        &work,
        &Upper::Tmpfs,
        &d.path().join("root"),
    )
    .unwrap();
    let objects = s.image_objects(&want).unwrap().len() as u64;
    let st = s.stats();
    assert_eq!((st.objects_rehashed, st.bytes_rehashed), (0, 0));
    assert_eq!(st.rehash_skipped, objects + 1, "every object and the image");
    root.unmount(&m).unwrap();
    // The next boot on the same (tmpfs-like) store: everything is read again.
    let next = ObjectStore::open_with_mode(s.root(), VerityMode::Userspace).unwrap();
    let root = mount_union(
        &m,
        &next,
        &[want],
        &work,
        &Upper::Tmpfs,
        &d.path().join("root"),
    )
    .unwrap();
    let st = next.stats();
    assert_eq!((st.objects_rehashed, st.rehash_skipped), (objects + 1, 0));
    assert!(st.bytes_rehashed > 3 * 1024 * 1024);
    root.unmount(&m).unwrap();
}

#[test]
fn mount_sequence_is_recorded() {
    let (d, s) = store();
    let img = s
        .commit_image(&tree_of(&s, &sample_layers()).unwrap())
        .unwrap();
    let m = RecordingMounter::default();
    let work = d.path().join("work");
    let root = mount_union(&m, &s, &[img], &work, &Upper::Tmpfs, &d.path().join("root")).unwrap();
    let calls = m.calls();
    let objects = s.objects_dir().display().to_string();
    let imgmnt = work.join("images").join(img.to_hex()).display().to_string();
    assert_eq!(calls.len(), 3, "{calls:#?}");
    assert!(calls[0].starts_with(&format!("mount erofs {}", s.image_path(&img).display())));
    assert!(calls[0].contains(" ro "));
    assert!(calls[1].starts_with("mount tmpfs"));
    assert!(
        calls[2].contains(&format!("lowerdir+={imgmnt},datadir+={objects},")),
        "{}",
        calls[2]
    );
    assert!(calls[2].contains("metacopy=on,redirect_dir=on,upperdir="));
    assert!(
        !calls[2].contains("verity=require"),
        "userspace store must not require verity"
    );
    root.unmount(&m).unwrap();
    assert_eq!(m.calls().len(), 6);

    // A persistent upper is a directory, not a mount.
    let m = RecordingMounter::default();
    let persist = d.path().join("persist/root");
    let root = mount_union(
        &m,
        &s,
        &[img],
        &work,
        &Upper::Dir(persist.clone()),
        &d.path().join("root"),
    )
    .unwrap();
    let calls = m.calls();
    assert_eq!(calls.len(), 2, "{calls:#?}");
    assert!(calls[1].contains(&format!("upperdir={}", persist.join("upper").display())));
    assert!(persist.join("work").is_dir());
    root.unmount(&m).unwrap();
    assert_eq!(m.calls().len(), 4);

    // A tampered object stops the mount before any syscall (as the next boot finds
    // it: a handle trusts the files it wrote itself).
    let s = ObjectStore::open_with_mode(s.root(), VerityMode::Userspace).unwrap();
    let obj = tree_of(&s, &sample_layers()).unwrap().objects()[0];
    let p = s.object_path(&obj);
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&p, bytes).unwrap();
    let m = RecordingMounter::default();
    let err = mount_module(
        &m,
        &s,
        &img,
        &d.path().join("i"),
        &d.path().join("t"),
        Restrict::RUNTIME,
    )
    .unwrap_err();
    assert_eq!(err.code(), ErrorCode::VerityMismatch, "{err}");
    assert!(m.calls().is_empty());
    // A store with kernel fs-verity makes overlayfs require it.
    let opts = super::mount::overlay_options(
        &[Path::new("/i")],
        Path::new("/o"),
        None,
        VerityMode::Kernel,
    )
    .unwrap();
    assert!(opts.contains(&super::mount::MountOpt::Str("verity", "require".into())));
    // Paths overlayfs cannot take are refused, not mangled.
    assert!(super::mount::overlay_options(
        &[Path::new("/a:b")],
        Path::new("/o"),
        None,
        VerityMode::Kernel
    )
    .is_err());
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn lgetxattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    rustix::fs::lgetxattr(p, name, &mut buf)
        .ok()
        .map(|n| buf[..n].to_vec())
}

/// Snapshot of the object store: path -> (mode, content digest).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u32, VerityDigest)> {
    let mut out = BTreeMap::new();
    for sub in std::fs::read_dir(dir).unwrap() {
        for e in std::fs::read_dir(sub.unwrap().path()).unwrap() {
            let p = e.unwrap().path();
            let md = std::fs::metadata(&p).unwrap();
            let d = verity::digest_bytes(&std::fs::read(&p).unwrap());
            out.insert(p, (md.mode(), d));
        }
    }
    out
}

/// Root only: the image really mounts, shows the tree, and a union root over it is
/// writable while the store stays as it was.
#[test]
fn mounts_composefs_and_a_writable_union_root() {
    // The test command runs as root; a non-root run fails here naming why.
    assert!(
        is_root(),
        "mounting composefs needs root: run the tests as root (scripts/test)"
    );
    let (d, s) = store();
    let tree = tree_of(&s, &sample_layers()).unwrap();
    let img = s.commit_image(&tree).unwrap();
    let m = KernelMounter;
    let target = d.path().join("module");
    let imgmnt = d.path().join("image");
    if let Err(e) = mount_module(&m, &s, &img, &imgmnt, &target, Restrict::RUNTIME) {
        panic!("mount failed: {}", chain(&e));
    }
    struct Unmount<'a>(Vec<PathBuf>, &'a KernelMounter);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            for p in &self.0 {
                let _ = super::mount::Mounter::unmount(self.1, p);
            }
        }
    }
    let mut guard = Unmount(vec![target.clone(), imgmnt.clone()], &m);
    let at = |p: &str| target.join(p);
    let md = |p: &str| std::fs::symlink_metadata(at(p)).unwrap();

    assert_eq!(std::fs::read(at("etc/hostname")).unwrap(), b"node-2\n");
    assert_eq!(
        std::fs::read(at("big.bin")).unwrap(),
        pseudo_random(3 * 1024 * 1024 + 17, 11)
    );
    assert_eq!(std::fs::read(at("empty")).unwrap(), b"");
    assert_eq!(md("etc/shadow").mode() & 0o7777, 0o600);
    assert_eq!(md("usr/bin/tool").mode() & 0o7777, 0o4755);
    assert_eq!(md("usr/bin/tool").ino(), md("usr/bin/tool-alias").ino());
    assert_eq!(md("usr/bin/tool").nlink(), 2);
    assert_eq!(
        std::fs::read(at("bin/tool")).unwrap(),
        b"#!/bin/sh\necho tool\n"
    );
    assert_eq!(
        std::fs::read_link(at("etc/abs")).unwrap(),
        Path::new("/etc/hostname")
    );
    assert!(md("run-fifo").file_type().is_fifo_like());
    assert_eq!(md("dev-null").rdev(), rustix::fs::makedev(1, 3));
    // A runtime module's tree: its set-user-ID bits are data, its device nodes open
    // nothing (`nosuid,nodev`), on the overlay and on the image under it.
    let mounts = powernode_sysfmt::mountinfo::parse(
        &std::fs::read_to_string("/proc/self/mountinfo").unwrap(),
    )
    .unwrap();
    for mnt in [&target, &imgmnt] {
        let top = powernode_sysfmt::mountinfo::top_at(&mounts, &mnt.to_string_lossy())
            .unwrap_or_else(|| panic!("{} is not mounted", mnt.display()));
        let opts: Vec<&str> = top.mount_options.split(',').collect();
        assert!(
            opts.contains(&"nosuid") && opts.contains(&"nodev"),
            "{}: {opts:?}",
            mnt.display()
        );
    }
    assert_eq!(
        std::fs::File::open(at("dev-null")).unwrap_err().kind(),
        std::io::ErrorKind::PermissionDenied
    );
    assert_eq!(md("etc/hostname").mtime(), 1_700_000_000);
    assert_eq!(
        lgetxattr(&at("etc/xattrs"), "user.color").as_deref(),
        Some(&b"blue"[..])
    );
    // The archive's trusted.overlay.redirect is visible as data (unescaped by
    // overlayfs) and did not redirect anything.
    assert_eq!(
        lgetxattr(&at("etc/xattrs"), "trusted.overlay.redirect").as_deref(),
        Some(&b"/evil"[..])
    );
    assert_eq!(std::fs::read(at("etc/xattrs")).unwrap(), b"with xattrs");
    assert_eq!(std::fs::read_dir(at("var/cache")).unwrap().count(), 1);
    assert!(!at("var/gone").exists());
    assert!(
        std::fs::write(at("etc/new"), b"x").is_err(),
        "module mounts are read-only"
    );

    // Union root: two modules (the first wins), tmpfs upper.
    let extra = tree_of(
        &s,
        &[(
            TAR,
            Layer::new()
                .file("etc/hostname", 0o644, b"from-top\n")
                .file("opt/top", 0o755, b"top")
                .tar(),
        )],
    )
    .unwrap();
    let img2 = s.commit_image(&extra).unwrap();
    // A third module: its layer paths together exceed fsconfig's 256-byte string cap,
    // which only the one-layer-per-option form survives.
    let third = tree_of(
        &s,
        &[(
            TAR,
            Layer::new()
                .file("opt/third", 0o644, b"3")
                .file("etc/hostname", 0o644, b"hidden by the top module\n")
                .tar(),
        )],
    )
    .unwrap();
    let img3 = s.commit_image(&third).unwrap();
    let before = snapshot(s.objects_dir());
    let root_dir = d.path().join("root");
    let union = match mount_union(
        &m,
        &s,
        &[img2, img3, img],
        &d.path().join("work"),
        &Upper::Tmpfs,
        &root_dir,
    ) {
        Ok(u) => u,
        Err(e) => panic!("union mount failed: {}", chain(&e)),
    };
    guard.0.insert(0, root_dir.clone());
    guard.0.insert(1, union.upper.clone());
    for p in union.image_mounts.iter().rev() {
        guard.0.insert(2, p.clone());
    }
    let r = |p: &str| root_dir.join(p);
    assert_eq!(std::fs::read(r("etc/hostname")).unwrap(), b"from-top\n");
    assert_eq!(std::fs::read(r("opt/top")).unwrap(), b"top");
    assert_eq!(std::fs::read(r("opt/third")).unwrap(), b"3");
    assert_eq!(
        std::fs::read(r("big.bin")).unwrap().len(),
        3 * 1024 * 1024 + 17
    );
    std::fs::write(r("etc/new"), b"written").unwrap();
    std::fs::write(r("etc/shadow"), b"changed").unwrap();
    std::fs::set_permissions(r("usr/bin/tool"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::remove_file(r("empty")).unwrap();
    assert_eq!(std::fs::read(r("etc/shadow")).unwrap(), b"changed");
    assert_eq!(
        std::fs::read(r("usr/bin/tool")).unwrap(),
        b"#!/bin/sh\necho tool\n"
    );
    // The lowers did not move: objects, and the module mounted on its own.
    assert_eq!(snapshot(s.objects_dir()), before);
    assert_eq!(
        std::fs::read(at("etc/shadow")).unwrap(),
        b"root:*:1::::::\n"
    );
    assert_eq!(md("usr/bin/tool").mode() & 0o7777, 0o4755);
    assert!(at("empty").exists());
    assert!(union.upper.join("upper/etc/new").exists());
    s.verify_image(&img).unwrap();
    union.unmount(&m).unwrap();
    guard.0.retain(|p| *p == target || *p == imgmnt);
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}
impl FifoLike for std::fs::FileType {
    fn is_fifo_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_fifo(self)
    }
}

#[test]
fn install_checks_the_signed_digest_and_skips_present_images() {
    let (_d, s) = store();
    let layers = sample_layers();
    let want = verity::digest_bytes(&build_image(&tree_of(&store().1, &layers).unwrap()).unwrap());
    let open = |i: usize| Ok((layers[i].0.to_string(), &layers[i].1[..]));
    // A wrong signed digest: refused, nothing recorded.
    let wrong = verity::digest_bytes(b"some other image");
    let err = install_image(&s, &wrong, layers.len(), open).unwrap_err();
    assert_eq!(err.code(), ErrorCode::VerityMismatch, "{err}");
    assert!(!s.has_image(&wrong));
    let r = install_image(&s, &want, layers.len(), open).unwrap();
    // The refused attempt left its (content-named) objects: nothing is stored twice.
    assert!(!r.already_present && r.layers.files > 0);
    assert_eq!(r.layers.new_objects, 0);
    assert!(s.has_image(&want));
    s.verify_image(&want).unwrap();
    // Present: the layers are not even opened.
    let r = install_image(&s, &want, layers.len(), |_| -> Result<(String, &[u8]), _> {
        panic!("layer opened for an installed image")
    })
    .unwrap();
    assert!(r.already_present);
    // A layer the puller cannot open keeps the puller's code.
    let (_d, s) = store();
    let err = install_image(&s, &want, 2, |_| -> Result<(String, &[u8]), _> {
        Err(super::error::CodedStreamError {
            code: ErrorCode::OciNotFound,
            message: "blob 404".into(),
        })
    })
    .unwrap_err();
    assert!(matches!(err, InstallError::Fetch { index: 0, .. }));
    assert_eq!(err.code(), ErrorCode::OciNotFound);
    // An unsafe layer is reported with its index and code.
    let (_d, s) = store();
    let bad = Layer::new().file("../x", 0o644, b"x").tar();
    let err = install_image(&s, &want, 1, |_| Ok((TAR.to_string(), &bad[..]))).unwrap_err();
    assert!(matches!(err, InstallError::Unpack { index: 0, .. }));
    assert_eq!(err.code(), ErrorCode::UnsafePath);
}

#[test]
fn a_flipped_byte_in_the_image_stops_the_mount() {
    let (d, s) = store();
    let img = s
        .commit_image(&tree_of(&s, &sample_layers()).unwrap())
        .unwrap();
    let p = s.image_path(&img);
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[1024 + 40] ^= 1;
    std::fs::write(&p, bytes).unwrap();
    let m = RecordingMounter::default();
    let err = mount_module(
        &m,
        &s,
        &img,
        &d.path().join("i"),
        &d.path().join("t"),
        Restrict::RUNTIME,
    )
    .unwrap_err();
    assert_eq!(err.code(), ErrorCode::VerityMismatch, "{err}");
    assert!(m.calls().is_empty());
}

/// Random trees (odd names that sort around `.` and `..`, deep and wide directories,
/// long symlinks, xattrs big enough to push inodes across block boundaries) survive
/// the writer: checked by path lookups (the kernel's binary search over sorted
/// dirents) on a raw EROFS mount as root, else by `fsck.erofs --extract`.
#[test]
fn random_trees_round_trip_through_the_kernel() {
    use super::tree::{Inode, Meta};
    let (d, s) = store();
    let mut rng = 0x1234_5678_9abc_def1_u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let alphabet: &[u8] = b"!#-.0123456789_abcXYZ~+";
    let mut tree = FsTree::new();
    let mut dirs: Vec<Vec<Vec<u8>>> = vec![vec![]];
    let mut expect: Vec<(Vec<Vec<u8>>, Kind, Meta)> = Vec::new();
    for i in 0..600u64 {
        let parent = dirs[next(dirs.len() as u64) as usize].clone();
        let len = 1 + next(if i % 50 == 0 { 255 } else { 12 }) as usize;
        let mut name: Vec<u8> = (0..len)
            .map(|_| alphabet[next(alphabet.len() as u64) as usize])
            .collect();
        if name == b"." || name == b".." || name.starts_with(b".wh.") {
            name.push(b'x');
        }
        let mut path = parent.clone();
        path.push(name.clone());
        let refs: Vec<&[u8]> = path.iter().map(|c| &c[..]).collect();
        if tree.lookup(&refs).ok().flatten().is_some() {
            continue;
        }
        let mut meta = Meta {
            perm: (next(0o7777) as u32) | 0o400,
            uid: next(70_000) as u32,
            gid: next(70_000) as u32,
            mtime: 1_600_000_000 + next(1_000_000),
            mtime_nsec: next(1_000_000_000) as u32,
            ..Meta::default()
        };
        for k in 0..next(4) {
            let v = pseudo_random(next(if k == 0 { 1500 } else { 40 }) as usize, i * 7 + k);
            meta.xattrs.insert(format!("user.k{k}-{i}").into_bytes(), v);
        }
        let kind = match next(5) {
            0 => {
                dirs.push(path.clone());
                meta.perm |= 0o700;
                Kind::Dir(Default::default())
            }
            1 => Kind::Symlink(vec![b'a' + (i % 26) as u8; 1 + next(4000) as usize]),
            2 => Kind::File {
                size: 0,
                digest: None,
            },
            _ => {
                let data = pseudo_random(1 + next(20_000) as usize, i);
                let ins = s.insert_bytes(&data).unwrap();
                Kind::File {
                    size: ins.size,
                    digest: Some(ins.digest),
                }
            }
        };
        let parent_refs: Vec<&[u8]> = parent.iter().map(|c| &c[..]).collect();
        let pid = tree.lookup(&parent_refs).unwrap().unwrap();
        let id = tree.add_inode(Inode {
            meta: meta.clone(),
            kind: kind.clone(),
        });
        tree.link(pid, &name, id, 1);
        expect.push((path, kind, meta));
    }
    let img = d.path().join("random.img");
    std::fs::write(&img, build_image(&tree).unwrap()).unwrap();
    if let Ok(keep) = std::env::var("COMPOSEFS_KEEP_IMAGE") {
        std::fs::copy(&img, keep).unwrap();
    }

    let (root, _guard): (PathBuf, Option<Box<dyn std::any::Any>>) = if is_root() {
        let at = d.path().join("mnt");
        std::fs::create_dir_all(&at).unwrap();
        let spec = super::mount::MountSpec {
            fstype: "erofs",
            source: Some(img.clone()),
            options: vec![],
            read_only: true,
            target: at.clone(),
            restrict: Default::default(),
        };
        super::mount::Mounter::mount(&KernelMounter, &spec).unwrap();
        struct U(PathBuf);
        impl Drop for U {
            fn drop(&mut self) {
                let _ = super::mount::Mounter::unmount(&KernelMounter, &self.0);
            }
        }
        (at.clone(), Some(Box::new(U(at))))
    } else {
        let fsck = erofs_tool("fsck.erofs");
        let out = d.path().join("out");
        let st = Command::new(fsck)
            .arg(format!("--extract={}", out.display()))
            .arg(&img)
            .status()
            .unwrap();
        assert!(st.success());
        (out, None)
    };
    use std::os::unix::ffi::OsStrExt;
    let raw_mount = is_root();
    for (path, kind, meta) in &expect {
        let mut p = root.clone();
        for c in path {
            p.push(std::ffi::OsStr::from_bytes(c));
        }
        let md = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        match kind {
            Kind::Dir(_) => assert!(md.is_dir()),
            Kind::Symlink(t) => assert_eq!(
                std::fs::read_link(&p).unwrap().as_os_str().as_bytes(),
                &t[..]
            ),
            Kind::File { size, .. } => {
                assert!(md.is_file());
                if raw_mount {
                    assert_eq!(md.len(), *size, "{}", p.display());
                }
            }
            _ => unreachable!(),
        }
        if raw_mount {
            if !matches!(kind, Kind::Symlink(_)) {
                assert_eq!(md.mode() & 0o7777, meta.perm, "{}", p.display());
            }
            assert_eq!((md.uid(), md.gid()), (meta.uid, meta.gid));
            assert_eq!(
                (md.mtime() as u64, md.mtime_nsec() as u32),
                (meta.mtime, meta.mtime_nsec)
            );
            // The VFS hides user.* xattrs on anything but files and directories.
            let user_visible = !matches!(kind, Kind::Symlink(_));
            for (k, v) in meta.xattrs.iter().filter(|_| user_visible) {
                let got = lgetxattr(&p, std::str::from_utf8(k).unwrap());
                assert_eq!(
                    got.as_deref(),
                    Some(&v[..]),
                    "{} {}",
                    p.display(),
                    String::from_utf8_lossy(k)
                );
            }
            if let Kind::File {
                digest: Some(dg), ..
            } = kind
            {
                let redirect = lgetxattr(&p, "trusted.overlay.redirect").unwrap();
                assert_eq!(redirect, super::composefs::redirect_for(dg));
            }
        }
    }
}

/// Benchmark, not a test: `cargo test -p powernode-agent --release --lib
/// unpack_throughput -- --ignored --nocapture`. A 200 MiB module (2,000 files) as one
/// uncompressed / gzip / zstd layer: unpack into a fresh store, build and commit the image.
#[test]
#[ignore]
fn unpack_throughput() {
    let mut layer = Layer::new();
    let mut total = 0usize;
    for i in 0..2000u64 {
        let size = 1024 + (i as usize * 7919) % (200 * 1024);
        let data = pseudo_random(size, i);
        total += size;
        layer = layer.file(&format!("d{}/f{i}", i % 40), 0o644, &data);
    }
    let tar_bytes = layer.tar();
    let gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&tar_bytes).unwrap();
        e.finish().unwrap()
    };
    let zst = zstd::stream::encode_all(&tar_bytes[..], 3).unwrap();
    let mib = total as f64 / (1 << 20) as f64;
    for (mt, blob) in [(TAR, &tar_bytes), (TGZ, &gz), (TZST, &zst)] {
        // UNPACK_BENCH_DIR=/dev/shm takes the disk out of the figure.
        let d = match std::env::var("UNPACK_BENCH_DIR") {
            Ok(dir) => tempfile::tempdir_in(dir).unwrap(),
            Err(_) => tempfile::tempdir().unwrap(),
        };
        let s = ObjectStore::open_with_mode(d.path(), VerityMode::Userspace).unwrap();
        let t = std::time::Instant::now();
        let tree = tree_of(&s, &[(mt, blob.clone())]).unwrap();
        let unpack = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        s.commit_image(&tree).unwrap();
        let image = t.elapsed().as_secs_f64();
        println!(
            "{mt}: {mib:.0} MiB of files, unpack+store {unpack:.2} s ({:.0} MiB/s), image+sync {image:.3} s",
            mib / unpack
        );
    }
}
