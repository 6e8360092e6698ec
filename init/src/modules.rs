//! Loads the kernel modules shipped in the initramfs, in the order the builder wrote
//! to [`layout::MODULE_LOAD_ORDER`] (dependencies first). The builder decompressed
//! them, so each is a plain ELF handed to `finit_module`.

use crate::layout;
use crate::sys::{Errno, ModuleSysError, Sys};

/// The load-order file is a few hundred bytes; anything near this is not ours.
const MAX_LOAD_ORDER: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModuleError {
    #[error("cannot read the module load order {path}")]
    LoadOrder {
        path: &'static str,
        #[source]
        errno: Errno,
    },
    #[error("load order names {0:?}, which is not a plain `NAME.ko` file name")]
    BadName(String),
    #[error("module file {path} is missing from the initramfs")]
    Missing { path: String },
    #[error("cannot open module file {path}")]
    Open {
        path: String,
        #[source]
        errno: Errno,
    },
    #[error("the kernel refused module {name} (bad ELF, wrong kernel or a missing dependency)")]
    Rejected {
        name: String,
        #[source]
        errno: Errno,
    },
    #[error("the kernel refused module {name}: its signature is not trusted")]
    SignatureRejected {
        name: String,
        #[source]
        errno: Errno,
    },
    #[error("loading module {name} failed")]
    Load {
        name: String,
        #[source]
        errno: Errno,
    },
}

/// What happened to each module.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub loaded: Vec<String>,
    /// Already in the kernel (`EEXIST`): a retried phase, or built in after all.
    pub already: Vec<String>,
    /// Milliseconds each `finit_module` took (module init runs inside the call, so
    /// this includes probing its devices), in load order.
    pub ms: Vec<(String, u64)>,
}

/// Parses the load-order file: one `NAME.ko` per line, blank lines and `#` comments
/// ignored.
pub fn parse_load_order(text: &str) -> Result<Vec<String>, ModuleError> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let ok = l.ends_with(".ko")
                && l.len() > 3
                && !l.contains('/')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
            if ok {
                Ok(l.to_string())
            } else {
                Err(ModuleError::BadName(l.to_string()))
            }
        })
        .collect()
}

pub fn load_one(sys: &mut dyn Sys, file: &str, report: &mut LoadReport) -> Result<(), ModuleError> {
    let path = format!("{}/{file}", layout::MODULE_DIR);
    let name = file.trim_end_matches(".ko").to_string();
    let start = sys.boot_ms();
    let result = sys.finit_module(&path);
    let took = sys.boot_ms().saturating_sub(start);
    report.ms.push((name.clone(), took));
    match result {
        Ok(()) => report.loaded.push(name),
        Err(ModuleSysError::Load(Errno::EXIST)) => report.already.push(name),
        Err(ModuleSysError::Open(Errno::NOENT)) => return Err(ModuleError::Missing { path }),
        Err(ModuleSysError::Open(errno)) => return Err(ModuleError::Open { path, errno }),
        Err(ModuleSysError::Load(errno @ (Errno::NOEXEC | Errno::NOENT | Errno::INVAL))) => {
            return Err(ModuleError::Rejected { name, errno })
        }
        Err(ModuleSysError::Load(errno @ (Errno::KEYREJECTED | Errno::PERM))) => {
            return Err(ModuleError::SignatureRejected { name, errno })
        }
        Err(ModuleSysError::Load(errno)) => return Err(ModuleError::Load { name, errno }),
    }
    Ok(())
}

/// Loads every module named by the load-order file, in order.
pub fn load_all(sys: &mut dyn Sys) -> Result<LoadReport, ModuleError> {
    let text = sys
        .read_file(layout::MODULE_LOAD_ORDER, MAX_LOAD_ORDER)
        .map_err(|errno| ModuleError::LoadOrder {
            path: layout::MODULE_LOAD_ORDER,
            errno,
        })?;
    let order = parse_load_order(&String::from_utf8_lossy(&text))?;
    let mut report = LoadReport::default();
    for file in &order {
        load_one(sys, file, &mut report)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::FakeSys;

    #[test]
    fn load_order_is_validated() {
        assert_eq!(
            parse_load_order("# closure\nfailover.ko\n\nvirtio_net.ko\n").unwrap(),
            ["failover.ko", "virtio_net.ko"]
        );
        assert!(matches!(
            parse_load_order("../evil.ko"),
            Err(ModuleError::BadName(_))
        ));
        assert!(matches!(
            parse_load_order("x.ko.xz"),
            Err(ModuleError::BadName(_))
        ));
    }

    #[test]
    fn loads_in_order_and_already_loaded_is_fine() {
        let mut sys = FakeSys::default().with_file(layout::MODULE_LOAD_ORDER, "a.ko\nb.ko\n");
        sys.module_errors.insert(
            "/lib/modules/a.ko".into(),
            ModuleSysError::Load(Errno::EXIST),
        );
        let report = load_all(&mut sys).unwrap();
        assert_eq!(sys.modules(), ["/lib/modules/a.ko", "/lib/modules/b.ko"]);
        assert_eq!(report.already, ["a"]);
        assert_eq!(report.loaded, ["b"]);
        // The fake clock advances 5 ms per load.
        assert_eq!(report.ms, [("a".to_string(), 5), ("b".to_string(), 5)]);
    }

    #[test]
    fn errors_are_typed_and_stop_the_load() {
        let cases = [
            (ModuleSysError::Open(Errno::NOENT), "Missing"),
            (ModuleSysError::Open(Errno::ACCESS), "Open"),
            (ModuleSysError::Load(Errno::NOEXEC), "Rejected"),
            (
                ModuleSysError::Load(Errno::KEYREJECTED),
                "SignatureRejected",
            ),
            (ModuleSysError::Load(Errno::NOMEM), "Load"),
        ];
        for (err, want) in cases {
            let mut sys = FakeSys::default().with_file(layout::MODULE_LOAD_ORDER, "a.ko\nb.ko\n");
            sys.module_errors.insert("/lib/modules/a.ko".into(), err);
            let got = load_all(&mut sys).unwrap_err();
            assert!(format!("{got:?}").starts_with(want), "{got:?} for {err:?}");
            assert_eq!(
                sys.modules(),
                ["/lib/modules/a.ko"],
                "stops at the first failure"
            );
        }
        let mut sys = FakeSys::default();
        assert!(matches!(
            load_all(&mut sys),
            Err(ModuleError::LoadOrder {
                errno: Errno::NOENT,
                ..
            })
        ));
    }
}
