//! Text from outside (a client's envelope and headers, an upstream's reply) made safe to
//! print: a terminal or a log reader never gets its control characters, only their
//! escaped form (`ESC` → `\x1b`, a CR → `\x0d`).

use std::borrow::Cow;
use std::fmt::Write;

/// `text` with every control character (C0, DEL, C1) written as `\xNN` (`\u{NNNN}` above
/// U+00FF does not occur: those are not controls); borrowed when there is none.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            let _ = write!(out, "\\x{:02x}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_the_rest_kept() {
        assert!(matches!(escape_controls("a@example.com"), Cow::Borrowed(_)));
        assert_eq!(
            escape_controls("a\u{1b}[31mb\rc\u{7f}\u{85}é"),
            "a\\x1b[31mb\\x0dc\\x7f\\x85é"
        );
    }
}
