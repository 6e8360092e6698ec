//! The build: pinned kernel + module closure + init (+ agent) -> `vmlinuz`,
//! `initramfs.img`, `cmdline` and `manifest.json` in the output folder (the folder
//! that `POWERNODE_IMAGE_BASE` points at).

use std::fs;
use std::path::{Path, PathBuf};

use powernode_init::layout;
use powernode_init::modules::{device_bus, LoadEntry, When};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::compress::{compress, Compression};
use crate::kernel::{self, KernelError, KernelPin};
use crate::modules::{normalize, Closure, ModuleError, ModuleTree};
use crate::spec::{Spec, SpecError};
use crate::{cpio, elf};

/// Kernel arguments the image needs whatever boots it; the VM runner adds its own.
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=-1";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Modules(#[from] ModuleError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Cpio(#[from] cpio::CpioError),
    #[error("{path} cannot be the init: {reason}")]
    BadInit { path: PathBuf, reason: String },
    #[error("{path} is not a module trust key: {reason}")]
    BadTrustKey { path: PathBuf, reason: String },
    #[error("compressing the initramfs")]
    Compress(#[source] std::io::Error),
    #[error("I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub init: PathBuf,
    pub agent: Option<PathBuf>,
    /// Module trust keys (PEM public keys, e.g. `cosign.pub`) built in: the node pins
    /// these and nothing else, whatever its identity document says.
    pub trust_keys: Vec<PathBuf>,
    pub out: PathBuf,
    pub cache: PathBuf,
    /// `scripts/debs`, used when the kernel package is not cached yet.
    pub debs_script: PathBuf,
    pub pin: KernelPin,
    pub compression: Compression,
}

/// What was built, also written as `manifest.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    pub kernel_package: String,
    pub kernel_version: String,
    pub kernel_release: String,
    pub kernel_deb_sha256: String,
    pub compression: Compression,
    /// Load order, dependencies first.
    pub modules: Vec<String>,
    /// The lines of the init's load-order file (when each module is loaded).
    pub load_order: Vec<String>,
    /// Requested modules that this kernel has built in.
    pub builtin: Vec<String>,
    pub init_sha256: String,
    pub init_bytes: u64,
    pub agent_sha256: Option<String>,
    /// The built-in module trust keys, as files.
    pub module_trust_keys_sha256: Vec<String>,
    pub vmlinuz_sha256: String,
    pub initramfs_sha256: String,
    pub initramfs_bytes: u64,
    pub initramfs_uncompressed_bytes: u64,
    pub cmdline: String,
}

#[derive(Debug, Clone)]
pub struct BuildOutput {
    pub vmlinuz: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: PathBuf,
    pub manifest: Manifest,
}

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The init's load order for `closure`: requested modules named in `on_demand`
/// wait to be asked for; other requested modules with device aliases load only when
/// such a device is present; other requested modules load at boot; dependencies load
/// with whatever needs them.
pub fn load_entries(closure: &Closure, on_demand: &[String]) -> Vec<LoadEntry> {
    closure
        .modules
        .iter()
        .map(|m| {
            let matches: Vec<String> = m
                .aliases
                .iter()
                .filter(|a| device_bus(a).is_some())
                .cloned()
                .collect();
            let when = if !m.requested || on_demand.iter().any(|d| normalize(d) == m.name) {
                When::Demand
            } else if !matches.is_empty() {
                When::Device
            } else {
                When::Boot
            };
            LoadEntry {
                name: m.name.clone(),
                when,
                deps: m.deps.clone(),
                matches: if when == When::Device {
                    matches
                } else {
                    Vec::new()
                },
            }
        })
        .collect()
}

/// The initramfs contents, from bytes only (so it is testable without a kernel).
pub fn initramfs_spec(
    init: &[u8],
    agent: Option<&[u8]>,
    closure: &Closure,
    on_demand: &[String],
) -> Result<Spec, SpecError> {
    let mut spec = Spec::new();
    for dir in layout::MOUNT_POINTS {
        spec.dir(dir, 0o755)?;
    }
    let (major, minor) = layout::CONSOLE_DEV;
    spec.char_dev(layout::CONSOLE, 0o600, major, minor)?;
    spec.file(layout::INIT, 0o755, init.to_vec())?;
    if let Some(agent) = agent {
        spec.file(layout::AGENT, 0o755, agent.to_vec())?;
    }
    spec.dir(layout::MODULE_DIR, 0o755)?;
    let mut order = String::from("# NAME.ko when=boot|device|demand [deps=A,B] [match=ALIAS]...\n");
    for (module, entry) in closure.modules.iter().zip(load_entries(closure, on_demand)) {
        spec.file(
            &format!("{}/{}", layout::MODULE_DIR, entry.file()),
            0o644,
            module.elf.clone(),
        )?;
        order.push_str(&entry.to_string());
        order.push('\n');
    }
    spec.file(layout::MODULE_LOAD_ORDER, 0o644, order.into_bytes())?;
    Ok(spec)
}

