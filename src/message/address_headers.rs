//! Pure: a strict second reading of a header section, for what readers disagree on
//! (SPEC §4, last paragraph).
//!
//! mail-parser, Python's `email`, Exchange and mail programs read malformed address
//! headers differently: an address written as a group name (`To: eve@evil.org:;`) or as
//! an unquoted display name (`From: ceo@other.com <app@example.com>`) is dropped by one
//! and sent to or shown by another, and a line that is no header field ends the header
//! section for one and not for the next. Rather than guess which reading the upstream
//! uses, mailgate refuses what is ambiguous. This module finds it:
//!
//! - [`fields`] cuts the header section (up to the first empty line) into fields and says
//!   which line is neither a field nor a continuation line. A whitespace-only line is such
//!   a line: RFC 5322 forbids it outside the obsolete syntax, and readers disagree on
//!   whether it ends the header section (Python reads it as a continuation, others as
//!   the end). So are a continuation line with no field before it, a field name followed
//!   by blanks before its colon (Python ends the header section there, mail-parser reads
//!   the field) and a CR that is not followed by an LF.
//! - [`entries`] reads the entries of one `From:`/`Sender:`/`To:`/`Cc:`/`Bcc:` value:
//!   display name (with comments and anything that is not the address), group name and
//!   address.
//! - [`read`] does both and reports the first [`Ambiguity`].
//!
//! "Holds an address": a `local@domain` token anywhere in the display name, the group
//! name or a comment, after removing quotes and decoding encoded words (RFC 2047, also
//! inside quoted strings and in the middle of a word, as some readers decode them), with
//! blanks around the `@` allowed (Python's `email.utils` reads `eve @ evil.org` as an
//! address). A display name may hold only the entry's own address (`scan@x.com
//! <scan@x.com>`, any letter case); a group name may hold none. An encoded word in a
//! charset that is not ASCII-compatible (UTF-7, UTF-16, EBCDIC, …) cannot be checked and
//! is refused as unreadable.

use base64::Engine as _;

/// The address fields whose entries are checked.
pub const ADDRESS_FIELDS: [&str; 5] = ["From", "Sender", "To", "Cc", "Bcc"];

/// One header field of the section: its name as written and its unfolded value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// The name, as written (without the colon).
    pub name: String,
    /// The value after the colon, continuation lines joined without their line breaks
    /// (non-UTF-8 bytes replaced by U+FFFD).
    pub value: String,
    /// The 1-based line number of the field's first line.
    pub line: usize,
}

/// Why a line of the header section is neither a header field nor a continuation line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineProblem {
    /// No `name:` at its start.
    NotAField,
    /// Blanks between the field name and its colon.
    SpaceBeforeColon,
    /// Only blanks: some readers end the header section there, others do not.
    WhitespaceOnly,
    /// A continuation line with no field before it.
    LeadingContinuation,
    /// A CR not followed by LF (a line break for some readers only).
    BareCr,
}

impl LineProblem {
    /// What is wrong, in a few words.
    pub fn describe(self) -> &'static str {
        match self {
            LineProblem::NotAField => "no field name and colon",
            LineProblem::SpaceBeforeColon => "blank before the colon",
            LineProblem::WhitespaceOnly => "only blanks",
            LineProblem::LeadingContinuation => "continuation line with no field before it",
            LineProblem::BareCr => "CR without LF",
        }
    }
}

/// One entry of an address field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `From`, `Sender`, `To`, `Cc` or `Bcc`.
    pub field: &'static str,
    /// The group the entry belongs to, as written (`None` outside a group).
    pub group: Option<String>,
    /// Everything of the entry that is not its address (display name, comments, junk),
    /// as written; empty when there is none.
    pub display: String,
    /// The address (`local@domain`, quotes removed), if the entry has exactly one.
    pub address: Option<String>,
}

/// Why a header section is ambiguous: readers may not agree on its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ambiguity {
    /// A line that is neither a header field nor a continuation line.
    Line {
        /// 1-based line number in the header section.
        line: usize,
        /// What is wrong with it.
        problem: LineProblem,
    },
    /// A display name (or comment) holds an address other than the entry's own.
    DisplayName {
        /// The field.
        field: &'static str,
        /// The address found in the display name.
        address: String,
    },
    /// A group name holds an address.
    GroupName {
        /// The field.
        field: &'static str,
        /// The address found in the group name.
        address: String,
    },
    /// The value cannot be read one way only (an unclosed quote, comment or `<`, a
    /// group inside a group, two `<…>` in one entry, a stray `)`, `]` or `>`, a backslash
    /// outside quotes, a control character, bytes that are not UTF-8, an encoded word in
    /// a charset that is not ASCII-compatible).
    Unreadable {
        /// The field.
        field: &'static str,
        /// What could not be read.
        why: &'static str,
    },
    /// An address this strict reading finds that mailgate's own reading (mail-parser,
    /// whose addresses the other checks use) does not: it would go unchecked.
    Unseen {
        /// The field.
        field: &'static str,
        /// The address.
        address: String,
    },
}

