//! Pure header rewrites of SPEC §4a (no I/O): `header_from = "replace"` of a
//! `[[rewrite]]` entry ([`replace_from`]), and the Graph From repair ([`repair_from`]).
//!
//! Both work on the raw header section and leave every byte they do not own as it was:
//! other fields keep their folding, order and spelling, and the body is never touched.

use std::borrow::Cow;

use base64::Engine;
use mail_parser::MessageParser;

/// One field of a header section: `[start, end)` covers its first line and every folded
/// continuation line, line breaks included.
struct Field {
    start: usize,
    end: usize,
    /// Where the colon is (absolute), when the first line is `name:`.
    colon: Option<usize>,
}

impl Field {
    /// The field name (blanks before the colon dropped), if the field has one.
    fn name<'a>(&self, raw: &'a [u8]) -> Option<&'a [u8]> {
        let colon = self.colon?;
        Some(raw[self.start..colon].trim_ascii_end())
    }

    fn is(&self, raw: &[u8], name: &str) -> bool {
        self.name(raw)
            .is_some_and(|n| n.eq_ignore_ascii_case(name.as_bytes()))
    }
}

/// The fields of `section` (which may be the whole message: it stops at the empty line).
fn fields(raw: &[u8]) -> Vec<Field> {
    let end = super::recipients::header_end(raw);
    let mut out: Vec<Field> = Vec::new();
    let mut at = 0;
    while at < end {
        let line_end = memchr::memchr(b'\n', &raw[at..end]).map_or(end, |i| at + i + 1);
        let continuation = matches!(raw[at], b' ' | b'\t');
        match out.last_mut() {
            Some(last) if continuation => last.end = line_end,
            _ => {
                let line = &raw[at..line_end];
                // A name is printable ASCII without blanks; blanks may precede the colon.
                let colon = memchr::memchr(b':', line).filter(|&c| {
                    let name = line[..c].trim_ascii_end();
                    !name.is_empty() && name.iter().all(|b| b.is_ascii_graphic())
                });
                out.push(Field {
                    start: at,
                    end: line_end,
                    colon: colon.map(|c| at + c),
                });
            }
        }
        at = line_end;
    }
    out
}

/// `header_from = "replace"`: the header section `section` with every `From:` and
/// `Sender:` field removed and one `From:` naming `sender` put where the first `From:`
/// was (at the end when there was none). The display name is the first From entry's, if
/// it has one without `@`; else the local part of that entry's address, or of
/// `original` (the envelope sender the client gave) when the From names no address.
pub fn replace_from(section: &[u8], sender: &str, original: &str) -> Vec<u8> {
    let list = fields(section);
    let from = list.iter().find(|f| f.is(section, "from"));
    let (name, address) = from
        .map(|f| first_mailbox(&section[f.start..f.end]))
        .unwrap_or_default();
    let display = match name {
        Some(name) if !name.contains('@') && !name.trim().is_empty() => name,
        _ => local_part(address.as_deref().unwrap_or(original)),
    };
    let line = from_line(&display, sender);
    let mut out = Vec::with_capacity(section.len() + line.len());
    let mut placed = false;
    let mut copied = 0;
    // The new From takes the first From's place (the header order stays the client's);
    // without a From, the first Sender's.
    let has_from = from.is_some();
    for field in &list {
        let is_from = field.is(section, "from");
        let drop = is_from || field.is(section, "sender");
        if !drop {
            continue;
        }
        out.extend_from_slice(&section[copied..field.start]);
        copied = field.end;
        if !placed && (is_from || !has_from) {
            out.extend_from_slice(line.as_bytes());
            placed = true;
        }
    }
    let rest = &section[copied..];
    if placed {
        out.extend_from_slice(rest);
        return out;
    }
    // No From: the new one goes after the last field, before the empty line if any.
    let end = copied + super::recipients::header_end(rest);
    out.extend_from_slice(&section[copied..end]);
    if !out.is_empty() && !out.ends_with(b"\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(&section[end..]);
    out
}

/// The name and address of the first mailbox in one `From:` field (groups included),
/// as a mail reader sees them (encoded words decoded).
fn first_mailbox(field: &[u8]) -> (Option<String>, Option<String>) {
    let mut text = field.to_vec();
    text.extend_from_slice(b"\r\n");
    let Some(message) = MessageParser::default().parse_headers(&text) else {
        return (None, None);
    };
    let Some(addr) = message.from().and_then(|a| a.iter().next()) else {
        return (None, None);
    };
    let address = addr
        .address()
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_string);
    (addr.name().map(str::to_string), address)
}

