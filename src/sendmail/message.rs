//! The message read on stdin: lines, the `.` rule, the header section, recipients from
//! headers, `Bcc:` removal, the headers Postfix's cleanup adds, dot-stuffing.

use mail_parser::{HeaderName, MessageParser};

/// Splits stdin into lines (LF or CRLF; the line ends are dropped). Without `ignore_dots`
/// a line holding only `.` ends the message, as traditional sendmail does.
pub fn lines(input: &[u8], ignore_dots: bool) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let body = input.strip_suffix(b"\n").unwrap_or(input);
    if input.is_empty() {
        return out;
    }
    for line in body.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if !ignore_dots && line == b"." {
            break;
        }
        out.push(line);
    }
    out
}

/// One header field: its name and its lines (the first and any continuations).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field<'a> {
    /// The field name as written.
    pub name: &'a str,
    /// The field's lines without line ends.
    pub lines: Vec<&'a [u8]>,
}

impl Field<'_> {
    fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }
}

/// A message split into its header fields and its body lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    /// The header fields in order.
    pub fields: Vec<Field<'a>>,
    /// The body lines (after the blank separator line, if there was one).
    pub body: Vec<&'a [u8]>,
}

/// The field name of a header line (`Name: value`), if it is one.
fn field_name(line: &[u8]) -> Option<&str> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = &line[..colon];
    let printable = |b: &u8| (33..=126).contains(b);
    if name.is_empty() || !name.iter().all(printable) {
        return None;
    }
    std::str::from_utf8(name).ok()
}

