//! `powernode.test_switch_root=1`: the VM tier's check of switch_root itself, with a
//! tmpfs root holding a copy of this init, which reports where it runs
//! ([`switched_root_check`]) and powers off.

use powernode_sysfmt::mountinfo;
use serde_json::json;

use super::error::PhaseError;
use super::state::Boot;
use crate::console::EVENT_PREFIX;
use crate::failure::{self, Outcome};
use crate::layout::{MOUNTINFO, MOUNTINFO_LIMIT};
use crate::switch_root;
use crate::sys::{RebootKind, Sys};

/// Where the test root is mounted, and the flag its init gets.
pub const TEST_ROOT: &str = "/sysroot";
pub const SWITCHED_ROOT_CHECK: &str = "--switched-root-check";

/// `powernode.test_switch_root=1`: a tmpfs root with a copy of this init, then the
/// real switch_root into it. Returns only on failure.
pub fn test_switch_root(boot: &mut Boot<'_>) -> Result<(), PhaseError> {
    let sys = &mut *boot.sys;
    sys.mkdir(TEST_ROOT, 0o755).map_err(PhaseError::TestRoot)?;
    sys.mount(
        "tmpfs",
        TEST_ROOT,
        "tmpfs",
        crate::sys::MountFlags::empty(),
        "mode=0755",
    )
    .map_err(PhaseError::TestRoot)?;
    sys.mkdir(&format!("{TEST_ROOT}/sbin"), 0o755)
        .map_err(PhaseError::TestRoot)?;
    let me = sys
        .read_file(crate::layout::INIT, 64 << 20)
        .map_err(PhaseError::TestRoot)?;
    sys.create_file(&format!("{TEST_ROOT}/sbin/init"), &me, 0o755)
        .map_err(PhaseError::TestRoot)?;
    let timeline = boot.timeline.clone();
    boot.event(json!({"event": "switch_root", "new_root": TEST_ROOT, "timeline": timeline}));
    Err(switch_root::switch_root(boot.sys, TEST_ROOT, "/sbin/init", &[SWITCHED_ROOT_CHECK]).into())
}

/// The test root's init (`--switched-root-check`): report where it runs, power off.
pub fn switched_root_check(sys: &mut dyn Sys) -> Outcome {
    let text = sys
        .read_file(MOUNTINFO, MOUNTINFO_LIMIT)
        .unwrap_or_default();
    let mounts: Vec<_> = mountinfo::entries(&String::from_utf8_lossy(&text))
        .filter_map(Result::ok)
        .collect();
    // As `/proc/self/mounts` shows it: source, mount point, type, options.
    let root = mountinfo::top_at(&mounts, "/")
        .map(|m| {
            format!(
                "{} {} {} {}",
                m.source, m.mount_point, m.fstype, m.mount_options
            )
        })
        .unwrap_or_default();
    let exists = |sys: &mut dyn Sys, p: &str| sys.read_file(p, 1 << 16).is_ok();
    let fields = json!({
        "event": "switched_root",
        "pid": std::process::id(),
        "root_mount": root,
        "initramfs_init_present": exists(sys, crate::layout::INIT),
        "initramfs_load_order_present": exists(sys, crate::layout::MODULE_LOAD_ORDER),
        "proc_mounted": exists(sys, "/proc/self/stat"),
        "at_ms": sys.boot_ms(),
    });
    sys.console(&format!("{EVENT_PREFIX}{fields}"));
    failure::reset(sys, RebootKind::PowerOff)
}