/// The local part of `address`, without the quotes of a quoted one.
fn local_part(address: &str) -> String {
    let local = address.rsplit_once('@').map_or(address, |(l, _)| l);
    let local = local
        .strip_prefix('"')
        .and_then(|l| l.strip_suffix('"'))
        .unwrap_or(local);
    local.replace("\\\"", "\"").replace("\\\\", "\\")
}

/// `From: <phrase> <sender>` with its line break, folded at spaces to stay near 78
/// characters a line (a long display name must not break the 998-octet limit).
fn from_line(display: &str, sender: &str) -> String {
    let line = match phrase(display) {
        Some(p) => format!("From: {p} <{sender}>"),
        None => format!("From: <{sender}>"),
    };
    let mut out = String::with_capacity(line.len() + 2);
    let mut width = 0;
    for (i, word) in line.split(' ').enumerate() {
        // Encoded words come folded already: their lines are short.
        let first_len = word.split("\r\n").next().map_or(0, str::len);
        if i > 0 {
            if width + 1 + first_len > 78 {
                out.push_str("\r\n ");
                width = 1;
            } else {
                out.push(' ');
                width += 1;
            }
        }
        out.push_str(word);
        width = match word.rsplit_once("\r\n") {
            Some((_, last)) => last.len(),
            None => width + word.len(),
        };
    }
    out.push_str("\r\n");
    out
}

/// `atext` of RFC 5322 §3.2.3.
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c)
}

/// A display name written as an RFC 5322 phrase: atoms as they are, else one quoted
/// string; a name with non-ASCII characters as RFC 2047 encoded words (UTF-8, base64,
/// each at most 75 characters, folded between them). Runs of white space (line breaks
/// included) become one space; control characters go. `None` for an empty name.
pub fn phrase(name: &str) -> Option<String> {
    let cleaned: String = name
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let words: Vec<&str> = cleaned.split_whitespace().collect();
    if words.is_empty() {
        return None;
    }
    let name = words.join(" ");
    if !name.is_ascii() {
        return Some(encoded_words(&name));
    }
    if words.iter().all(|w| w.chars().all(is_atext)) {
        return Some(name);
    }
    let mut quoted = String::with_capacity(name.len() + 2);
    quoted.push('"');
    for c in name.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    Some(quoted)
}

/// `=?UTF-8?B?…?=` words for `text`, split on character boundaries so that each word
/// holds at most 45 bytes (60 base64 characters: 72 in all).
fn encoded_words(text: &str) -> String {
    let mut words = Vec::new();
    let mut chunk = String::new();
    for c in text.chars() {
        if chunk.len() + c.len_utf8() > 45 {
            words.push(std::mem::take(&mut chunk));
        }
        chunk.push(c);
    }
    if !chunk.is_empty() {
        words.push(chunk);
    }
    words
        .iter()
        .map(|w| {
            let b64 = base64::engine::general_purpose::STANDARD.encode(w.as_bytes());
            format!("=?UTF-8?B?{b64}?=")
        })
        .collect::<Vec<_>>()
        .join("\r\n ")
}

