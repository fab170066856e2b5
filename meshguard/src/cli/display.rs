//! Text for a person's terminal. Names, SNI, ALPN, paths and error text come from pods and the
//! network: printed raw, a control character (ESC, CR, BS, ...) or a bidi override would let a
//! workload rewrite the screen of whoever is on call. Every output for people passes what it
//! prints through [`printable`]; JSON output needs nothing (serde escapes control characters).

use std::borrow::Cow;

/// A character a terminal would act on or reorder text by, rather than just show: C0, DEL and
/// C1 controls, and the bidi embeddings, overrides and isolates ("Trojan Source").
fn is_unsafe(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every unsafe character written as a visible escape (`\x1b`, `\u{202e}`); borrowed
/// when there is none, as almost always.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match u32::from(c) {
            _ if !is_unsafe(c) => out.push(c),
            n @ 0..=0xff => out.push_str(&format!("\\x{n:02x}")),
            n => out.push_str(&format!("\\u{{{n:x}}}")),
        }
    }
    Cow::Owned(out)
}

/// Whether `s` holds a character [`printable`] escapes: what tests and fuzz targets assert
/// never reaches a person.
pub fn has_unsafe(s: &str) -> bool {
    s.chars().any(is_unsafe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_a_terminal_acts_on() {
        let cases = [
            ("web-1", "web-1"),
            ("", ""),
            ("naïve 名前 ✓", "naïve 名前 ✓"),
            ("\x1b[2J", "\\x1b[2J"),
            ("a\rb\x08c\td\ne", "a\\x0db\\x08c\\x09d\\x0ae"),
            ("\0\x07\x7f", "\\x00\\x07\\x7f"),
            ("\u{80}\u{9b}31m\u{9f}", "\\x80\\x9b31m\\x9f"),
            ("evil\u{202e}gpj.exe", "evil\\u{202e}gpj.exe"),
            (
                "\u{202a}\u{202d}\u{2066}\u{2069}",
                "\\u{202a}\\u{202d}\\u{2066}\\u{2069}",
            ),
            // Neighbours of the bidi controls are plain text.
            (
                "\u{2029}\u{202f}\u{2065}\u{206a}",
                "\u{2029}\u{202f}\u{2065}\u{206a}",
            ),
            ("\\x1b stays", "\\x1b stays"),
        ];
        for (raw, want) in cases {
            let got = printable(raw);
            assert_eq!(got, want, "{raw:?}");
            assert!(!has_unsafe(&got), "{raw:?} -> {got:?}");
            assert_eq!(
                matches!(got, Cow::Borrowed(_)),
                raw == want,
                "{raw:?}: borrowed only when unchanged"
            );
        }
    }
}