/// A header section's fields and address entries, read strictly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reading {
    /// Every entry of every `From:`/`Sender:`/`To:`/`Cc:`/`Bcc:` field, in order.
    pub entries: Vec<Entry>,
    /// The first ambiguity found, if any (the entries are then those read before it).
    pub ambiguity: Option<Ambiguity>,
}

/// Reads the header section of `raw` (up to the first empty line; the whole of `raw`
/// when it has none): its address entries and the first ambiguity. Never panics.
pub fn read(raw: &[u8]) -> Reading {
    let mut reading = Reading::default();
    let fields = match fields(raw) {
        Ok(fields) => fields,
        Err((line, problem)) => {
            reading.ambiguity = Some(Ambiguity::Line { line, problem });
            return reading;
        }
    };
    for f in &fields {
        let Some(field) = ADDRESS_FIELDS
            .iter()
            .find(|n| n.eq_ignore_ascii_case(&f.name))
        else {
            continue;
        };
        // Not UTF-8: Latin-1 for one reader, replaced or dropped by the next.
        let value = if f.value.contains('\u{fffd}') {
            Err("bytes that are not UTF-8")
        } else {
            entries(field, &f.value)
        };
        match value {
            Ok(found) => {
                let problem = found.iter().find_map(entry_ambiguity);
                reading.entries.extend(found);
                if problem.is_some() {
                    reading.ambiguity = problem;
                    return reading;
                }
            }
            Err(why) => {
                reading.ambiguity = Some(Ambiguity::Unreadable { field, why });
                return reading;
            }
        }
    }
    reading
}

/// The fields of the header section of `raw`, or the first line (1-based) that is
/// neither a field nor a continuation line, and why.
///
/// A message whose first line is no field has no header section: it is all body, as
/// Python's `email` reads it (the dot-stuffed text a script sends without headers). That
/// holds only while no later line could be read as a field by a reader that skips the
/// first one; otherwise the first line is refused.
pub fn fields(raw: &[u8]) -> Result<Vec<Field>, (usize, LineProblem)> {
    let mut out: Vec<Field> = Vec::new();
    for (index, line) in lines(raw).enumerate() {
        let number = index + 1;
        if line.contains(&b'\r') {
            return Err((number, LineProblem::BareCr));
        }
        if matches!(line[0], b' ' | b'\t') {
            if line.iter().all(|b| matches!(b, b' ' | b'\t')) {
                return Err((number, LineProblem::WhitespaceOnly));
            }
            let Some(field) = out.last_mut() else {
                return Err((number, LineProblem::LeadingContinuation));
            };
            field.value.push_str(&String::from_utf8_lossy(line));
            continue;
        }
        match field_start(line) {
            Ok(name_len) => out.push(Field {
                name: String::from_utf8_lossy(&line[..name_len]).into_owned(),
                value: String::from_utf8_lossy(&line[name_len + 1..]).into_owned(),
                line: number,
            }),
            Err(LineProblem::NotAField)
                if number == 1
                    && lines(raw)
                        .skip(1)
                        .all(|l| field_start(l) == Err(LineProblem::NotAField)) =>
            {
                return Ok(Vec::new());
            }
            Err(problem) => return Err((number, problem)),
        }
    }
    Ok(out)
}

/// The lines of the header section (up to the first empty line), without line ends.
fn lines(raw: &[u8]) -> impl Iterator<Item = &[u8]> {
    raw.split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .take_while(|line| !line.is_empty())
}

/// A line that starts a field: the length of its name (the colon follows).
fn field_start(line: &[u8]) -> Result<usize, LineProblem> {
    let name_len = line
        .iter()
        .take_while(|&&b| (33..=126).contains(&b) && b != b':')
        .count();
    let blanks = line[name_len..]
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t'))
        .count();
    if name_len == 0 || line.get(name_len + blanks) != Some(&b':') {
        return Err(LineProblem::NotAField);
    }
    if blanks > 0 {
        return Err(LineProblem::SpaceBeforeColon);
    }
    Ok(name_len)
}

/// A lexical token of an address field value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok<'a> {
    /// A run of characters that are no specials, blanks, quotes or brackets (borrowed:
    /// it has no escapes, and an atom per word was most of this parser's allocations).
    Atom(&'a str),
    /// A quoted string's content, escapes removed.
    Quoted(String),
    /// A comment's content (nested comments included, with their parentheses).
    Comment(String),
    /// A domain literal's content.
    Literal(String),
    /// One of `< > @ , ; : .`.
    Special(char),
    /// Blanks.
    Space,
}