/// The Graph From repair (SPEC §4a, last paragraph): each `From:` field written
/// `display <address>` whose display name is bare text holding an `@` or a `.` (not
/// valid RFC 5322, which Exchange refuses as send-as) and no address other than the
/// entry's own is rewritten `From: "display" <address>`. Anything else, ambiguous or
/// already valid, is left as it is, as is every other byte of `message`.
pub fn repair_from(message: &[u8]) -> Cow<'_, [u8]> {
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0;
    for field in fields(message) {
        if !field.is(message, "from") {
            continue;
        }
        let Some(colon) = field.colon else { continue };
        let Some(fixed) = repaired_value(&message[colon + 1..field.end]) else {
            continue;
        };
        let buf = out.get_or_insert_with(|| Vec::with_capacity(message.len() + 8));
        buf.extend_from_slice(&message[copied..=colon]);
        buf.extend_from_slice(fixed.as_bytes());
        copied = field.end;
    }
    match out {
        Some(mut buf) => {
            buf.extend_from_slice(&message[copied..]);
            Cow::Owned(buf)
        }
        None => Cow::Borrowed(message),
    }
}

/// The repaired value (` "display" <address>` and its line break) of one From field's
/// value, if it needs and allows the repair.
fn repaired_value(value: &[u8]) -> Option<String> {
    let value = std::str::from_utf8(value).ok()?;
    let unfolded: String = value
        .chars()
        .filter(|c| !matches!(c, '\r' | '\n'))
        .collect();
    let unfolded = unfolded.trim();
    let (display, rest) = unfolded.split_once('<')?;
    let (address, after) = rest.split_once('>')?;
    let display = display.trim();
    let address = address.trim();
    let plain = |s: &str| !s.contains(['"', '(', ')', '\\', ',', ';', ':', '<', '>', '[', ']']);
    if display.is_empty()
        || !after.trim().is_empty()
        || !plain(display)
        || display.contains("=?")
        || address.is_empty()
        || address.contains(char::is_whitespace)
        || !address.contains('@')
        || !display.contains(['@', '.'])
    {
        return None;
    }
    // Unambiguous only: every address-like word of the name is the entry's own.
    let foreign = display
        .split_whitespace()
        .filter(|w| w.contains('@'))
        .any(|w| !super::recipients::same_address(w, address));
    if foreign {
        return None;
    }
    let words: Vec<&str> = display.split_whitespace().collect();
    Some(format!(" \"{}\" <{address}>\r\n", words.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(b: &[u8]) -> &str {
        std::str::from_utf8(b).unwrap()
    }

    fn replaced(section: &str) -> String {
        let out = replace_from(
            section.as_bytes(),
            "scans@example.com",
            "scanner@printer.local",
        );
        String::from_utf8(out).unwrap()
    }

    /// What a mail reader sees in the rewritten section: the From entries.
    fn read_from(section: &str) -> Vec<(Option<String>, Option<String>)> {
        let message = MessageParser::default()
            .parse_headers(section.as_bytes())
            .unwrap();
        message
            .from()
            .map(|a| {
                a.iter()
                    .map(|m| {
                        (
                            m.name().map(str::to_string),
                            m.address().map(str::to_string),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn a_missing_from_is_added_after_the_last_field_with_the_local_part() {
        let out = replaced("Subject: scan\r\nTo: a@example.com\r\n");
        assert_eq!(
            out,
            "Subject: scan\r\nTo: a@example.com\r\nFrom: scanner <scans@example.com>\r\n"
        );
        // A header section with no field at all.
        assert_eq!(replaced(""), "From: scanner <scans@example.com>\r\n");
        // One that lacks its last line break (BDAT may end that way).
        assert_eq!(
            replaced("Subject: x"),
            "Subject: x\r\nFrom: scanner <scans@example.com>\r\n"
        );
    }

    #[test]
    fn the_display_name_is_kept_and_quoted_as_needed() {
        assert_eq!(
            replaced("From: Scanner <scanner@printer.local>\r\nSubject: s\r\n"),
            "From: Scanner <scans@example.com>\r\nSubject: s\r\n"
        );
        assert_eq!(
            replaced("From: J. Smith <j@printer.local>\r\n"),
            "From: \"J. Smith\" <scans@example.com>\r\n"
        );
        let out = replaced("From: \"Floor \\\"3\\\" copier\" <x@printer.local>\r\n");
        assert_eq!(
            out,
            "From: \"Floor \\\"3\\\" copier\" <scans@example.com>\r\n"
        );
        assert_eq!(
            read_from(&out),
            [(
                Some("Floor \"3\" copier".into()),
                Some("scans@example.com".into())
            )]
        );
    }

    #[test]
    fn an_at_sign_in_the_display_name_gives_the_local_part() {
        assert_eq!(
            replaced("From: scan@x.com <scan@x.com>\r\n"),
            "From: scan <scans@example.com>\r\n"
        );
        assert_eq!(
            replaced("From: \"boss@corp.com\" <dev7@printer.local>\r\n"),
            "From: dev7 <scans@example.com>\r\n"
        );
        // No display name at all: the From's own local part.
        assert_eq!(
            replaced("From: copier.2@printer.local\r\n"),
            "From: \"copier.2\" <scans@example.com>\r\n"
        );
    }

    #[test]
    fn a_folded_from_and_every_sender_go_the_rest_stays_byte_for_byte() {
        let section = "Received: from a\r\n\tby b;\r\n Mon, 1 Jan\r\nFrom: Front\r\n Desk\r\n\t<desk@printer.local>\r\nSubject: a\r\n  folded subject\r\nSender: one@printer.local\r\nX-A: 1\r\nsender : two@printer.local\r\nSENDER: three\r\n  @printer.local\r\n";
        assert_eq!(
            replaced(section),
            "Received: from a\r\n\tby b;\r\n Mon, 1 Jan\r\nFrom: Front Desk <scans@example.com>\r\nSubject: a\r\n  folded subject\r\nX-A: 1\r\n"
        );
    }

    #[test]
    fn the_new_from_takes_the_first_froms_place_not_an_earlier_senders() {
        let out = replaced(
            "Sender: s@printer.local\r\nSubject: s\r\nFrom: A <scanner@printer.local>\r\nTo: b@x\r\n",
        );
        assert_eq!(
            out,
            "Subject: s\r\nFrom: A <scans@example.com>\r\nTo: b@x\r\n"
        );
        // Without a From, it takes the first Sender's place.
        let out = replaced("Subject: s\r\nSender: s@printer.local\r\nTo: b@x\r\n");
        assert_eq!(
            out,
            "Subject: s\r\nFrom: scanner <scans@example.com>\r\nTo: b@x\r\n"
        );
    }

    #[test]
    fn several_from_fields_become_one() {
        let out = replaced("From: A <a@printer.local>\r\nTo: t@x\r\nFrom: B <b@printer.local>\r\n");
        assert_eq!(out, "From: A <scans@example.com>\r\nTo: t@x\r\n");
    }

    #[test]
    fn encoded_words_are_decoded_and_encoded_again() {
        let out = replaced("From: =?ISO-8859-1?Q?J=F6rg_Scanner?= <j@printer.local>\r\n");
        assert_eq!(
            out,
            "From: =?UTF-8?B?SsO2cmcgU2Nhbm5lcg==?= <scans@example.com>\r\n"
        );
        assert_eq!(
            read_from(&out),
            [(
                Some("Jörg Scanner".into()),
                Some("scans@example.com".into())
            )]
        );
        // A long name: several words, each within 75 characters, folded between them.
        let long = "Ünïcödé ".repeat(12);
        let out = replaced(&format!("From: {long}<j@printer.local>\r\n"));
        assert!(out.lines().all(|l| l.len() <= 78), "{out}");
        for word in out.split_whitespace().filter(|w| w.starts_with("=?")) {
            assert!(word.len() <= 75, "{word}");
        }
        assert_eq!(read_from(&out)[0].0.as_deref(), Some(long.trim()));
    }

    #[test]
    fn a_group_gives_its_first_mailbox() {
        assert_eq!(
            replaced("From: Devices: Copier <c@printer.local>, d@printer.local;\r\n"),
            "From: Copier <scans@example.com>\r\n"
        );
        // An empty group: the envelope sender's local part.
        assert_eq!(
            replaced("From: undisclosed:;\r\n"),
            "From: scanner <scans@example.com>\r\n"
        );
    }

    #[test]
    fn the_rest_of_the_message_is_untouched() {
        let msg =
            "From: a@printer.local\r\nSubject: s\r\n\r\nFrom: not a header\r\nSender: body\r\n";
        let out = replaced(msg);
        assert_eq!(
            out,
            "From: a <scans@example.com>\r\nSubject: s\r\n\r\nFrom: not a header\r\nSender: body\r\n"
        );
        // Header-less message: the From goes before the empty line.
        assert_eq!(
            replaced("\r\nbody\r\n"),
            "From: scanner <scans@example.com>\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn a_long_display_name_is_folded_at_spaces_and_reads_the_same() {
        let name = "Floor 3 copier, east wing. ".repeat(60);
        let out = replaced(&format!("From: \"{name}\" <c@printer.local>\r\n"));
        assert!(out.lines().all(|l| l.len() <= 78), "{out}");
        assert!(out.ends_with(" <scans@example.com>\r\n"), "{out}");
        assert_eq!(
            read_from(&out),
            [(
                Some(name.trim().to_string()),
                Some("scans@example.com".into())
            )]
        );
    }

    #[test]
    fn phrases() {
        assert_eq!(phrase("Front Desk").as_deref(), Some("Front Desk"));
        assert_eq!(phrase(" a \r\n b ").as_deref(), Some("a b"));
        assert_eq!(phrase("a.b").as_deref(), Some("\"a.b\""));
        assert_eq!(phrase("x\"y\\z").as_deref(), Some("\"x\\\"y\\\\z\""));
        assert_eq!(phrase("  "), None);
    }

    #[test]
    fn graph_repair_quotes_an_unambiguous_display_name() {
        let fix = |m: &str| s(&repair_from(m.as_bytes())).to_string();
        assert_eq!(
            fix("From: scan@x.com <scan@x.com>\r\nSubject: s\r\n\r\nbody\r\n"),
            "From: \"scan@x.com\" <scan@x.com>\r\nSubject: s\r\n\r\nbody\r\n"
        );
        assert_eq!(
            fix("To: t@x\r\nfrom: J. Smith <j@x.com>\r\n\r\nFrom: J. Smith <j@x.com>\r\n"),
            "To: t@x\r\nfrom: \"J. Smith\" <j@x.com>\r\n\r\nFrom: J. Smith <j@x.com>\r\n"
        );
        // Folded: one line afterwards, same name and address.
        assert_eq!(
            fix("From: scan@x.com\r\n <scan@x.com>\r\n\r\n"),
            "From: \"scan@x.com\" <scan@x.com>\r\n\r\n"
        );
        let fixed = fix("From: scan@x.com <scan@x.com>\r\n");
        assert_eq!(
            read_from(&fixed),
            [(Some("scan@x.com".into()), Some("scan@x.com".into()))]
        );
        // Left alone: valid already, ambiguous, or not of that form.
        for same in [
            "From: John Smith <j@x.com>\r\n\r\n",
            "From: \"J. Smith\" <j@x.com>\r\n\r\n",
            "From: j@x.com\r\n\r\n",
            "From: ceo@other.com <app@x.com>\r\n\r\n",
            "From: =?UTF-8?Q?J.?= <j@x.com>\r\n\r\n",
            "From: a.b <a@x.com>, c <c@x.com>\r\n\r\n",
            "Subject: J. Smith <j@x.com>\r\n\r\n",
        ] {
            assert!(
                matches!(repair_from(same.as_bytes()), Cow::Borrowed(_)),
                "{same}"
            );
        }
    }
}