impl<'a> Message<'a> {
    /// Splits lines into header fields and body. A leading mbox `From ` line is dropped
    /// (Postfix does too); the header section ends at a blank line or at the first line
    /// that is neither a field nor a continuation, which then starts the body.
    pub fn split(lines: &[&'a [u8]]) -> Self {
        let mut rest = lines;
        if let Some(first) = rest.first()
            && first.starts_with(b"From ")
        {
            rest = &rest[1..];
        }
        let mut fields: Vec<Field<'a>> = Vec::new();
        let mut i = 0;
        while i < rest.len() {
            let line = rest[i];
            if line.is_empty() {
                i += 1;
                break;
            }
            if line.starts_with(b" ") || line.starts_with(b"\t") {
                match fields.last_mut() {
                    Some(field) => field.lines.push(line),
                    None => break,
                }
            } else if let Some(name) = field_name(line) {
                fields.push(Field {
                    name,
                    lines: vec![line],
                });
            } else {
                break;
            }
            i += 1;
        }
        Message {
            fields,
            body: rest[i..].to_vec(),
        }
    }

    /// True when a field of that name (any case) is present.
    pub fn has(&self, name: &str) -> bool {
        self.fields.iter().any(|f| f.is(name))
    }

    /// The addresses in `To:`, `Cc:` and `Bcc:` (groups, display names and encoded words
    /// handled by mail-parser), in order.
    pub fn header_recipients(&self) -> Vec<String> {
        let mut raw = Vec::new();
        for field in &self.fields {
            if field.is("to") || field.is("cc") || field.is("bcc") {
                for line in &field.lines {
                    raw.extend_from_slice(line);
                    raw.extend_from_slice(b"\r\n");
                }
            }
        }
        raw.extend_from_slice(b"\r\n");
        let Some(parsed) = MessageParser::new().parse_headers(&raw) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for name in [HeaderName::To, HeaderName::Cc, HeaderName::Bcc] {
            for value in parsed.header_values(name) {
                if let Some(list) = value.as_address() {
                    out.extend(list.iter().filter_map(|a| a.address()).map(str::to_string));
                }
            }
        }
        out
    }

    /// Removes `Bcc:` and `Resent-Bcc:`: they are envelope information, never content.
    pub fn remove_bcc(&mut self) {
        self.fields.retain(|f| !f.is("bcc") && !f.is("resent-bcc"));
    }

    /// The message as submitted: CRLF line ends, `added` lines after the header fields,
    /// one blank line, the body. Not dot-stuffed (see [`dot_stuff`]).
    pub fn render(&self, added: &[String]) -> Vec<u8> {
        let mut out = Vec::new();
        for line in self.fields.iter().flat_map(|f| &f.lines) {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
        for line in added {
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        for line in &self.body {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
        out
    }
}

/// A display name for a `From:` field: bare when it is plain words, a quoted string when
/// it holds specials, an RFC 2047 encoded word when it is not ASCII.
pub fn display_name(name: &str) -> String {
    use base64::Engine;
    if !name.is_ascii() {
        let encoded = base64::engine::general_purpose::STANDARD.encode(name);
        return format!("=?UTF-8?B?{encoded}?=");
    }
    let atext = |c: char| c.is_ascii_alphanumeric() || " !#$%&'*+-/=?^_`{|}~".contains(c);
    if name.chars().all(atext) && !name.trim().is_empty() {
        return name.trim().to_string();
    }
    let escaped: String = name
        .chars()
        .filter(|c| !c.is_ascii_control())
        .flat_map(|c| match c {
            '"' | '\\' => vec!['\\', c],
            _ => vec![c],
        })
        .collect();
    format!("\"{escaped}\"")
}

/// Doubles a `.` at the start of every line (RFC 5321 §4.5.2) of a CRLF message.
pub fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 16);
    let mut at_line_start = true;
    for &b in message {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_dot_ends_the_message_unless_ignore_dots() {
        let input = b"Subject: x\n\nbefore\n.\nafter\n";
        assert_eq!(lines(input, false), [&b"Subject: x"[..], b"", b"before"]);
        assert_eq!(
            lines(input, true),
            [&b"Subject: x"[..], b"", b"before", b".", b"after"]
        );
        // ".." and ". " are content either way; CRLF input is the same as LF
        assert_eq!(
            lines(b"a\r\n..\r\n. \r\nb", false),
            [&b"a"[..], b"..", b". ", b"b"]
        );
        assert_eq!(lines(b".\r\nrest\r\n", false), Vec::<&[u8]>::new());
        assert_eq!(lines(b"", true), Vec::<&[u8]>::new());
        assert_eq!(lines(b"\n", true), [&b""[..]]);
    }

    #[test]
    fn header_section_fields_continuations_and_body() {
        let input =
            b"From alice Mon Jan  1 00:00:00 2026\nSubject: hi\n there\nTo: a@b\n\nbody\n\nmore\n";
        let m = Message::split(&lines(input, true));
        assert_eq!(m.fields.len(), 2);
        assert_eq!(m.fields[0].name, "Subject");
        assert_eq!(m.fields[0].lines, [&b"Subject: hi"[..], b" there"]);
        assert_eq!(m.body, [&b"body"[..], b"", b"more"]);
        // no header at all: everything is body, and a blank line goes in front of it
        let m = Message::split(&lines(b"just text: no\nheader\n", true));
        assert!(m.fields.is_empty());
        let m = Message::split(&lines(b"hello world\nsecond\n", true));
        assert!(m.fields.is_empty());
        assert_eq!(m.render(&[]), b"\r\nhello world\r\nsecond\r\n");
        // a body that starts without the blank line gets one
        let m = Message::split(&lines(b"Subject: s\nnot a header\n", true));
        assert_eq!(m.render(&[]), b"Subject: s\r\n\r\nnot a header\r\n");
    }

    #[test]
    fn recipients_from_to_cc_bcc_with_groups_names_and_encoded_words() {
        let input = b"To: \"Doe, Jane\" <jane@example.com>, bob@example.org\n\
            Cc: team: x@example.net, =?UTF-8?B?SsO2cmc=?= <joerg@example.de>;\n\
            Subject: not a recipient <s@example.com>\n\
            bcc: hidden@example.com\n\
            To: second@example.com\n\n\
            To: body@example.com\n";
        let m = Message::split(&lines(input, true));
        assert_eq!(
            m.header_recipients(),
            [
                "jane@example.com",
                "bob@example.org",
                "second@example.com",
                "x@example.net",
                "joerg@example.de",
                "hidden@example.com"
            ]
        );
    }

    #[test]
    fn bcc_is_removed_with_its_continuation_lines() {
        let input = b"To: a@b\nBcc: c@d,\n  e@f\nResent-Bcc: g@h\nSubject: s\n\nbody\n";
        let mut m = Message::split(&lines(input, true));
        m.remove_bcc();
        assert_eq!(
            m.render(&["Date: now".to_string()]),
            b"To: a@b\r\nSubject: s\r\nDate: now\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn display_names() {
        assert_eq!(display_name("CronDaemon"), "CronDaemon");
        assert_eq!(display_name("Cron Daemon"), "Cron Daemon");
        assert_eq!(display_name("Doe, Jane"), "\"Doe, Jane\"");
        assert_eq!(display_name("a \"b\" \\c"), "\"a \\\"b\\\" \\\\c\"");
        assert_eq!(display_name("Jörg"), "=?UTF-8?B?SsO2cmc=?=");
        assert_eq!(display_name("evil\r\nBcc: x"), "\"evilBcc: x\"");
    }

    #[test]
    fn dot_stuffing_doubles_leading_dots_only() {
        assert_eq!(
            dot_stuff(b".\r\n..x\r\na.b\r\n.\r\n"),
            b"..\r\n...x\r\na.b\r\n..\r\n"
        );
        assert_eq!(dot_stuff(b""), b"");
    }
}
