//! The cosign simple-signing payload, which the agent parses once a trust key has
//! verified the signature over it (so only a key holder can feed it bytes, but a
//! parser that panics there still takes down the reconcile): `parse_payload` on the
//! raw bytes and, when it parses, `SignedPayload::check` against a digest and an
//! `Expected` (repository, module name, version) taken from the input itself, so the
//! fuzzer can make them match and reach every comparison; plus `reference_path` on
//! the input as text.
//!
//! Input: the payload, optionally followed by `\0` and `digest\nrepository\nname\nversion`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use powernode_agent::modules::signature::{parse_payload, reference_path, Expected};

fuzz_target!(|data: &[u8]| {
    let (payload, tail) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    if let Ok(text) = std::str::from_utf8(data) {
        let path = reference_path(text);
        // The path is a part of the reference, never more.
        assert!(text.contains(path));
    }
    let Ok(parsed) = parse_payload(payload) else {
        return;
    };
    if let Some(reference) = &parsed.docker_reference {
        let _ = reference_path(reference);
    }
    let tail = tail
        .and_then(|t| std::str::from_utf8(t).ok())
        .unwrap_or_default();
    let mut fields = tail.split('\n');
    let digest = fields.next().unwrap_or_default();
    let expected = Expected {
        repository: fields.next().unwrap_or_default(),
        name: fields.next().unwrap_or_default(),
        version: fields.next().unwrap_or_default(),
    };
    let _ = parsed.check(digest, None);
    let full = parsed.check(digest, Some(&expected));
    // What the payload itself names always checks out against itself.
    if let (Some(name), Some(version)) = (&parsed.name, &parsed.version) {
        let repository = reference_path(parsed.docker_reference.as_deref().unwrap_or(""));
        let own = Expected {
            repository,
            name,
            version,
        };
        assert_eq!(parsed.check(&parsed.digest, Some(&own)), Ok(()));
    }
    if full.is_ok() {
        assert!(parsed.digest.eq_ignore_ascii_case(digest));
        assert_eq!(parsed.name.as_deref(), Some(expected.name));
        assert_eq!(parsed.version.as_deref(), Some(expected.version));
    }
});
