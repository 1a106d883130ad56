//! Pure: the recipients a message's own headers name (`To:`, `Cc:`, `Bcc:`), and the
//! `Bcc:` completion of a copy sent through Microsoft Graph, which takes its recipients
//! from the headers rather than from an envelope (SPEC §7).

use std::borrow::Cow;

use mail_parser::{HeaderName, HeaderValue, MessageParser};

/// The addresses of a message's recipient headers (display names dropped, groups
/// flattened; an entry without an address, like `undisclosed-recipients:;`, is skipped:
/// no one can be sent to through it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecipientHeaders {
    /// `To:` and `Cc:` addresses, each with its header's name.
    pub to_cc: Vec<(&'static str, String)>,
    /// `Bcc:` addresses.
    pub bcc: Vec<String>,
    /// The message has a `Bcc:` header (even an empty one).
    pub has_bcc: bool,
}

impl RecipientHeaders {
    /// Every address in `To:`, `Cc:` and `Bcc:`.
    pub fn all(&self) -> impl Iterator<Item = &str> {
        self.to_cc
            .iter()
            .map(|(_, a)| a.as_str())
            .chain(self.bcc.iter().map(String::as_str))
    }
}

/// Parses the recipient headers of `raw` (the header section, or the whole message:
/// parsing stops at the first empty line). Never panics.
pub fn recipient_headers(raw: &[u8]) -> RecipientHeaders {
    let mut out = RecipientHeaders::default();
    let end = header_end(raw);
    let Some(message) = MessageParser::default().parse_headers(&raw[..end]) else {
        return out;
    };
    for header in message.headers() {
        let field = match &header.name {
            HeaderName::To => "To",
            HeaderName::Cc => "Cc",
            HeaderName::Bcc => {
                out.has_bcc = true;
                "Bcc"
            }
            _ => continue,
        };
        if let HeaderValue::Address(address) = &header.value {
            for addr in address.iter() {
                let Some(a) = addr.address().map(str::trim).filter(|a| !a.is_empty()) else {
                    continue;
                };
                if field == "Bcc" {
                    out.bcc.push(a.to_string());
                } else {
                    out.to_cc.push((field, a.to_string()));
                }
            }
        }
    }
    out
}

/// Addresses are compared without regard to letter case, as routing does.
pub fn same_address(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b) || a.to_lowercase() == b.to_lowercase()
}

/// How a message's headers fit its envelope for a Graph send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderFit {
    /// Every header address is an envelope recipient; these envelope recipients are in
    /// no header and go into a `Bcc:` of the copy sent (empty: nothing to add).
    Fits {
        /// Envelope recipients to add in `Bcc:`.
        missing: Vec<String>,
    },
    /// A header address is no envelope recipient: Graph would send to it.
    Stranger {
        /// `To`, `Cc` or `Bcc`.
        field: &'static str,
        /// The address.
        address: String,
    },
}

/// Compares `headers` with the envelope's `recipients`.
pub fn fit(recipients: &[String], headers: &RecipientHeaders) -> HeaderFit {
    let in_envelope = |a: &str| recipients.iter().any(|r| same_address(r, a));
    let strangers = headers
        .to_cc
        .iter()
        .map(|(f, a)| (*f, a))
        .chain(headers.bcc.iter().map(|a| ("Bcc", a)));
    for (field, address) in strangers {
        if !in_envelope(address) {
            return HeaderFit::Stranger {
                field,
                address: address.clone(),
            };
        }
    }
    let mut missing: Vec<String> = Vec::new();
    for r in recipients {
        let named = headers.all().any(|a| same_address(a, r));
        if !named && !missing.iter().any(|m| same_address(m, r)) {
            missing.push(r.clone());
        }
    }
    HeaderFit::Fits { missing }
}

/// The message with `missing` added to its `Bcc:` header: appended to an existing
/// `Bcc:` field (after its last folded line), or a new `Bcc:` line at the top. Every
/// other byte stays as it was. Nothing to add: the message itself, not copied.
pub fn with_bcc<'a>(raw: &'a [u8], missing: &[String]) -> Cow<'a, [u8]> {
    if missing.is_empty() {
        return Cow::Borrowed(raw);
    }
    let list = missing.join(", ");
    let end = header_end(raw);
    let mut at = 0;
    while at < end {
        let line_end = next_line(raw, at);
        let line = &raw[at..line_end];
        let is_bcc = line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"bcc:");
        if !is_bcc {
            at = line_end;
            continue;
        }
        // The field ends before the first line that is not a folded continuation.
        let mut field_end = line_end;
        while field_end < end && matches!(raw[field_end], b' ' | b'\t') {
            field_end = next_line(raw, field_end);
        }
        let mut insert = field_end;
        while insert > at && matches!(raw[insert - 1], b'\r' | b'\n') {
            insert -= 1;
        }
        let value_blank = raw[at + 4..insert].iter().all(u8::is_ascii_whitespace);
        let added = if value_blank {
            format!(" {list}")
        } else {
            format!(",\r\n {list}")
        };
        let mut out = Vec::with_capacity(raw.len() + added.len());
        out.extend_from_slice(&raw[..insert]);
        out.extend_from_slice(added.as_bytes());
        out.extend_from_slice(&raw[insert..]);
        return Cow::Owned(out);
    }
    let line = format!("Bcc: {list}\r\n");
    let mut out = Vec::with_capacity(raw.len() + line.len());
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(raw);
    Cow::Owned(out)
}

