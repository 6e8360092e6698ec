//! `/proc/self/mountinfo` (proc(5)): one mount a line,
//! `ID PARENT MAJOR:MINOR ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS`.
//!
//! Paths are unescaped (the kernel writes a space as `\040`); a malformed line is an
//! error naming the line and the field, never skipped silently. [`entries`] yields a
//! result per line for callers that report what they can and log the rest.

/// Where the kernel lists this process's mounts.
pub const PATH: &str = "/proc/self/mountinfo";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MountInfoError {
    #[error("mountinfo line {line}: no {field}")]
    Missing { line: usize, field: &'static str },
    #[error("mountinfo line {line}: no ` - ` separator after the optional fields")]
    NoSeparator { line: usize },
    #[error("mountinfo line {line}: {field} {value:?} is not a number")]
    Number {
        line: usize,
        field: &'static str,
        value: String,
        #[source]
        source: std::num::ParseIntError,
    },
    #[error("mountinfo line {line}: {field} has a bad escape (want \\ and three octal digits)")]
    Escape { line: usize, field: &'static str },
    #[error("mountinfo line {line}: {field} is not UTF-8 once unescaped")]
    NotUtf8 { line: usize, field: &'static str },
}

/// One line of mountinfo, paths unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub id: u32,
    pub parent: u32,
    pub major: u32,
    pub minor: u32,
    /// The root of the mount within its filesystem.
    pub root: String,
    pub mount_point: String,
    /// Per-mount options (`rw,nosuid,relatime`).
    pub mount_options: String,
    /// Optional fields (`shared:1`, `master:2`), possibly none.
    pub optional: Vec<String>,
    pub fstype: String,
    pub source: String,
    /// Per-superblock options, as the kernel wrote them.
    pub super_options: String,
}

/// Whether a comma-separated option list holds `name` exactly.
fn has_option(options: &str, name: &str) -> bool {
    options.split(',').any(|o| o == name)
}

impl MountEntry {
    /// Read-only for this mount or for its whole superblock.
    pub fn read_only(&self) -> bool {
        has_option(&self.mount_options, "ro") || has_option(&self.super_options, "ro")
    }

    pub fn is_overlay(&self) -> bool {
        self.fstype == "overlay"
    }

    /// The per-mount options, then the superblock's, each once, in that order.
    pub fn all_options(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for opt in self
            .mount_options
            .split(',')
            .chain(self.super_options.split(','))
        {
            if !opt.is_empty() && !out.contains(&opt) {
                out.push(opt);
            }
        }
        out
    }
}

/// Undoes the kernel's octal escapes (`\040` space, `\011` tab, `\012` newline,
/// `\134` backslash); any other backslash is an error.
fn unescape(line: usize, field: &'static str, text: &str) -> Result<String, MountInfoError> {
    let bad = || MountInfoError::Escape { line, field };
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        let mut value: u32 = 0;
        for _ in 0..3 {
            let digit = bytes.next().ok_or_else(bad)?;
            if !(b'0'..=b'7').contains(&digit) {
                return Err(bad());
            }
            value = value * 8 + u32::from(digit - b'0');
        }
        out.push(u8::try_from(value).map_err(|_| bad())?);
    }
    String::from_utf8(out).map_err(|_| MountInfoError::NotUtf8 { line, field })
}

/// Parses line number `line` (1-based, for the error) of mountinfo.
pub fn parse_line(line: usize, text: &str) -> Result<MountEntry, MountInfoError> {
    let mut fields = text.split(' ');
    let mut next = |field: &'static str| {
        fields
            .next()
            .filter(|f| !f.is_empty())
            .ok_or(MountInfoError::Missing { line, field })
    };
    let number = |field: &'static str, value: &str| {
        value
            .parse::<u32>()
            .map_err(|source| MountInfoError::Number {
                line,
                field,
                value: value.to_string(),
                source,
            })
    };
    let id = number("mount id", next("mount id")?)?;
    let parent = number("parent id", next("parent id")?)?;
    let dev = next("major:minor")?;
    let (major, minor) = dev.split_once(':').ok_or(MountInfoError::Missing {
        line,
        field: "minor device number",
    })?;
    let (major, minor) = (number("major", major)?, number("minor", minor)?);
    let root = unescape(line, "root", next("root")?)?;
    let mount_point = unescape(line, "mount point", next("mount point")?)?;
    let mount_options = next("mount options")?.to_string();
    let mut optional = Vec::new();
    loop {
        match fields.next() {
            Some("-") => break,
            Some(f) if !f.is_empty() => optional.push(f.to_string()),
            _ => return Err(MountInfoError::NoSeparator { line }),
        }
    }
    let mut next = |field: &'static str| {
        fields
            .next()
            .filter(|f| !f.is_empty())
            .ok_or(MountInfoError::Missing { line, field })
    };
    let fstype = unescape(line, "filesystem type", next("filesystem type")?)?;
    // A source may be empty in principle (`none` is what the kernel writes for no
    // device, but a FUSE or bind source can be anything): it is still a field.
    let source = unescape(line, "source", next("source")?)?;
    let super_options = next("super options")?.to_string();
    Ok(MountEntry {
        id,
        parent,
        major,
        minor,
        root,
        mount_point,
        mount_options,
        optional,
        fstype,
        source,
        super_options,
    })
}