impl Tok<'_> {
    /// The token as display text (quotes removed, comments in parentheses).
    fn push_text(&self, out: &mut String) {
        match self {
            Tok::Atom(s) => out.push_str(s),
            Tok::Quoted(s) => out.push_str(s),
            Tok::Comment(s) => {
                out.push('(');
                out.push_str(s);
                out.push(')');
            }
            Tok::Literal(s) => {
                out.push('[');
                out.push_str(s);
                out.push(']');
            }
            Tok::Special(c) => out.push(*c),
            Tok::Space => out.push(' '),
        }
    }
}

fn tokenize(value: &str) -> Result<Vec<Tok<'_>>, &'static str> {
    // A NUL, a vertical tab, an escape…: a separator for one reader, part of the address
    // for the next; no real address header holds one.
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err("control character");
    }
    let mut toks = Vec::new();
    // `Chars` rather than `Peekable`: a clone peeks, and `as_str` places an atom in `value`.
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\r' | '\n' => {
                while chars
                    .clone()
                    .next()
                    .is_some_and(|c| c.is_ascii_whitespace())
                {
                    chars.next();
                }
                toks.push(Tok::Space);
            }
            '"' => {
                let mut s = String::new();
                loop {
                    match chars.next() {
                        None => return Err("unclosed quoted string"),
                        Some('"') => break,
                        Some('\\') => s.extend(chars.next()),
                        Some(c) => s.push(c),
                    }
                }
                toks.push(Tok::Quoted(s));
            }
            '(' => {
                let mut s = String::new();
                let mut depth = 1u32;
                loop {
                    match chars.next() {
                        None => return Err("unclosed comment"),
                        Some('\\') => s.extend(chars.next()),
                        Some('(') => {
                            depth = depth.saturating_add(1);
                            s.push('(');
                        }
                        Some(')') => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                            s.push(')');
                        }
                        Some(c) => s.push(c),
                    }
                }
                toks.push(Tok::Comment(s));
            }
            '[' => {
                let mut s = String::new();
                loop {
                    match chars.next() {
                        None => return Err("unclosed domain literal"),
                        Some(']') => break,
                        Some('\\') => s.extend(chars.next()),
                        Some(c) => s.push(c),
                    }
                }
                toks.push(Tok::Literal(s));
            }
            ')' | ']' => return Err("unbalanced ')' or ']'"),
            '<' | '>' | '@' | ',' | ';' | ':' | '.' => toks.push(Tok::Special(c)),
            // Outside quotes and comments a backslash escapes nothing for one reader
            // and the next character for another.
            '\\' => return Err("backslash outside a quoted string"),
            c => {
                let start = value.len() - chars.as_str().len() - c.len_utf8();
                let mut end = start + c.len_utf8();
                while let Some(n) = chars.clone().next() {
                    if n.is_ascii_whitespace() || "<>@,;:.()[]\"\\".contains(n) {
                        break;
                    }
                    end += n.len_utf8();
                    chars.next();
                }
                toks.push(Tok::Atom(&value[start..end]));
            }
        }
    }
    Ok(toks)
}

