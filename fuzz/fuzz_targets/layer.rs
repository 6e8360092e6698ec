//! A layer blob through the node's unpacker: tar framing (headers, GNU long names,
//! PAX records), gzip and zstd, into an object store. The first byte picks the
//! media type.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use powernode_modfmt::store::ObjectStore;
use powernode_modfmt::unpack::Unpacker;

fn store() -> &'static ObjectStore {
    static STORE: OnceLock<(tempfile::TempDir, ObjectStore)> = OnceLock::new();
    &STORE
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = ObjectStore::open(dir.path()).expect("store");
            (dir, store)
        })
        .1
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, blob)) = data.split_first() else {
        return;
    };
    let media = match kind % 3 {
        0 => "application/vnd.oci.image.layer.v1.tar",
        1 => "application/vnd.oci.image.layer.v1.tar+gzip",
        _ => "application/vnd.oci.image.layer.v1.tar+zstd",
    };
    let _ = Unpacker::new(store())
        .with_max_unpacked(8 << 20)
        .apply_layer(media, blob);
});