/// The index just after the line starting at `at` (after its LF, or the end).
fn next_line(raw: &[u8], at: usize) -> usize {
    memchr::memchr(b'\n', &raw[at..]).map_or(raw.len(), |i| at + i + 1)
}

/// Length of the header section: up to and including the line break before the first
/// empty line (the whole input when there is none).
pub(crate) fn header_end(raw: &[u8]) -> usize {
    if raw.starts_with(b"\n") || raw.starts_with(b"\r\n") {
        return 0;
    }
    raw.windows(3)
        .position(|w| w[0] == b'\n' && (w[1] == b'\n' || (w[1] == b'\r' && w[2] == b'\n')))
        .map(|i| i + 1)
        .or_else(|| raw.ends_with(b"\n\n").then(|| raw.len() - 1))
        .unwrap_or(raw.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rcpts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn reads_to_cc_bcc_with_groups_and_names() {
        let h = recipient_headers(
            b"From: a@x.org\r\nTo: \"Bob B\" <bob@x.org>, carol@x.org\r\nCc: team: dan@x.org;\r\n\
              Bcc:\r\nSubject: hi\r\n\r\nTo: body@x.org\r\n",
        );
        assert_eq!(
            h.to_cc,
            vec![
                ("To", "bob@x.org".to_string()),
                ("To", "carol@x.org".to_string()),
                ("Cc", "dan@x.org".to_string())
            ]
        );
        assert!(h.bcc.is_empty() && h.has_bcc);
        let none = recipient_headers(b"To: undisclosed-recipients:;\r\n\r\n");
        assert!(none.to_cc.is_empty() && !none.has_bcc);
    }

    #[test]
    fn fit_finds_strangers_and_missing_recipients() {
        let h = recipient_headers(b"To: Bob@X.org\r\nCc: carol@x.org\r\n\r\nbody\r\n");
        assert_eq!(
            fit(&rcpts(&["bob@x.org", "carol@x.org", "dave@x.org"]), &h),
            HeaderFit::Fits {
                missing: rcpts(&["dave@x.org"])
            }
        );
        assert_eq!(
            fit(&rcpts(&["bob@x.org"]), &h),
            HeaderFit::Stranger {
                field: "Cc",
                address: "carol@x.org".into()
            }
        );
        let b = recipient_headers(b"To: bob@x.org\r\nBcc: eve@x.org\r\n\r\n");
        assert_eq!(
            fit(&rcpts(&["bob@x.org"]), &b),
            HeaderFit::Stranger {
                field: "Bcc",
                address: "eve@x.org".into()
            }
        );
        assert_eq!(
            fit(&rcpts(&["bob@x.org", "eve@x.org"]), &b),
            HeaderFit::Fits { missing: vec![] }
        );
    }

    #[test]
    fn bcc_is_added_and_nothing_else_changes() {
        let msg = b"From: a@x.org\r\nTo: bob@x.org\r\n\r\nbody\r\n";
        assert!(matches!(with_bcc(msg, &[]), Cow::Borrowed(_)));
        let out = with_bcc(msg, &rcpts(&["c@x.org", "d@x.org"]));
        assert_eq!(
            &out[..],
            b"Bcc: c@x.org, d@x.org\r\nFrom: a@x.org\r\nTo: bob@x.org\r\n\r\nbody\r\n"
        );
        let folded =
            b"To: bob@x.org\r\nBCC: e@x.org,\r\n\tf@x.org\r\nSubject: s\r\n\r\nBcc: body\r\n";
        let out = with_bcc(folded, &rcpts(&["c@x.org"]));
        assert_eq!(
            &out[..],
            &b"To: bob@x.org\r\nBCC: e@x.org,\r\n\tf@x.org,\r\n c@x.org\r\nSubject: s\r\n\r\nBcc: body\r\n"[..]
        );
        let empty = b"To: bob@x.org\r\nBcc:\r\n\r\nbody\r\n";
        assert_eq!(
            &with_bcc(empty, &rcpts(&["c@x.org"]))[..],
            b"To: bob@x.org\r\nBcc: c@x.org\r\n\r\nbody\r\n"
        );
        let parsed = recipient_headers(&with_bcc(folded, &rcpts(&["c@x.org"])));
        assert_eq!(parsed.bcc, rcpts(&["e@x.org", "f@x.org", "c@x.org"]));
    }
}