/// Reads the entries of one address field's value (`field`: its canonical name). An
/// empty group (`undisclosed-recipients:;`) is one entry with its group name, no display
/// name and no address. `Err`: the value cannot be read one way only.
pub fn entries(field: &'static str, value: &str) -> Result<Vec<Entry>, &'static str> {
    let toks = tokenize(value)?;
    let mut out = Vec::new();
    let mut current: Vec<Tok> = Vec::new();
    let mut group: Option<String> = None;
    let mut in_angle = false;
    let mut group_start = 0;
    for tok in toks {
        if in_angle {
            match tok {
                Tok::Special('<') => return Err("'<' inside <…>"),
                Tok::Special('>') => in_angle = false,
                _ => {}
            }
            current.push(tok);
            continue;
        }
        match tok {
            Tok::Special('<') => {
                in_angle = true;
                current.push(tok);
            }
            Tok::Special('>') => return Err("'>' without '<'"),
            Tok::Special(',') => finish(field, &group, &mut current, &mut out)?,
            Tok::Special(':') => {
                if group.is_some() {
                    return Err("a group inside a group");
                }
                group_start = out.len();
                let mut name = String::new();
                for t in current.drain(..) {
                    t.push_text(&mut name);
                }
                group = Some(name.trim().to_string());
            }
            // Outside a group, readers take `;` as a separator (Outlook users write it).
            Tok::Special(';') => {
                finish(field, &group, &mut current, &mut out)?;
                if let Some(name) = group.take()
                    && out.len() == group_start
                {
                    // An empty group still has a name to check.
                    out.push(Entry {
                        field,
                        group: Some(name),
                        display: String::new(),
                        address: None,
                    });
                }
            }
            tok => current.push(tok),
        }
    }
    if in_angle {
        return Err("unclosed '<'");
    }
    finish(field, &group, &mut current, &mut out)?;
    if let Some(name) = group
        && out.len() == group_start
    {
        // A group left open at the end (`undisclosed-recipients:`), empty.
        out.push(Entry {
            field,
            group: Some(name),
            display: String::new(),
            address: None,
        });
    }
    Ok(out)
}

/// Ends the entry made of `toks` (nothing for an empty one).
fn finish(
    field: &'static str,
    group: &Option<String>,
    toks: &mut Vec<Tok>,
    out: &mut Vec<Entry>,
) -> Result<(), &'static str> {
    let toks = std::mem::take(toks);
    if toks.iter().all(|t| *t == Tok::Space) {
        return Ok(());
    }
    let opens = toks.iter().filter(|t| **t == Tok::Special('<')).count();
    if opens > 1 {
        return Err("two <…> in one entry");
    }
    let mut display = String::new();
    let address = if opens == 1 {
        let mut inside = Vec::new();
        let mut state = 0; // 0 before `<`, 1 inside, 2 after `>`
        for t in toks {
            match (&t, state) {
                (Tok::Special('<'), 0) => state = 1,
                (Tok::Special('>'), 1) => state = 2,
                (Tok::Comment(_), 1) => t.push_text(&mut display),
                (_, 1) => inside.push(t),
                _ => t.push_text(&mut display),
            }
        }
        // An obsolete route (`<@a,@b:bob@x>`) is not part of the address.
        let start = inside
            .iter()
            .rposition(|t| *t == Tok::Special(':'))
            .map_or(0, |i| i + 1);
        let address = addr_spec(&inside[start..]);
        // Without an address, what stands inside `<…>` is text some reader may show.
        let shown = if address.is_some() {
            start
        } else {
            inside.len()
        };
        for t in &inside[..shown] {
            t.push_text(&mut display);
        }
        address
    } else {
        let plain: Vec<Tok> = toks
            .iter()
            .filter(|t| !matches!(t, Tok::Comment(_)))
            .cloned()
            .collect();
        match addr_spec(&plain) {
            Some(address) => {
                for t in toks.iter().filter(|t| matches!(t, Tok::Comment(_))) {
                    t.push_text(&mut display);
                }
                Some(address)
            }
            None => {
                for t in &toks {
                    t.push_text(&mut display);
                }
                None
            }
        }
    };
    out.push(Entry {
        field,
        group: group.clone(),
        display: display.trim().to_string(),
        address,
    });
    Ok(())
}

/// `toks` as one addr-spec (`word *("." word) "@" domain`, blanks allowed between the
/// parts as the obsolete syntax allows), or `None`.
fn addr_spec(toks: &[Tok]) -> Option<String> {
    let toks: Vec<&Tok> = toks.iter().filter(|t| **t != Tok::Space).collect();
    let at = toks.iter().position(|t| **t == Tok::Special('@'))?;
    let (local, domain) = (&toks[..at], &toks[at + 1..]);
    let mut out = String::new();
    dotted(local, &mut out, |t| match t {
        Tok::Atom(s) => Some(s),
        Tok::Quoted(s) => Some(s.as_str()),
        _ => None,
    })?;
    out.push('@');
    if let [Tok::Literal(l)] = domain {
        out.push('[');
        out.push_str(l);
        out.push(']');
        return Some(out);
    }
    dotted(domain, &mut out, |t| match t {
        Tok::Atom(s) => Some(s),
        _ => None,
    })?;
    Some(out)
}

/// `word *("." word)` with the words `word` accepts, appended to `out`.
fn dotted<'a>(
    toks: &[&'a Tok<'a>],
    out: &mut String,
    word: impl Fn(&'a Tok<'a>) -> Option<&'a str>,
) -> Option<()> {
    if toks.len().is_multiple_of(2) {
        return None;
    }
    for (i, t) in toks.iter().enumerate() {
        if i % 2 == 1 {
            (**t == Tok::Special('.')).then_some(())?;
            out.push('.');
        } else {
            let w = word(t)?;
            if w.is_empty() {
                return None;
            }
            out.push_str(w);
        }
    }
    Some(())
}

/// What is ambiguous about one entry, if anything.
fn entry_ambiguity(entry: &Entry) -> Option<Ambiguity> {
    let field = entry.field;
    if let Some(group) = &entry.group {
        match addresses_in(group) {
            Err(why) => return Some(Ambiguity::Unreadable { field, why }),
            Ok(found) => {
                if let Some(address) = found.into_iter().next() {
                    return Some(Ambiguity::GroupName { field, address });
                }
            }
        }
    }
    let found = match addresses_in(&entry.display) {
        Ok(found) => found,
        Err(why) => return Some(Ambiguity::Unreadable { field, why }),
    };
    let own = entry.address.as_deref();
    found
        .into_iter()
        .find(|a| !own.is_some_and(|own| same(unquoted(a), own)))
        .map(|address| Ambiguity::DisplayName { field, address })
}

