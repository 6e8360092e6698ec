//! The kernel command line (`/proc/cmdline`), split as the kernel's own
//! `next_arg()` splits it: whitespace separates parameters unless inside double
//! quotes; a double quote anywhere toggles quoting; a leading quote on the
//! parameter or on its value is dropped together with a closing quote at the end
//! of the token, and any other quote stays. A repeated key keeps its last value, as
//! the kernel's own `__setup` handlers do.
//!
//! The init's options, the identity pin, the cloud settings and the identity pairs
//! all read their keys through this one splitter, so a value means the same thing
//! to the init and to the agent.

/// The file the kernel shows its command line in.
pub const PATH: &str = "/proc/cmdline";

/// Splits a command line into `(param, value)` pairs: `quiet` is `("quiet", None)`,
/// `a=` is `("a", Some(""))`.
pub fn split_params(cmdline: &str) -> Vec<(String, Option<String>)> {
    let bytes = cmdline.as_bytes();
    let at = |i: usize| bytes.get(i).copied();
    // Every index below sits on an ASCII byte (whitespace, `"`, `=`) or an end, so
    // it is a char boundary; `get` keeps that a fact rather than a panic.
    let slice = |from: usize, to: usize| cmdline.get(from..to).unwrap_or_default().to_string();
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        while at(pos).is_some_and(|c| c.is_ascii_whitespace()) {
            pos += 1;
        }
        if pos >= bytes.len() {
            break;
        }
        let mut start = pos;
        let mut in_quote = false;
        let quoted = at(start) == Some(b'"');
        if quoted {
            start += 1;
            in_quote = true;
        }
        let mut end = start;
        let mut equals = None;
        while let Some(c) = at(end) {
            if c.is_ascii_whitespace() && !in_quote {
                break;
            }
            if equals.is_none() && c == b'=' {
                equals = Some(end);
            }
            if c == b'"' {
                in_quote = !in_quote;
            }
            end += 1;
        }
        // The kernel strips a closing quote at the end of a quoted token.
        let trim_end = |from: usize| {
            if end > from && at(end - 1) == Some(b'"') {
                end - 1
            } else {
                end
            }
        };
        let (param, value) = match equals {
            None => {
                let e = if quoted { trim_end(start) } else { end };
                (slice(start, e), None)
            }
            Some(eq) => {
                let mut vstart = eq + 1;
                let mut vend = end;
                if at(vstart) == Some(b'"') && vstart < end {
                    vstart += 1;
                    vend = trim_end(start).max(vstart);
                } else if quoted {
                    vend = trim_end(start).max(vstart);
                }
                (slice(start, eq), Some(slice(vstart, vend)))
            }
        };
        out.push((param, value));
        pos = end;
    }
    out
}

/// The last value given to `key` (a bare `key` without `=` gives none).
pub fn last_value(cmdline: &str, key: &str) -> Option<String> {
    split_params(cmdline)
        .into_iter()
        .filter(|(k, _)| k == key)
        .filter_map(|(_, v)| v)
        .next_back()
}

/// A boolean switch's value: `1/true/yes`, `0/false/no`, anything else `None`.
pub fn flag(value: &str) -> Option<bool> {
    match value {
        "1" | "true" | "yes" => Some(true),
        "0" | "false" | "no" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(k: &str, v: Option<&str>) -> (String, Option<String>) {
        (k.to_string(), v.map(str::to_string))
    }

    #[test]
    fn words_values_and_whitespace() {
        assert_eq!(
            split_params("console=ttyS0  quiet\tpanic=-1\n a= b==c"),
            [
                p("console", Some("ttyS0")),
                p("quiet", None),
                p("panic", Some("-1")),
                p("a", Some("")),
                p("b", Some("=c")),
            ]
        );
        assert!(split_params("").is_empty());
        assert!(split_params(" \n\t ").is_empty());
    }

    #[test]
    fn quotes_follow_the_kernel() {
        // A quoted value keeps its spaces; its quotes go.
        assert_eq!(
            split_params("a=\"b c\" d"),
            [p("a", Some("b c")), p("d", None)]
        );
        // A quote before the parameter: both it and the closing one go.
        assert_eq!(split_params("\"a=b c\""), [p("a", Some("b c"))]);
        assert_eq!(split_params("\"word\""), [p("word", None)]);
        // A quote inside a value toggles quoting but stays (the init's old splitter
        // dropped every quote, so `b"c d"e` meant `bc de` to it and not to the agent).
        assert_eq!(
            split_params("a=b\"c d\"e f"),
            [p("a", Some("b\"c d\"e")), p("f", None)]
        );
        // An unclosed quote runs to the end of the line.
        assert_eq!(split_params("a=\"b c"), [p("a", Some("b c"))]);
        assert_eq!(split_params("a=\""), [p("a", Some(""))]);
        assert_eq!(split_params("\""), [p("", None)]);
        // Non-ASCII text passes through whole.
        assert_eq!(split_params("host=nœud"), [p("host", Some("nœud"))]);
    }

    #[test]
    fn the_last_value_wins_and_bare_words_have_none() {
        let line = "powernode.identity_source=fw_cfg x powernode.identity_source=aws powernode.identity_source";
        // The init's pin took the first match once; the kernel and the agent take the last.
        assert_eq!(
            last_value(line, "powernode.identity_source").as_deref(),
            Some("aws")
        );
        assert_eq!(last_value(line, "x"), None);
        assert_eq!(last_value("", "a"), None);
    }

    #[test]
    fn kernel_quoting_rules() {
        let p = split_params(
            "root=/dev/vda  a=\"b c\" \"d=e f\" flag \"quoted flag\" x=\"\" y= \t z=in\"ner sp\"ace",
        );
        let get = |k: &str| p.iter().find(|(pk, _)| pk == k).map(|(_, v)| v.clone());
        assert_eq!(get("root"), Some(Some("/dev/vda".into())));
        assert_eq!(get("a"), Some(Some("b c".into())));
        assert_eq!(get("d"), Some(Some("e f".into())));
        assert_eq!(get("flag"), Some(None));
        assert_eq!(get("quoted flag"), Some(None));
        assert_eq!(get("x"), Some(Some(String::new())));
        assert_eq!(get("y"), Some(Some(String::new())));
        // Inner quotes only protect the space; the kernel keeps them in the value.
        assert_eq!(get("z"), Some(Some("in\"ner sp\"ace".into())));
        assert_eq!(p.len(), 8);
        // An unterminated quote runs to the end, never past it.
        assert_eq!(
            split_params("a=\"open ended"),
            vec![("a".into(), Some("open ended".into()))]
        );
        assert_eq!(split_params("  \n "), vec![]);
        assert_eq!(split_params("\""), vec![(String::new(), None)]);
    }

    #[test]
    fn arbitrary_input_never_panics() {
        for line in crate::testutil::lines(crate::testutil::CMDLINE_ALPHABET, 20_000) {
            for (k, v) in split_params(&line) {
                // Whatever comes out is a piece of what went in.
                assert!(line.contains(k.trim_matches('"')), "{line:?} {k:?}");
                if let Some(v) = v {
                    assert!(line.contains(v.as_str()), "{line:?} {v:?}");
                }
            }
        }
    }

    #[test]
    fn flags() {
        for (v, want) in [
            ("1", Some(true)),
            ("yes", Some(true)),
            ("0", Some(false)),
            ("no", Some(false)),
            ("on", None),
            ("", None),
        ] {
            assert_eq!(flag(v), want, "{v}");
        }
    }
}