/// Builds the module trust keys in, as `BUILTIN_TRUST_KEYS/NN.pem` in the order given.
pub fn add_trust_keys(spec: &mut Spec, keys: &[Vec<u8>]) -> Result<(), SpecError> {
    if keys.is_empty() {
        return Ok(());
    }
    spec.dir(layout::BUILTIN_TRUST_KEYS, 0o755)?;
    for (i, key) in keys.iter().enumerate() {
        let path = format!("{}/{i:02}.pem", layout::BUILTIN_TRUST_KEYS);
        spec.file(&path, 0o644, key.clone())?;
    }
    Ok(())
}

/// A key file must hold one PEM `PUBLIC KEY` block (what `cosign generate-key-pair`
/// writes); the node checks the curve when it verifies.
fn check_trust_key(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    let bad = |reason: &str| BuildError::BadTrustKey {
        path: path.to_path_buf(),
        reason: reason.into(),
    };
    let text = std::str::from_utf8(bytes).map_err(|_| bad("not text"))?;
    if !text.contains("-----BEGIN PUBLIC KEY-----") || !text.contains("-----END PUBLIC KEY-----") {
        return Err(bad("no PEM PUBLIC KEY block"));
    }
    Ok(())
}

fn check_init(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    let bad = |reason: String| BuildError::BadInit {
        path: path.to_path_buf(),
        reason,
    };
    match elf::interpreter(bytes) {
        Ok(None) => Ok(()),
        Ok(Some(interp)) => Err(bad(format!(
            "it is dynamically linked (interpreter {interp}); build it for x86_64-unknown-linux-musl"
        ))),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// Writes `data` to `path` through a temporary file, so readers never see half a file.
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), BuildError> {
    let tmp = path.with_extension("partial");
    fs::write(&tmp, data).map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

pub fn build(opts: &BuildOptions) -> Result<BuildOutput, BuildError> {
    let init = fs::read(&opts.init).map_err(io(&opts.init))?;
    check_init(&opts.init, &init)?;
    let agent = match &opts.agent {
        Some(p) => Some(fs::read(p).map_err(io(p))?),
        None => None,
    };
    let tree = kernel::ensure_kernel(&opts.pin, &opts.cache, &opts.debs_script)?;
    let modules = ModuleTree::open(&tree.modules_dir(), &opts.pin.release)?;
    let closure = modules.closure(&opts.pin.modules)?;
    let trust_keys = opts
        .trust_keys
        .iter()
        .map(|p| {
            let bytes = fs::read(p).map_err(io(p))?;
            check_trust_key(p, &bytes)?;
            Ok(bytes)
        })
        .collect::<Result<Vec<_>, BuildError>>()?;
    let mut spec = initramfs_spec(&init, agent.as_deref(), &closure, &opts.pin.on_demand)?;
    add_trust_keys(&mut spec, &trust_keys)?;
    let archive = cpio::write_newc(&spec)?;
    let compressed = compress(&archive, opts.compression).map_err(BuildError::Compress)?;
    let vmlinuz_src = tree.vmlinuz();
    let vmlinuz = fs::read(&vmlinuz_src).map_err(io(&vmlinuz_src))?;

    fs::create_dir_all(&opts.out).map_err(io(&opts.out))?;
    let out = BuildOutput {
        vmlinuz: opts.out.join("vmlinuz"),
        initramfs: opts.out.join("initramfs.img"),
        cmdline: opts.out.join("cmdline"),
        manifest: Manifest {
            kernel_package: opts.pin.package.clone(),
            kernel_version: opts.pin.version.clone(),
            kernel_release: opts.pin.release.clone(),
            kernel_deb_sha256: opts.pin.deb_sha256.clone(),
            compression: opts.compression,
            modules: closure.modules.iter().map(|m| m.name.clone()).collect(),
            load_order: load_entries(&closure, &opts.pin.on_demand)
                .iter()
                .map(ToString::to_string)
                .collect(),
            builtin: closure.builtin.clone(),
            init_sha256: sha256(&init),
            init_bytes: init.len() as u64,
            agent_sha256: agent.as_deref().map(sha256),
            module_trust_keys_sha256: trust_keys.iter().map(|k| sha256(k)).collect(),
            vmlinuz_sha256: sha256(&vmlinuz),
            initramfs_sha256: sha256(&compressed),
            initramfs_bytes: compressed.len() as u64,
            initramfs_uncompressed_bytes: archive.len() as u64,
            cmdline: BASE_CMDLINE.to_string(),
        },
    };
    write_atomic(&out.vmlinuz, &vmlinuz)?;
    write_atomic(&out.initramfs, &compressed)?;
    write_atomic(&out.cmdline, format!("{BASE_CMDLINE}\n").as_bytes())?;
    let manifest_path = opts.out.join("manifest.json");
    let json = serde_json::to_vec_pretty(&out.manifest).map_err(|e| BuildError::Io {
        path: manifest_path.clone(),
        source: e.into(),
    })?;
    write_atomic(&manifest_path, &json)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modules::ResolvedModule;

    #[test]
    fn trust_keys_are_built_in_and_checked() {
        let pem = b"-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----\n".to_vec();
        let mut spec = initramfs_spec(b"INIT", None, &closure(), &[]).unwrap();
        add_trust_keys(&mut spec, &[pem.clone(), pem.clone()]).unwrap();
        for i in ["00", "01"] {
            let path = format!("{}/{i}.pem", layout::BUILTIN_TRUST_KEYS);
            assert!(spec.get(&path).is_some(), "{path}");
        }
        check_trust_key(Path::new("k.pub"), &pem).unwrap();
        let e = check_trust_key(Path::new("k.key"), b"-----BEGIN PRIVATE KEY-----").unwrap_err();
        assert!(
            e.to_string().contains("k.key is not a module trust key"),
            "{e}"
        );
        // No keys: no folder, the image stays byte for byte what it was.
        let mut plain = initramfs_spec(b"INIT", None, &closure(), &[]).unwrap();
        add_trust_keys(&mut plain, &[]).unwrap();
        assert!(plain.get(layout::BUILTIN_TRUST_KEYS).is_none());
    }

    fn closure() -> Closure {
        Closure {
            modules: vec![
                ResolvedModule {
                    name: "failover".into(),
                    source: "kernel/net/core/failover.ko.xz".into(),
                    elf: b"\x7fELF-failover".to_vec(),
                    deps: Vec::new(),
                    aliases: Vec::new(),
                    requested: false,
                },
                ResolvedModule {
                    name: "virtio_net".into(),
                    source: "kernel/drivers/net/virtio_net.ko.xz".into(),
                    elf: b"\x7fELF-virtio_net".to_vec(),
                    deps: vec!["failover".into()],
                    aliases: vec!["virtio:d00000001v*".into()],
                    requested: true,
                },
                ResolvedModule {
                    name: "overlay".into(),
                    source: "kernel/fs/overlayfs/overlay.ko.xz".into(),
                    elf: b"\x7fELF-overlay".to_vec(),
                    deps: Vec::new(),
                    aliases: vec!["fs-overlay".into()],
                    requested: true,
                },
                ResolvedModule {
                    name: "loop".into(),
                    source: "kernel/drivers/block/loop.ko.xz".into(),
                    elf: b"\x7fELF-loop".to_vec(),
                    deps: Vec::new(),
                    aliases: vec!["devname:loop-control".into()],
                    requested: true,
                },
            ],
            builtin: vec!["ext4".into()],
        }
    }

    #[test]
    fn spec_has_init_console_modules_and_load_order() {
        let spec =
            initramfs_spec(b"INIT", Some(b"AGENT"), &closure(), &["overlay".into()]).unwrap();
        let archive = cpio::write_newc(&spec).unwrap();
        let members = cpio::read_newc(&archive).unwrap();
        let by = |n: &str| {
            members
                .iter()
                .find(|m| m.name == n)
                .unwrap_or_else(|| panic!("{n}"))
        };
        assert_eq!(by("init").data, b"INIT");
        assert_eq!(by("init").mode, 0o100755);
        assert_eq!(by("usr/bin/powernode-agent").data, b"AGENT");
        assert_eq!(by("dev/console").rdev, (5, 1));
        assert_eq!(
            by("lib/modules/load-order").data,
            "# NAME.ko when=boot|device|demand [deps=A,B] [match=ALIAS]...\n\
             failover.ko when=demand\n\
             virtio_net.ko when=device deps=failover match=virtio:d00000001v*\n\
             overlay.ko when=demand\n\
             loop.ko when=boot\n"
                .as_bytes()
        );
        // What the init reads back.
        let entries = powernode_init::modules::parse_load_order(
            std::str::from_utf8(&by("lib/modules/load-order").data).unwrap(),
        )
        .unwrap();
        assert_eq!(entries, load_entries(&closure(), &["overlay".into()]));
        assert_eq!(by("lib/modules/virtio_net.ko").data, b"\x7fELF-virtio_net");
        for dir in ["proc", "sys", "run", "tmp", "dev"] {
            assert_eq!(by(dir).mode & 0o170000, 0o040000, "{dir}");
        }
    }

    #[test]
    fn same_inputs_same_compressed_bytes() {
        let a = initramfs_spec(b"INIT", None, &closure(), &[]).unwrap();
        let b = initramfs_spec(b"INIT", None, &closure(), &[]).unwrap();
        for how in [Compression::Zstd, Compression::Gzip] {
            let ca = compress(&cpio::write_newc(&a).unwrap(), how).unwrap();
            let cb = compress(&cpio::write_newc(&b).unwrap(), how).unwrap();
            assert_eq!(ca, cb);
        }
    }

    #[test]
    fn dynamic_init_is_refused() {
        let ls = fs::read("/bin/ls").unwrap();
        let err = check_init(Path::new("/bin/ls"), &ls).unwrap_err();
        assert!(err.to_string().contains("dynamically linked"), "{err}");
    }
}
