//! fs-verity digests computed in userspace, byte-compatible with `fsverity digest`.
