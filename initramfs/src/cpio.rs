//! A deterministic newc ("070701") cpio writer, and a reader for checking its output.
//!
//! Determinism: entries in the spec's sorted order, inode numbers assigned 1, 2, ...
//! in that order, uid/gid 0, mtime 0, device numbers 0 (rdev only for device nodes),
//! no hard links. Nothing depends on the host's clock, users or file-system order.

use crate::spec::{Entry, Spec};

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpioError {
    #[error("{0} is larger than newc's 4 GiB limit")]
    TooLarge(String),
    #[error("archive truncated at byte {0}")]
    Truncated(usize),
    #[error("bad magic at byte {0}")]
    BadMagic(usize),
    #[error("bad header field at byte {0}")]
    BadField(usize),
    #[error("archive has no trailer")]
    NoTrailer,
}

fn pad4(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(4), 0);
}

#[allow(clippy::too_many_arguments)]
fn header(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    filesize: u32,
    rdev: (u32, u32),
    name: &str,
) {
    out.extend_from_slice(MAGIC);
    let namesize = name.len() as u32 + 1;
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    for field in [
        ino, mode, 0, 0, nlink, 0, filesize, 0, 0, rdev.0, rdev.1, namesize, 0,
    ] {
        out.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
}

/// Writes the spec as an uncompressed newc archive.
pub fn write_newc(spec: &Spec) -> Result<Vec<u8>, CpioError> {
    let mut out = Vec::new();
    let mut ino: u32 = 0;
    for (name, entry) in spec.entries() {
        ino += 1;
        let too_large = || CpioError::TooLarge(format!("/{name}"));
        match entry {
            Entry::Dir { mode } => {
                header(&mut out, ino, S_IFDIR | (mode & 0o7777), 2, 0, (0, 0), name)
            }
            Entry::File { mode, data } => {
                let size = u32::try_from(data.len()).map_err(|_| too_large())?;
                header(
                    &mut out,
                    ino,
                    S_IFREG | (mode & 0o7777),
                    1,
                    size,
                    (0, 0),
                    name,
                );
                out.extend_from_slice(data);
                pad4(&mut out);
            }
            Entry::Symlink { target } => {
                let size = u32::try_from(target.len()).map_err(|_| too_large())?;
                header(&mut out, ino, S_IFLNK | 0o777, 1, size, (0, 0), name);
                out.extend_from_slice(target.as_bytes());
                pad4(&mut out);
            }
            Entry::CharDev { mode, major, minor } => header(
                &mut out,
                ino,
                S_IFCHR | (mode & 0o7777),
                1,
                0,
                (*major, *minor),
                name,
            ),
        }
    }
    header(&mut out, 0, 0, 1, 0, (0, 0), TRAILER);
    Ok(out)
}

/// One member as read back from an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub ino: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub rdev: (u32, u32),
    pub data: Vec<u8>,
}

