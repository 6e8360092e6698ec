//! Facts about the node the agent reports upstream, read from the kernel's own
//! tables, so operators and tests never need the console: what `/` is (overlay
//! over composefs once the module root is composed).

use std::path::Path;

use powernode_proto::node::RootFacts;
use powernode_sysfmt::mountinfo;

/// The mount at `/` from mountinfo text: the top of the stack. Options are the
/// per-mount options followed by the superblock options, without repeats. A
/// malformed line is skipped: these facts are a report, not a decision.
pub fn root_facts(text: &str) -> Option<RootFacts> {
    let mounts: Vec<_> = mountinfo::entries(text).filter_map(Result::ok).collect();
    let root = mountinfo::top_at(&mounts, "/")?;
    Some(RootFacts {
        fstype: root.fstype.clone(),
        options: root.all_options().join(","),
        modules: Vec::new(),
        ..RootFacts::default()
    })
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
    fn junk_lines_are_skipped() {
        assert_eq!(root_facts("garbage\n\n - \n1 2 3"), None);
        // A mount point `/x y` is not `/`.
        assert_eq!(root_facts("1 1 0:1 / /x\\040y rw - ext4 /dev/a rw"), None);
        assert!(read_root_facts(Path::new("/nonexistent/mountinfo")).is_none());
    }

    #[test]
    fn this_machine_has_a_root() {
        let f = read_root_facts(Path::new(mountinfo::PATH)).unwrap();
        assert!(!f.fstype.is_empty());
    }
}
