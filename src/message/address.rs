//! Pure: the mailbox of a `MAIL FROM` / `RCPT TO` path, read the RFC 5321 way.
//!
//! smtp-proto drops the quotes of a quoted local part (`<"john doe"@example.org>` reads
//! `john doe@example.org`, `<"eve@x,bob"@y>` reads `eve@x,bob@y`): passed on like that,
//! the upstream would get another mailbox, or several. A path with a quote or a backslash
//! is therefore read here, and kept in its canonical form: the local part as a
//! `Dot-string` when it can be one, else as a `Quoted-string` with `"` and `\` escaped
//! (RFC 5321 §4.1.2, "the form that uses the minimum quoting possible"). `"alice"@x` and
//! `alice@x` are the same mailbox, so both are `alice@x` here: routing, sender scopes
//! and the upstream see one spelling.
//!
//! A quoted local part can hold any printable ASCII (and, with SMTPUTF8, non-ASCII)
//! but no control character, so no CR or LF; `<` and `>` are refused too, so that an
//! upstream reading the path naively still ends it where mailgate does.

use std::fmt;

/// Why a path with a quoted local part is not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not RFC 5321 `Path` syntax (unclosed quote, quote inside an atom, control
    /// character, empty local part or domain, …).
    Syntax,
    /// A quoted local part with `<` or `>`: legal, but not relayed (see the module doc).
    AngleBracket,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathError::Syntax => f.write_str("invalid quoted local part"),
            PathError::AngleBracket => f.write_str("a local part with < or > is not relayed"),
        }
    }
}

/// The text between the `<` and `>` of the first path on a command line, quotes and
/// escapes honoured; `None` without a closed path.
pub fn path_in_line(line: &[u8]) -> Option<&[u8]> {
    let open = memchr::memchr(b'<', line)? + 1;
    let mut quoted = false;
    let mut i = open;
    while i < line.len() {
        match line[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'>' if !quoted => return Some(&line[open..i]),
            b'\r' | b'\n' => return None,
            _ => {}
        }
        i += 1;
    }
    None
}

/// Whether smtp-proto's reading of `path` may differ from what the client wrote (it
/// strips quotes and backslashes): then [`canonical_mailbox`] must read it.
pub fn needs_own_reading(path: &[u8]) -> bool {
    path.iter().any(|&b| b == b'"' || b == b'\\')
}

/// The canonical mailbox of `path` (the inside of `<…>`): a source route dropped, the
/// local part minimally quoted. `<"Postmaster">` gives `Postmaster` (RFC 5321 §4.5.1).
pub fn canonical_mailbox(path: &[u8]) -> Result<String, PathError> {
    let path = std::str::from_utf8(path).map_err(|_| PathError::Syntax)?;
    // A source route (`@a,@b:mailbox`) holds no quotes; it is dropped, as smtp-proto does.
    let mailbox = match path.strip_prefix('@') {
        Some(route) => route.split_once(':').ok_or(PathError::Syntax)?.1,
        None => path,
    };
    let (local, rest) = match mailbox.strip_prefix('"') {
        Some(quoted) => unquote(quoted)?,
        None => {
            let at = mailbox.find('@').unwrap_or(mailbox.len());
            let atoms = &mailbox[..at];
            if !is_dot_string(atoms) {
                return Err(PathError::Syntax);
            }
            (atoms.to_string(), &mailbox[at..])
        }
    };
    if local.is_empty() {
        return Err(PathError::Syntax);
    }
    if local.contains(['<', '>']) {
        return Err(PathError::AngleBracket);
    }
    if rest.is_empty() && local.eq_ignore_ascii_case("postmaster") {
        return Ok(local);
    }
    let domain = rest.strip_prefix('@').ok_or(PathError::Syntax)?;
    let bad_domain_char =
        |c: char| c.is_whitespace() || c.is_control() || matches!(c, '@' | '"' | '\\' | '<' | '>');
    if domain.is_empty() || domain.contains(bad_domain_char) {
        return Err(PathError::Syntax);
    }
    Ok(format!("{}@{domain}", quote_local(&local)))
}

/// The content of a quoted string whose opening quote is already read, and the text
/// after its closing quote.
fn unquote(text: &str) -> Result<(String, &str), PathError> {
    let mut local = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((local, &text[i + 1..])),
            // quoted-pairSMTP: a backslash and one of %d32-126.
            '\\' => match chars.next() {
                Some((_, e)) if (' '..='~').contains(&e) => local.push(e),
                _ => return Err(PathError::Syntax),
            },
            // qtextSMTP, and UTF-8 beyond ASCII (RFC 6531 §3.3).
            c if (' '..='~').contains(&c) || !c.is_ascii() && !c.is_control() => local.push(c),
            _ => return Err(PathError::Syntax),
        }
    }
    Err(PathError::Syntax)
}