/// Parses a newc archive (up to its trailer).
pub fn read_newc(bytes: &[u8]) -> Result<Vec<Member>, CpioError> {
    let mut pos = 0usize;
    let mut members = Vec::new();
    loop {
        let head = bytes.get(pos..pos + 110).ok_or(CpioError::Truncated(pos))?;
        if head.get(..6) != Some(MAGIC.as_slice()) {
            return Err(CpioError::BadMagic(pos));
        }
        let mut fields = [0u32; 13];
        for (i, field) in fields.iter_mut().enumerate() {
            let start = 6 + i * 8;
            let text = head
                .get(start..start + 8)
                .and_then(|t| std::str::from_utf8(t).ok())
                .ok_or(CpioError::BadField(pos + start))?;
            *field = u32::from_str_radix(text, 16).map_err(|_| CpioError::BadField(pos + start))?;
        }
        let [ino, mode, uid, gid, nlink, mtime, filesize, _, _, rmaj, rmin, namesize, _] = fields;
        let name_start = pos + 110;
        let name_bytes = bytes
            .get(name_start..name_start + namesize as usize)
            .ok_or(CpioError::Truncated(name_start))?;
        let name = std::str::from_utf8(
            name_bytes
                .strip_suffix(b"\0")
                .ok_or(CpioError::BadField(name_start))?,
        )
        .map_err(|_| CpioError::BadField(name_start))?
        .to_string();
        let data_start = (name_start + namesize as usize).next_multiple_of(4);
        let data = bytes
            .get(data_start..data_start + filesize as usize)
            .ok_or(CpioError::Truncated(data_start))?
            .to_vec();
        pos = (data_start + filesize as usize).next_multiple_of(4);
        if name == TRAILER {
            return Ok(members);
        }
        members.push(Member {
            name,
            ino,
            mode,
            uid,
            gid,
            nlink,
            mtime,
            rdev: (rmaj, rmin),
            data,
        });
        if pos >= bytes.len() {
            return Err(CpioError::NoTrailer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Spec {
        let mut spec = Spec::new();
        spec.file("/init", 0o755, b"#!init".to_vec()).unwrap();
        spec.char_dev("/dev/console", 0o600, 5, 1).unwrap();
        spec.dir("/proc", 0o555).unwrap();
        spec.symlink("/bin", "usr/bin").unwrap();
        spec.file("/lib/modules/load-order", 0o644, b"a.ko\nb.ko\n".to_vec())
            .unwrap();
        spec
    }

    #[test]
    fn round_trip_keeps_everything_and_zeroes_owners_and_times() {
        let bytes = write_newc(&sample()).unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let members = read_newc(&bytes).unwrap();
        let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "dev",
                "dev/console",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/load-order",
                "proc"
            ]
        );
        for (i, m) in members.iter().enumerate() {
            assert_eq!((m.uid, m.gid, m.mtime), (0, 0, 0));
            assert_eq!(m.ino, i as u32 + 1);
        }
        let by = |n: &str| members.iter().find(|m| m.name == n).unwrap();
        assert_eq!(by("init").mode, 0o100755);
        assert_eq!(by("init").data, b"#!init");
        assert_eq!(by("dev/console").mode, 0o020600);
        assert_eq!(by("dev/console").rdev, (5, 1));
        assert_eq!(by("bin").mode, 0o120777);
        assert_eq!(by("bin").data, b"usr/bin");
        assert_eq!(by("proc").mode, 0o040555);
    }

    #[test]
    fn same_spec_same_bytes_whatever_the_insertion_order() {
        let mut other = Spec::new();
        other
            .file("/lib/modules/load-order", 0o644, b"a.ko\nb.ko\n".to_vec())
            .unwrap();
        other.symlink("/bin", "usr/bin").unwrap();
        other.dir("/proc", 0o555).unwrap();
        other.char_dev("/dev/console", 0o600, 5, 1).unwrap();
        other.file("/init", 0o755, b"#!init".to_vec()).unwrap();
        assert_eq!(write_newc(&sample()).unwrap(), write_newc(&other).unwrap());
    }

    #[test]
    fn damaged_archives_are_errors() {
        let bytes = write_newc(&sample()).unwrap();
        assert!(matches!(
            read_newc(&bytes[..50]),
            Err(CpioError::Truncated(_))
        ));
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(read_newc(&bad), Err(CpioError::BadMagic(0)));
        assert_eq!(
            read_newc(&bytes[..bytes.len() - 124]),
            Err(CpioError::NoTrailer)
        );
        assert!(read_newc(&write_newc(&Spec::new()).unwrap())
            .unwrap()
            .is_empty());
    }

    /// Interop: GNU cpio lists what we wrote (skipped when cpio is not installed).
    #[test]
    fn system_cpio_lists_the_archive() {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let Ok(mut child) = Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        else {
            eprintln!("cpio not installed; skipping");
            return;
        };
        let bytes = write_newc(&sample()).unwrap();
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 8, "{text}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("crw-------") && l.contains("dev/console")),
            "{text}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("-rwxr-xr-x") && l.ends_with(" init")),
            "{text}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("lrwxrwxrwx") && l.contains("bin -> usr/bin")),
            "{text}"
        );
    }
}