/// An address as a display name writes it, without the single quotes or backticks
/// around it: Outlook and Exchange write `'app@example.com' <app@example.com>`, and every
/// reader shows that as the entry's own address.
fn unquoted(token: &str) -> &str {
    token.trim_matches(|c| c == '\'' || c == '`')
}

fn same(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b) || a.to_lowercase() == b.to_lowercase()
}

/// The `local@domain` tokens in `text`, as written and with its encoded words decoded.
/// `Err`: an encoded word in a charset that cannot be checked.
pub fn addresses_in(text: &str) -> Result<Vec<String>, &'static str> {
    let mut found = tokens_with_at(text);
    if text.contains("=?") {
        let decoded = decode_words(text)?;
        for a in tokens_with_at(&decoded) {
            if !found.contains(&a) {
                found.push(a);
            }
        }
    }
    Ok(found)
}

/// A character that may be part of a mailbox's local part or domain, as a reader
/// showing or parsing it would take it: anything but blanks, controls and the specials
/// that end a word (an undecodable byte, U+FFFD, too: some reader decodes it).
fn address_char(c: char) -> bool {
    !c.is_whitespace() && !c.is_control() && !"<>()[],;:\"@\\".contains(c)
}

/// Every `local@domain` in `text`: around each `@` (blanks next to it skipped), the
/// longest runs of address characters, trimmed of dots; both must be non-empty.
fn tokens_with_at(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    for (i, &c) in chars.iter().enumerate() {
        if c != '@' {
            continue;
        }
        let mut l = i;
        while l > 0 && chars[l - 1].is_whitespace() {
            l -= 1;
        }
        let mut start = l;
        while start > 0 && address_char(chars[start - 1]) {
            start -= 1;
        }
        let mut r = i + 1;
        while r < chars.len() && chars[r].is_whitespace() {
            r += 1;
        }
        let mut end = r;
        while end < chars.len() && (address_char(chars[end]) || "[]".contains(chars[end])) {
            end += 1;
        }
        let local: String = chars[start..l].iter().collect();
        let domain: String = chars[r..end].iter().collect();
        let (local, domain) = (local.trim_matches('.'), domain.trim_matches('.'));
        if !local.is_empty() && !domain.is_empty() {
            let token = format!("{local}@{domain}");
            if !out.contains(&token) {
                out.push(token);
            }
        }
    }
    out
}

/// `text` with every RFC 2047 encoded word (`=?charset?Q|B?text?=`) decoded, wherever it
/// stands. `Err`: a charset that is not ASCII-compatible.
pub fn decode_words(text: &str) -> Result<String, &'static str> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("=?") {
        out.push_str(&rest[..start]);
        let word = &rest[start + 2..];
        match encoded_word(word) {
            Some((charset, encoding, payload, len)) => {
                let bytes = if encoding.eq_ignore_ascii_case("b") {
                    decode_b(payload)
                } else {
                    decode_q(payload)
                };
                out.push_str(&decode_charset(charset, &bytes)?);
                rest = &word[len..];
            }
            None => {
                out.push_str("=?");
                rest = word;
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// `charset?enc?payload?=` at the start of `word`: the three parts and the length taken.
fn encoded_word(word: &str) -> Option<(&str, &str, &str, usize)> {
    let q1 = word.find('?')?;
    let charset = &word[..q1];
    let after = &word[q1 + 1..];
    let q2 = after.find('?')?;
    let encoding = &after[..q2];
    if !encoding.eq_ignore_ascii_case("b") && !encoding.eq_ignore_ascii_case("q") {
        return None;
    }
    let payload_start = q1 + 1 + q2 + 1;
    let end = word[payload_start..].find("?=")?;
    let payload = &word[payload_start..payload_start + end];
    if charset.is_empty() || charset.contains(char::is_whitespace) {
        return None;
    }
    Some((charset, encoding, payload, payload_start + end + 2))
}

/// Base64, leniently: characters outside the alphabet dropped, padding optional (as
/// lenient readers decode it).
fn decode_b(payload: &str) -> Vec<u8> {
    let clean: String = payload
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '+' || *c == '/')
        .collect();
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    // A length of 4n+1 cannot be decoded: its last character carries no whole byte.
    let usable = if clean.len() % 4 == 1 {
        &clean[..clean.len() - 1]
    } else {
        &clean[..]
    };
    engine.decode(usable).unwrap_or_default()
}

/// Q encoding: `_` is a space, `=XX` a byte; a broken `=` stays as it is.
fn decode_q(payload: &str) -> Vec<u8> {
    let bytes = payload.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'_' => out.push(b' '),
            b'=' => match (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'='),
            },
            b => out.push(b),
        }
        i += 1;
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// Charsets whose bytes below 0x80 are ASCII (as far as `@`, letters and digits go).
const SINGLE_BYTE: [&str; 8] = [
    "iso-8859-",
    "iso8859-",
    "windows-125",
    "cp125",
    "latin",
    "koi8-",
    "tis-620",
    "windows-874",
];
/// Multibyte charsets whose lead bytes are 0x80 or above (a trail byte may be an `@`).
const DOUBLE_BYTE: [&str; 17] = [
    "gb2312",
    "gbk",
    "gb18030",
    "big5",
    "big5-hkscs",
    "euc-jp",
    "euc-kr",
    "euc-tw",
    "shift_jis",
    "shift-jis",
    "sjis",
    "cp932",
    "windows-31j",
    "cp936",
    "cp949",
    "cp950",
    "ks_c_5601-1987",
];