/// One result per non-empty line, in the kernel's order (later mounts last).
pub fn entries(text: &str) -> impl Iterator<Item = Result<MountEntry, MountInfoError>> + '_ {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| parse_line(i + 1, l))
}

/// Parses the whole table; the first malformed line is the error.
pub fn parse(text: &str) -> Result<Vec<MountEntry>, MountInfoError> {
    entries(text).collect()
}

/// The mount in effect at `mount_point`: the last one listed there (mounts stack,
/// and the kernel lists the upper one later).
pub fn top_at<'a>(mounts: &'a [MountEntry], mount_point: &str) -> Option<&'a MountEntry> {
    mounts.iter().rev().find(|m| m.mount_point == mount_point)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw
30 1 0:26 / / rw,relatime - tmpfs rootfs rw,size=10k
41 30 7:0 / /persist/m\\040a ro,relatime shared:9 master:2 - erofs /dev/loop0 ro,user_xattr
42 30 0:40 / / rw,relatime - overlay overlay rw,lowerdir=/a,upperdir=/b
";

    #[test]
    fn a_table_parses_with_optional_fields_and_escapes() {
        let m = parse(TABLE).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].optional, ["shared:5"]);
        assert_eq!(m[2].optional, ["shared:9", "master:2"]);
        // The copies that split on spaces without unescaping saw `/persist/m\040a`.
        assert_eq!(m[2].mount_point, "/persist/m a");
        assert_eq!((m[2].major, m[2].minor), (7, 0));
        assert_eq!(m[2].source, "/dev/loop0");
        assert!(m[2].read_only());
        assert!(!m[1].read_only());
    }

    #[test]
    fn the_last_mount_at_a_point_is_the_one_in_effect() {
        let m = parse(TABLE).unwrap();
        assert_eq!(top_at(&m, "/").unwrap().fstype, "overlay");
        assert_eq!(top_at(&m, "/proc").unwrap().id, 22);
        assert!(top_at(&m, "/nowhere").is_none());
    }

    #[test]
    fn options_merge_without_repeats() {
        let m = parse(TABLE).unwrap();
        assert_eq!(
            m[2].all_options(),
            ["ro", "relatime", "user_xattr"],
            "mount then superblock options, each once"
        );
        assert!(has_option("rw,ro", "ro") && !has_option("rw,nosuid", "ro"));
    }

    #[test]
    fn the_proc5_example_line_parses() {
        let e = parse_line(
            1,
            "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue",
        )
        .unwrap();
        assert_eq!(
            e,
            MountEntry {
                id: 36,
                parent: 35,
                major: 98,
                minor: 0,
                root: "/mnt1".into(),
                mount_point: "/mnt2".into(),
                mount_options: "rw,noatime".into(),
                optional: vec!["master:1".into()],
                fstype: "ext3".into(),
                source: "/dev/root".into(),
                super_options: "rw,errors=continue".into(),
            }
        );
    }

    #[test]
    fn optional_fields_may_be_none_or_many() {
        let none = parse_line(1, "26 21 254:0 / /persist rw,relatime - ext4 /dev/vda rw").unwrap();
        assert!(none.optional.is_empty());
        assert_eq!(none.fstype, "ext4");
        let many = parse_line(
            1,
            "40 26 0:40 / /x rw shared:2 master:1 propagate_from:1 unbindable - tmpfs tmpfs rw",
        )
        .unwrap();
        assert_eq!(
            many.optional,
            ["shared:2", "master:1", "propagate_from:1", "unbindable"]
        );
        assert_eq!(many.source, "tmpfs");
    }

    #[test]
    fn escaped_paths_are_unescaped() {
        let e = parse_line(
            1,
            r"30 26 7:3 /a\134b /mnt/my\040disk\011tab rw - ext4 /dev/disk/by-label/x\040y rw",
        )
        .unwrap();
        assert_eq!(e.root, r"/a\b");
        assert_eq!(e.mount_point, "/mnt/my disk\ttab");
        assert_eq!(e.source, "/dev/disk/by-label/x y");
    }

    #[test]
    fn malformed_lines_are_typed_errors() {
        let cases: &[(&str, MountInfoError)] = &[
            (
                "",
                MountInfoError::Missing {
                    line: 3,
                    field: "mount id",
                },
            ),
            (
                "26 21 254:0 / /persist rw,relatime ext4 /dev/vda rw",
                MountInfoError::NoSeparator { line: 3 },
            ),
            (
                "26 21 254:0 / /persist rw",
                MountInfoError::NoSeparator { line: 3 },
            ),
            (
                "26 21 254:0 / /persist rw -",
                MountInfoError::Missing {
                    line: 3,
                    field: "filesystem type",
                },
            ),
            (
                "26 21 254:0 / /persist rw - ext4 /dev/vda",
                MountInfoError::Missing {
                    line: 3,
                    field: "super options",
                },
            ),
            (
                "26 21 254 / /persist rw - ext4 /dev/vda rw",
                MountInfoError::Missing {
                    line: 3,
                    field: "minor device number",
                },
            ),
            (
                "26 21 254:0 /  rw - ext4 /dev/vda rw",
                MountInfoError::Missing {
                    line: 3,
                    field: "mount point",
                },
            ),
            (
                r"26 21 254:0 / /a\04 rw - ext4 /dev/vda rw",
                MountInfoError::Escape {
                    line: 3,
                    field: "mount point",
                },
            ),
            (
                r"26 21 254:0 / /a\9ab rw - ext4 /dev/vda rw",
                MountInfoError::Escape {
                    line: 3,
                    field: "mount point",
                },
            ),
            (
                r"26 21 254:0 / /a\777 rw - ext4 /dev/vda rw",
                MountInfoError::Escape {
                    line: 3,
                    field: "mount point",
                },
            ),
            (
                r"26 21 254:0 / /a\377 rw - ext4 /dev/vda rw",
                MountInfoError::NotUtf8 {
                    line: 3,
                    field: "mount point",
                },
            ),
        ];
        for (line, want) in cases {
            assert_eq!(parse_line(3, line).unwrap_err(), *want, "{line:?}");
        }
        let err = parse_line(3, "x 21 254:0 / /persist rw - ext4 /dev/vda rw").unwrap_err();
        assert!(
            matches!(&err, MountInfoError::Number { field: "mount id", value, .. } if value == "x"),
            "{err:?}"
        );
        // The cause is kept as the source, not repeated in the message.
        assert!(std::error::Error::source(&err).is_some());
        let err = parse_line(3, "1 2 254:-1 / /p rw - ext4 /dev/vda rw").unwrap_err();
        assert!(
            matches!(err, MountInfoError::Number { field: "minor", .. }),
            "{err:?}"
        );
    }

    #[test]
    fn the_whole_table_names_its_first_bad_line() {
        let text = "26 21 254:0 / /persist rw - ext4 /dev/vda rw\n\
                    27 26 7:0 / /a rw no-separator\n";
        assert_eq!(
            parse(text).unwrap_err(),
            MountInfoError::NoSeparator { line: 2 }
        );
        assert_eq!(parse("").unwrap(), []);
    }

    #[test]
    fn entries_report_each_line_and_skip_blank_ones() {
        let text =
            "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n\nbroken\n2 1 0:5 / /proc rw - proc proc rw\n";
        let got: Vec<_> = entries(text).collect();
        assert_eq!(got.len(), 3);
        assert!(got[0].is_ok() && got[2].is_ok());
        assert!(matches!(
            got[1],
            Err(MountInfoError::Number { line: 3, .. })
        ));
        assert!(parse(text).is_err());
        assert_eq!(parse("").unwrap(), []);
    }
}
