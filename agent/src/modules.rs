//! Module supply chain: pull, verify (cosign signature, blob digests, fs-verity),
//! content-addressed object store, composefs mount.
