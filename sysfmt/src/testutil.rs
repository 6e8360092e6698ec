//! Test inputs shared by the parsers' callers (the agent's identity parser tests
//! throw the same lines at its own parser on top of this crate's splitter).

/// `count` pseudo-random lines of up to 23 characters drawn from `alphabet`, the
/// same lines on every run (a xorshift with a fixed seed).
pub fn lines(alphabet: &[char], count: usize) -> impl Iterator<Item = String> + '_ {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..count).map(move |_| {
        let len = next() % 24;
        (0..len)
            .filter_map(|_| {
                let i = usize::try_from(next() % alphabet.len().max(1) as u64).ok()?;
                alphabet.get(i).copied()
            })
            .collect()
    })
}

/// The characters that matter to a kernel command line.
pub const CMDLINE_ALPHABET: &[char] = &['"', '=', ' ', '\t', 'a', 'p', '.', 'é', '\n', '_'];