/// Decodes `bytes` in `charset` as far as matters for finding addresses: ASCII kept,
/// other characters replaced. `Err` for a charset not known to be ASCII-compatible.
fn decode_charset(charset: &str, bytes: &[u8]) -> Result<String, &'static str> {
    // RFC 2231 language suffix: `utf-8*en`.
    let charset = charset
        .split('*')
        .next()
        .unwrap_or(charset)
        .to_ascii_lowercase();
    let charset = charset.as_str();
    if matches!(charset, "utf-8" | "utf8" | "us-ascii" | "ascii") {
        return Ok(String::from_utf8_lossy(bytes).into_owned());
    }
    if SINGLE_BYTE.iter().any(|p| charset.starts_with(p)) || charset == "macintosh" {
        return Ok(bytes
            .iter()
            .map(|&b| if b < 0x80 { b as char } else { '\u{fffd}' })
            .collect());
    }
    if DOUBLE_BYTE.contains(&charset) {
        let mut out = String::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] < 0x80 {
                out.push(bytes[i] as char);
                i += 1;
            } else {
                out.push('\u{fffd}');
                i += 2;
            }
        }
        return Ok(out);
    }
    if charset.starts_with("iso-2022-") {
        return Ok(iso_2022_ascii(bytes));
    }
    Err("encoded word in a charset that cannot be checked")
}

/// The ASCII-mode text of ISO-2022 bytes; multibyte runs (after `ESC $`) replaced.
fn iso_2022_ascii(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut ascii = true;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == 0x1b {
            match bytes.get(i + 1) {
                Some(b'$') => ascii = false,
                Some(b'(') => ascii = matches!(bytes.get(i + 2), Some(b'B' | b'J')),
                _ => {}
            }
            i += 3;
            out.push('\u{fffd}');
            continue;
        }
        out.push(if ascii && bytes[i] < 0x80 {
            bytes[i] as char
        } else {
            '\u{fffd}'
        });
        i += 1;
    }
    out
}

