//! Facts about the node the agent reports upstream, read from the kernel's own
//! tables, so operators and tests never need the console: what `/` is (overlay
//! over composefs once the module root is composed).

use std::path::Path;

use powernode_proto::node::RootFacts;

pub const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            // Three octal digits follow a real escape; anything else is literal.
            if let Some(oct) = s.get(i + 1..i + 4) {
                if oct.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
                    if let Ok(v) = u8::from_str_radix(oct, 8) {
                        out.push(v);
                        i += 4;
                        continue;
                    }
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount at `/` from mountinfo text: the last one listed wins (it is the top
/// of the stack). Options are the per-mount options followed by the superblock
/// options, without repeats.
pub fn root_facts(mountinfo: &str) -> Option<RootFacts> {
    let mut found = None;
    for line in mountinfo.lines() {
        let mut halves = line.splitn(2, " - ");
        let (Some(left), Some(right)) = (halves.next(), halves.next()) else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (Some(mount_point), Some(mount_opts)) = (left.get(4), left.get(5)) else {
            continue;
        };
        if unescape(mount_point) != "/" {
            continue;
        }
        let Some(fstype) = right.first() else {
            continue;
        };
        let mut options: Vec<String> = Vec::new();
        for opt in mount_opts
            .split(',')
            .chain(right.get(2).copied().unwrap_or("").split(','))
        {
            let opt = unescape(opt);
            if !opt.is_empty() && !options.contains(&opt) {
                options.push(opt);
            }
        }
        found = Some(RootFacts {
            fstype: fstype.to_string(),
            options: options.join(","),
            modules: Vec::new(),
            ..RootFacts::default()
        });
    }
    found
}

/// Reads [`root_facts`] from a mountinfo file; `None` if unreadable or no `/`.
pub fn read_root_facts(path: &Path) -> Option<RootFacts> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| root_facts(&t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_of_the_stack_wins() {
        let text = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
40 27 0:35 / /run rw,nosuid - tmpfs tmpfs rw,mode=755
41 1 0:36 / / ro,relatime - overlay overlay ro,lowerdir=/a::/b,metacopy=on,redirect_dir=on,verity=require
";
        let f = root_facts(text).unwrap();
        assert_eq!(f.fstype, "overlay");
        assert_eq!(
            f.options,
            "ro,relatime,lowerdir=/a::/b,metacopy=on,redirect_dir=on,verity=require"
        );
    }

    #[test]
    fn escapes_and_junk() {
        assert_eq!(unescape("a\\040b"), "a b");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
        assert_eq!(unescape("\\"), "\\");
        assert_eq!(root_facts("garbage\n\n - \n1 2 3"), None);
        // A mount point `/x y` is not `/`.
        assert_eq!(root_facts("1 1 0:1 / /x\\040y rw - ext4 /dev/a rw"), None);
        assert!(read_root_facts(Path::new("/nonexistent/mountinfo")).is_none());
    }

    #[test]
    fn this_machine_has_a_root() {
        let f = read_root_facts(Path::new(MOUNTINFO)).unwrap();
        assert!(!f.fstype.is_empty());
    }
}