/// `local` as RFC 5321 writes it: itself when it is a `Dot-string`, else a
/// `Quoted-string` with `"` and `\` escaped.
pub fn quote_local(local: &str) -> String {
    if is_dot_string(local) {
        return local.to_string();
    }
    let mut out = String::with_capacity(local.len() + 2);
    out.push('"');
    for c in local.chars() {
        if matches!(c, '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// RFC 5321 `Dot-string`: atoms of `atext` (and, with SMTPUTF8, non-ASCII) joined by
/// single dots.
fn is_dot_string(s: &str) -> bool {
    let atext = |c: char| {
        c.is_ascii_alphanumeric()
            || "!#$%&'*+-/=?^_`{|}~".contains(c)
            || !c.is_ascii() && !c.is_control()
    };
    !s.is_empty()
        && s.split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(atext))
}

/// Whether the local part of `address` (canonical) is a quoted string.
pub fn has_quoted_local(address: &str) -> bool {
    address.starts_with('"')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(path: &str) -> Result<String, PathError> {
        canonical_mailbox(path.as_bytes())
    }

    #[test]
    fn quoted_local_parts_are_kept_and_minimally_quoted() {
        let cases = [
            (r#""john doe"@example.org"#, r#""john doe"@example.org"#),
            (r#""eve@x,bob"@y"#, r#""eve@x,bob"@y"#),
            (r#""alice"@example.com"#, "alice@example.com"),
            (r#""Alice.B"@example.com"#, "Alice.B@example.com"),
            (r#""a..b"@x"#, r#""a..b"@x"#),
            (r#"".a"@x"#, r#"".a"@x"#),
            (r#""a\"b"@x"#, r#""a\"b"@x"#),
            (r#""a\\b"@x"#, r#""a\\b"@x"#),
            (r#""\a\b"@x"#, "ab@x"),
            (
                r#"@relay.example:"john doe"@example.org"#,
                r#""john doe"@example.org"#,
            ),
            (r#""jörg k"@exämple.org"#, r#""jörg k"@exämple.org"#),
            (r#""Postmaster""#, "Postmaster"),
            ("plain@x", "plain@x"),
        ];
        for (path, want) in cases {
            assert_eq!(canon(path).as_deref(), Ok(want), "{path}");
        }
    }

    #[test]
    fn malformed_or_dangerous_paths_are_refused() {
        for bad in [
            r#""john doe@example.org"#,
            r#"a"b"c@x"#,
            r#"""@x"#,
            r#""a"b@x"#,
            r#""a"@"#,
            "\"a\r\nRCPT TO:<eve@evil>\"@x",
            "\"a\nb\"@x",
            "\"a\tb\"@x",
            "\"a\x00b\"@x",
            "\"a\x7fb\"@x",
            r#""a\"@x"#,
            r#""a"@x y"#,
            r#""a"@x@y"#,
            r#""a"@"x""#,
            r#""webmaster""#,
            r#"@relay"a"@x"#,
        ] {
            assert_eq!(canon(bad), Err(PathError::Syntax), "{bad:?}");
        }
        for angle in [r#""a>b"@x"#, r#""<eve@evil>"@x"#, r#""a\>"@x"#] {
            assert_eq!(canon(angle), Err(PathError::AngleBracket), "{angle}");
        }
    }

    #[test]
    fn the_path_is_found_with_quotes_honoured() {
        let path =
            |l: &str| path_in_line(l.as_bytes()).map(|p| String::from_utf8_lossy(p).into_owned());
        assert_eq!(
            path(r#"RCPT TO:<"a>b"@x> NOTIFY=NEVER"#).as_deref(),
            Some(r#""a>b"@x"#)
        );
        assert_eq!(
            path(r#"RCPT TO:<"a\">"@x>"#).as_deref(),
            Some(r#""a\">"@x"#)
        );
        assert_eq!(path("MAIL FROM:<a@b>").as_deref(), Some("a@b"));
        assert_eq!(path(r#"RCPT TO:<"open@x>"#), None);
        assert_eq!(path("RCPT TO:a@b"), None);
    }

    #[test]
    fn every_canonical_form_reads_back_as_itself_and_lettre_takes_it() {
        for path in [
            r#""john doe"@example.org"#,
            r#""eve@x,bob"@y"#,
            r#""a\"b\\c"@x"#,
            r#""a..b"@x"#,
        ] {
            let once = canon(path).unwrap();
            assert_eq!(canon(&once).as_deref(), Ok(once.as_str()));
            assert!(once.parse::<lettre::Address>().is_ok(), "{once}");
            assert!(!once.contains(['\r', '\n', '<', '>']));
        }
    }
}