/// The header section's `From:`/`Sender:` (`from_fields`) or `To:`/`Cc:`/`Bcc:`
/// addresses of a [`Reading`], for comparison with another reader's.
pub fn own_addresses<'a>(
    reading: &'a Reading,
    in_fields: &'a [&str],
) -> impl Iterator<Item = (&'static str, &'a str)> + 'a {
    reading
        .entries
        .iter()
        .filter(move |e| in_fields.contains(&e.field))
        .filter_map(|e| Some((e.field, e.address.as_deref()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ambiguity(raw: &str) -> Option<Ambiguity> {
        read(raw.as_bytes()).ambiguity
    }

    fn display(field: &'static str, address: &str) -> Option<Ambiguity> {
        Some(Ambiguity::DisplayName {
            field,
            address: address.into(),
        })
    }

    #[test]
    fn the_confirmed_cases_are_ambiguous() {
        assert_eq!(
            ambiguity("From: a@example.org\r\nTo: eve@evil.org:;\r\n\r\nbody\r\n"),
            Some(Ambiguity::GroupName {
                field: "To",
                address: "eve@evil.org".into()
            })
        );
        assert_eq!(
            ambiguity("To: eve@evil.org <bob@example.org>\r\n\r\n"),
            display("To", "eve@evil.org")
        );
        assert_eq!(
            ambiguity("To: eve@evil.org: bob@example.org;\r\n\r\n"),
            Some(Ambiguity::GroupName {
                field: "To",
                address: "eve@evil.org".into()
            })
        );
        assert_eq!(
            ambiguity("To: bob@example.org\r\nX-Broken\r\n \r\nCc: eve@evil.org\r\n\r\n"),
            Some(Ambiguity::Line {
                line: 2,
                problem: LineProblem::NotAField
            })
        );
        assert_eq!(
            ambiguity("To: bob@example.org\r\n \r\nCc: eve@evil.org\r\n\r\n"),
            Some(Ambiguity::Line {
                line: 2,
                problem: LineProblem::WhitespaceOnly
            })
        );
        assert_eq!(
            ambiguity("From: ceo@othercorp.com <app@example.com>\r\n\r\n"),
            display("From", "ceo@othercorp.com")
        );
        assert_eq!(
            ambiguity("Sender: \"ceo@othercorp.com\" <app@example.com>\r\n\r\n"),
            display("Sender", "ceo@othercorp.com")
        );
        assert_eq!(
            ambiguity("Bcc: eve @ evil.org <bob@example.org>\r\n\r\n"),
            display("Bcc", "eve@evil.org")
        );
    }

    #[test]
    fn outlook_quotes_its_own_address_in_single_quotes_and_that_is_allowed() {
        for raw in [
            "From: 'app@example.com' <app@example.com>\r\n\r\n",
            "Cc: 'B@Example.com' <b@example.com>, `c@x.org` <c@x.org>\r\n\r\n",
            "From: \"'app@example.com'\" <app@example.com>\r\n\r\n",
        ] {
            assert_eq!(ambiguity(raw), None, "{raw:?}");
        }
        // Quotes do not make another address the entry's own.
        assert!(matches!(
            ambiguity("From: 'eve@evil.org' <app@example.com>\r\n\r\n"),
            Some(Ambiguity::DisplayName { .. })
        ));
    }

    #[test]
    fn the_entrys_own_address_in_its_display_name_is_allowed() {
        for raw in [
            "From: scan@x.com <scan@x.com>\r\n\r\n",
            "From: SCAN@X.COM <scan@x.com>\r\n\r\n",
            "From: \"scan@x.com\" <scan@x.com>\r\n\r\n",
            "From: Scanner (scan@x.com) <scan@x.com>\r\n\r\n",
            "From: scan@x.com (scan@x.com)\r\n\r\n",
            "To: Bob <bob@example.org>, \"Doe, John\" <john@x.org>, carol@x.org (Carol)\r\n\r\n",
            "To: team: a@x.org, B <b@x.org>;, c@x.org\r\nCc: undisclosed-recipients:;\r\n\r\n",
            "To: a@x.org; b@x.org\r\nSubject: a@b.c is fine here\r\n\r\n",
            "To: <@relay.example:bob@example.org>\r\n\r\n",
            "To: =?utf-8?q?J=C3=B6ran?= <joran@x.org>\r\n\r\n",
            "To: John Smith <john@x.org>\r\n\r\n",
        ] {
            assert_eq!(ambiguity(raw), None, "{raw}");
        }
        let r = read(b"From: scan@x.com <scan@x.com>\r\nTo: a@x.org, B <b@x.org>\r\n\r\n");
        let got: Vec<_> = r
            .entries
            .iter()
            .map(|e| (e.field, e.display.as_str(), e.address.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("From", "scan@x.com", Some("scan@x.com")),
                ("To", "", Some("a@x.org")),
                ("To", "B", Some("b@x.org"))
            ]
        );
    }

    #[test]
    fn encoded_words_are_decoded_before_looking_for_addresses() {
        assert_eq!(
            ambiguity("To: =?utf-8?q?eve=40evil.org?= <bob@example.org>\r\n\r\n"),
            display("To", "eve@evil.org")
        );
        assert_eq!(
            ambiguity("From: =?UTF-8?B?Y2VvQG90aGVyY29ycC5jb20=?= <app@example.com>\r\n\r\n"),
            display("From", "ceo@othercorp.com")
        );
        // Inside a quoted string, mid-word, and as a group name.
        assert_eq!(
            ambiguity("Cc: \"x =?iso-8859-1?q?eve=40evil.org?=\" <bob@example.org>\r\n\r\n"),
            display("Cc", "eve@evil.org")
        );
        assert_eq!(
            ambiguity("To: eve=?utf-8?q?=40?=evil.org <bob@example.org>\r\n\r\n"),
            display("To", "eve@evil.org")
        );
        assert_eq!(
            ambiguity("To: =?utf-8?b?ZXZlQGV2aWwub3Jn?=:;\r\n\r\n"),
            Some(Ambiguity::GroupName {
                field: "To",
                address: "eve@evil.org".into()
            })
        );
        // An address only an encoded word spells has no own address to match.
        assert_eq!(
            ambiguity("To: <=?utf-8?q?eve=40evil.org?=>\r\n\r\n"),
            display("To", "eve@evil.org")
        );
        // A charset that is not ASCII-compatible cannot be checked.
        assert_eq!(
            ambiguity("To: =?utf-7?q?eve+AEA-evil.org?= <bob@example.org>\r\n\r\n"),
            Some(Ambiguity::Unreadable {
                field: "To",
                why: "encoded word in a charset that cannot be checked"
            })
        );
        // A Shift_JIS trail byte 0x40 is no `@`.
        assert_eq!(
            ambiguity("To: =?shift_jis?b?gkBhYmM=?= <bob@example.org>\r\n\r\n"),
            None
        );
    }

    #[test]
    fn folded_lines_are_read_as_one_field() {
        assert_eq!(
            ambiguity("To: Bob\r\n <bob@example.org>,\r\n\teve@evil.org\r\n <carol@x.org>\r\n\r\n"),
            display("To", "eve@evil.org")
        );
        let r = read(b"To: Bob\r\n <bob@example.org>,\r\n\tcarol@x.org\r\n\r\n");
        assert_eq!(r.ambiguity, None);
        let addresses: Vec<_> = own_addresses(&r, &["To"]).collect();
        assert_eq!(
            addresses,
            [("To", "bob@example.org"), ("To", "carol@x.org")]
        );
    }

    #[test]
    fn lines_that_are_neither_fields_nor_continuations() {
        let line = |raw: &str| match ambiguity(raw) {
            Some(Ambiguity::Line { line, problem }) => Some((line, problem)),
            _ => None,
        };
        assert_eq!(
            line(" To: x@y.z\r\n\r\n"),
            Some((1, LineProblem::LeadingContinuation))
        );
        assert_eq!(
            line("Subject: a\r\nTo : eve@evil.org\r\n\r\n"),
            Some((2, LineProblem::SpaceBeforeColon))
        );
        assert_eq!(
            line("Subject: a\r\n:x\r\n\r\n"),
            Some((2, LineProblem::NotAField))
        );
        assert_eq!(
            line("From foo@bar Mon Dec  7\r\nTo: a@b.c\r\n\r\n"),
            Some((1, LineProblem::NotAField))
        );
        assert_eq!(
            line("hello\r\n \r\nCc: eve@evil.org\r\n\r\n"),
            Some((1, LineProblem::NotAField))
        );
        assert_eq!(
            line("hello\r\nCc : eve@evil.org\r\n"),
            Some((1, LineProblem::NotAField))
        );
        // A message that starts with no field and has none is all body.
        assert_eq!(
            read(b".dot first\r\nx y\r\n\r\nTo: a@b.c\r\n"),
            Reading::default()
        );
        assert_eq!(read(b"x\r\n.\r\n"), Reading::default());
        assert_eq!(
            line("Subject: a\rCc: eve@evil.org\r\n\r\n"),
            Some((1, LineProblem::BareCr))
        );
        assert_eq!(
            line("Subject: a\r\n\t \r\n\r\n"),
            Some((2, LineProblem::WhitespaceOnly))
        );
        // After the empty line it is body: anything goes.
        assert_eq!(
            ambiguity("Subject: a\r\n\r\nX-Broken\r\n \r\nCc: eve@evil.org\r\n"),
            None
        );
        assert_eq!(ambiguity("Subject: a\n\nX-Broken\n"), None);
        assert_eq!(ambiguity(""), None);
        assert_eq!(ambiguity("\r\nX-Broken\r\n"), None);
    }

    #[test]
    fn unreadable_values() {
        for (raw, why) in [
            ("To: \"eve <bob@x.org>\r\n\r\n", "unclosed quoted string"),
            ("To: (eve <bob@x.org>\r\n\r\n", "unclosed comment"),
            ("To: <bob@x.org\r\n\r\n", "unclosed '<'"),
            ("To: a <b@x.org> <c@y.org>\r\n\r\n", "two <…> in one entry"),
            ("To: a: b: c@x.org;;\r\n\r\n", "a group inside a group"),
            (
                "To: bob@example.org\x0beve@evil.org\r\n\r\n",
                "control character",
            ),
            ("To: bob@exa\0mple.org\r\n\r\n", "control character"),
            (
                "To: \\pp@x.org\r\n\r\n",
                "backslash outside a quoted string",
            ),
            ("To: a@x.org)\r\n\r\n", "unbalanced ')' or ']'"),
            ("To: a@x.org>\r\n\r\n", "'>' without '<'"),
            ("To: \u{fffd}a@x.org\r\n\r\n", "bytes that are not UTF-8"),
        ] {
            assert_eq!(
                ambiguity(raw),
                Some(Ambiguity::Unreadable { field: "To", why }),
                "{raw}"
            );
        }
    }

    #[test]
    fn two_addresses_without_a_comma_are_no_one_address() {
        assert_eq!(
            ambiguity("To: bob@example.org eve@evil.org\r\n\r\n"),
            display("To", "bob@example.org")
        );
        assert_eq!(ambiguity("To: bob @ example . org\r\n\r\n"), None);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 7u64;
        for _ in 0..3000 {
            let mut raw = Vec::new();
            for _ in 0..(seed % 60) {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let pick = b"To: <>@,;:.\"()[]\\ \t\r\n=?utf-8?q?b?Q_=40=4x eve\xc3\xa9\xff";
                raw.push(pick[(seed >> 33) as usize % pick.len()]);
            }
            let _ = read(&raw);
        }
    }
}
