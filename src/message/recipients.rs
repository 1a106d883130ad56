//! Pure: the recipients a message's own headers name (`To:`, `Cc:`, `Bcc:`), and the
//! `Bcc:` completion of a copy sent through Microsoft Graph, which takes its recipients
//! from the headers rather than from an envelope (SPEC §7).

use std::borrow::Cow;

use std::sync::OnceLock;

use mail_parser::{Header, HeaderName, HeaderValue, Message, MessageParser};

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
    /// Entries of `To:`, `Cc:` or `Bcc:` without an address mailgate can read (a display
    /// name alone like `"eve@example.org"` or `eve`, an encoded word), with their header's
    /// name and text: Exchange may still read a recipient in one, so none is let through.
    pub unreadable: Vec<(&'static str, String)>,
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
    match parse_header_section(raw) {
        Some(message) => recipients_of(message.headers()),
        None => RecipientHeaders::default(),
    }
}

/// The header section of `raw` (up to the first empty line) as mail-parser reads it, with
/// only the address fields routing and the recipient checks look at parsed
/// (`From`, `Sender`, `To`, `Cc`, `Bcc`) and every other field kept raw: the
/// default parser also read dates, message ids and encoded words nobody here uses,
/// a sixth of a relayed message's CPU. Field boundaries are the same either way.
pub fn parse_header_section(raw: &[u8]) -> Option<Message<'_>> {
    static PARSER: OnceLock<MessageParser> = OnceLock::new();
    let parser = PARSER.get_or_init(|| {
        MessageParser::new()
            .header_address(HeaderName::From)
            .header_address(HeaderName::Sender)
            .header_address(HeaderName::To)
            .header_address(HeaderName::Cc)
            .header_address(HeaderName::Bcc)
            .default_header_raw()
    });
    parser.parse_headers(&raw[..header_end(raw)])
}

/// The recipient headers among parsed `headers` (see [`recipient_headers`]).
pub fn recipients_of(headers: &[Header<'_>]) -> RecipientHeaders {
    let mut out = RecipientHeaders::default();
    for header in headers {
        let field = match &header.name {
            HeaderName::To => "To",
            HeaderName::Cc => "Cc",
            HeaderName::Bcc => {
                out.has_bcc = true;
                "Bcc"
            }
            _ => continue,
        };
        let address = match &header.value {
            HeaderValue::Address(address) => address,
            HeaderValue::Empty => continue,
            other => {
                let text = other.as_text().unwrap_or("?").trim();
                if !text.is_empty() {
                    out.unreadable.push((field, text.to_string()));
                }
                continue;
            }
        };
        // An empty group (`undisclosed-recipients:;`) yields no entry at all.
        for addr in address.iter() {
            let Some(a) = addr.address().map(str::trim).filter(|a| !a.is_empty()) else {
                if let Some(name) = addr.name().map(str::trim).filter(|n| !n.is_empty()) {
                    out.unreadable.push((field, name.to_string()));
                }
                continue;
            };
            if field == "Bcc" {
                out.bcc.push(a.to_string());
            } else {
                out.to_cc.push((field, a.to_string()));
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
    /// A header address is no envelope recipient (or an entry whose address cannot be
    /// read): Graph would send to it.
    Stranger {
        /// `To`, `Cc` or `Bcc`.
        field: &'static str,
        /// The address.
        address: String,
    },
}

/// Why no Graph copy can be made of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unfit {
    /// A header address (or unreadable entry) is no envelope recipient: Graph would send
    /// to it.
    Stranger {
        /// `To`, `Cc` or `Bcc`.
        field: &'static str,
        /// The address.
        address: String,
    },
    /// An envelope recipient that the `Bcc:` of the copy would not name after all (the
    /// existing `Bcc:` field swallows it, e.g. inside an unclosed quote): Graph would not
    /// send to it.
    Unwritable {
        /// The envelope recipient.
        address: String,
    },
    /// An envelope recipient with a quoted local part (`"a@x,b"@y`, `"john doe"@y`):
    /// written into `Bcc:`, Exchange may read it as another mailbox or as several, and
    /// mailgate's own reading of headers (mail-parser) drops the quotes, so the copy
    /// cannot be checked.
    Quoted {
        /// The envelope recipient.
        address: String,
    },
}

/// Compares `headers` with the envelope's `recipients`.
pub fn fit(recipients: &[String], headers: &RecipientHeaders) -> HeaderFit {
    let in_envelope = |a: &str| recipients.iter().any(|r| same_address(r, a));
    if let Some((field, text)) = headers.unreadable.first() {
        return HeaderFit::Stranger {
            field,
            address: text.clone(),
        };
    }
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

/// The copy of `raw` to send through Graph, and how many recipients its added `Bcc:`
/// names. The copy is read back the way the original was: every envelope recipient must
/// now be named and nothing else, so that no byte of the client's (a folded line at the
/// very top, an unclosed quote in its `Bcc:`) and no envelope address that reads as
/// several (`"a@x,b"@y` arrives unquoted) changes whom Graph sends to.
pub fn graph_copy<'a>(
    recipients: &[String],
    raw: &'a [u8],
) -> Result<(Cow<'a, [u8]>, usize), Unfit> {
    if let Some(quoted) = recipients
        .iter()
        .find(|r| super::address::has_quoted_local(r))
    {
        return Err(Unfit::Quoted {
            address: quoted.clone(),
        });
    }
    let missing = match fit(recipients, &recipient_headers(raw)) {
        HeaderFit::Fits { missing } => missing,
        HeaderFit::Stranger { field, address } => return Err(Unfit::Stranger { field, address }),
    };
    let copy = with_bcc(raw, &missing);
    match fit(recipients, &recipient_headers(&copy)) {
        HeaderFit::Fits { missing: left } => match left.into_iter().next() {
            None => Ok((copy, missing.len())),
            Some(address) => Err(Unfit::Unwritable { address }),
        },
        HeaderFit::Stranger { field, address } => Err(Unfit::Stranger { field, address }),
    }
}

/// The message with `missing` added to its `Bcc:` header: appended to an existing
/// `Bcc:` field (after its last folded line), or a new `Bcc:` line at the top. Every
/// other byte stays as it was. Nothing to add: the message itself, not copied.
pub fn with_bcc<'a>(raw: &'a [u8], missing: &[String]) -> Cow<'a, [u8]> {
    if missing.is_empty() {
        return Cow::Borrowed(raw);
    }
    // One address a line: 500 of them on one line would break the 998-octet limit.
    let list = missing.join(",\r\n ");
    let end = header_end(raw);
    let mut at = 0;
    while at < end {
        let line_end = next_line(raw, at);
        let Some(colon) = bcc_colon(&raw[at..line_end]).map(|c| at + c) else {
            at = line_end;
            continue;
        };
        // The field ends before the first line that is not a folded continuation.
        let mut field_end = line_end;
        while field_end < end && matches!(raw[field_end], b' ' | b'\t') {
            field_end = next_line(raw, field_end);
        }
        let mut insert = field_end;
        while insert > at && matches!(raw[insert - 1], b'\r' | b'\n') {
            insert -= 1;
        }
        let value_blank = raw[colon + 1..insert].iter().all(u8::is_ascii_whitespace);
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

/// Where the colon of a `Bcc:` field's first line is (`Bcc:`, any case, blanks allowed
/// before the colon as mail parsers allow them), if the line starts one.
fn bcc_colon(line: &[u8]) -> Option<usize> {
    if line.len() < 4 || !line[..3].eq_ignore_ascii_case(b"bcc") {
        return None;
    }
    let blanks = line[3..]
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t'))
        .count();
    (line.get(3 + blanks) == Some(&b':')).then_some(3 + blanks)
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

    /// The lean parser reads the fields routing and the checks look at exactly as
    /// mail-parser's default one does, whatever the fields around them hold.
    #[test]
    fn the_lean_parse_reads_address_fields_as_the_default_one() {
        let samples: [&[u8]; 6] = [
            b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nFrom: A <a@x.org>\r\nTo: b@x.org, \"C\" <c@x.org>\r\n\r\nbody\r\n",
            b"Message-ID: <broken@\r\nFrom: a@x.org\r\nCc: undisclosed-recipients:;\r\nBcc: d@x.org\r\n\r\n",
            b"Date: not a date (comment \r\n continued)\r\nSender: s@x.org\r\nTo: =?utf-8?q?B=C3=A9?= <b@x.org>\r\n\r\n",
            b"Subject: =?utf-8?b?4pyTIMOg?=\r\n\tfolded\r\nPrecedence: Bulk \r\nFrom: a@x.org\r\nTo: group: b@x.org, c@x.org;\r\n\r\n",
            b"Content-Type: multipart/mixed; boundary=x\r\nFrom: a@x.org\r\nTo: b@x.org\r\n\r\n--x\r\nTo: evil@x.org\r\n",
            b"Received: from a by b; Mon, 1 Jan 2024\r\nReferences: <a@b> <c@d\r\nTo: x@y.org\r\nFrom: \"a\" a@x.org\r\n\r\n",
        ];
        let wanted = [
            HeaderName::From,
            HeaderName::Sender,
            HeaderName::To,
            HeaderName::Cc,
            HeaderName::Bcc,
        ];
        let keep = |m: &Message<'_>| -> Vec<String> {
            m.headers()
                .iter()
                .filter(|h| {
                    wanted.contains(&h.name) || h.name.as_str().eq_ignore_ascii_case("precedence")
                })
                .map(|h| {
                    format!(
                        "{}: {:?} @{}-{}",
                        h.name.as_str(),
                        h.value,
                        h.offset_start,
                        h.offset_end
                    )
                })
                .collect()
        };
        for raw in samples {
            let lean = parse_header_section(raw).unwrap();
            let full = MessageParser::default()
                .parse_headers(&raw[..header_end(raw)])
                .unwrap();
            assert_eq!(keep(&lean), keep(&full), "{}", String::from_utf8_lossy(raw));
            assert_eq!(lean.headers().len(), full.headers().len());
            assert_eq!(recipients_of(lean.headers()), recipients_of(full.headers()));
        }
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

    /// What the Graph copy of `raw` names, as mailgate reads it.
    fn sent_to(raw: &[u8], rcpts_: &[&str]) -> Result<Vec<String>, Unfit> {
        let (copy, _) = graph_copy(&rcpts(rcpts_), raw)?;
        Ok(recipient_headers(&copy).all().map(str::to_string).collect())
    }

    #[test]
    fn a_leading_folded_line_cannot_smuggle_a_recipient_into_the_added_bcc() {
        // The first line is a continuation: prepended after "Bcc: carol", it would
        // become part of the Bcc field, and Graph would send to eve.
        let msg = b" , eve@evil.org\r\nTo: bob@x.org\r\n\r\nbody\r\n";
        let got = sent_to(msg, &["bob@x.org", "carol@x.org"]);
        assert!(
            matches!(&got, Err(Unfit::Stranger { address, .. }) if address == "eve@evil.org"),
            "{got:?}"
        );
    }

    #[test]
    fn an_envelope_recipient_that_reads_as_several_addresses_is_refused() {
        // `RCPT TO:<"eve@evil.org,bob"@x.org>` arrives unquoted: written into Bcc: as
        // it is, Graph would send to eve@evil.org (and bob@x.org), one RCPT for two.
        let got = sent_to(
            b"To: bob@x.org\r\n\r\n",
            &["bob@x.org", "eve@evil.org,bob@x.org"],
        );
        assert!(
            matches!(&got, Err(Unfit::Stranger { field: "Bcc", .. })),
            "{got:?}"
        );
    }

    #[test]
    fn an_envelope_recipient_with_a_quoted_local_part_is_refused() {
        for quoted in [r#""eve@evil.org,bob"@x.org"#, r#""john doe"@x.org"#] {
            let got = sent_to(b"To: bob@x.org\r\n\r\n", &["bob@x.org", quoted]);
            assert!(
                matches!(&got, Err(Unfit::Quoted { address }) if address == quoted),
                "{got:?}"
            );
        }
    }

    #[test]
    fn a_recipient_swallowed_by_a_broken_bcc_header_is_refused_not_lost() {
        // A Bcc: value ending inside a quoted string would take the appended address in.
        let got = sent_to(
            b"To: bob@x.org\r\nBcc: bob@x.org, \"open\r\n\r\n",
            &["bob@x.org", "carol@x.org"],
        );
        assert!(
            matches!(&got, Err(Unfit::Unwritable { address }) if address == "carol@x.org")
                || matches!(&got, Err(Unfit::Stranger { .. })),
            "{got:?}"
        );
    }

    #[test]
    fn header_entries_without_a_readable_address_are_refused() {
        // Exchange may read any of these as a recipient; mailgate cannot check them.
        for (header, shown) in [
            ("To: \"eve@evil.org\"", "eve@evil.org"),
            ("Cc: =?utf-8?q?eve=40evil.org?=", "eve@evil.org"),
            ("To: eve", "eve"),
        ] {
            let msg = format!("{header}\r\n\r\nbody\r\n");
            let got = fit(&rcpts(&["bob@x.org"]), &recipient_headers(msg.as_bytes()));
            assert!(
                matches!(&got, HeaderFit::Stranger { address, .. } if address == shown),
                "{header}: {got:?}"
            );
        }
        // An empty group names no one and stays fine.
        let none = recipient_headers(b"To: undisclosed-recipients:;\r\nCc:\r\n\r\n");
        assert_eq!(
            fit(&rcpts(&["bob@x.org"]), &none),
            HeaderFit::Fits {
                missing: rcpts(&["bob@x.org"])
            }
        );
    }

    #[test]
    fn many_added_recipients_keep_every_header_line_under_998_octets() {
        let many: Vec<String> = (0..500)
            .map(|i| format!("recipient-number-{i:03}@a-rather-long-domain.example"))
            .collect();
        let out = with_bcc(b"To: x@y.org\r\n\r\nbody\r\n", &many);
        for line in out.split(|&b| b == b'\n') {
            assert!(line.len() <= 998, "{} octets", line.len());
        }
        assert_eq!(recipient_headers(&out).bcc, many);
        let existing = with_bcc(b"Bcc: z@y.org\r\n\r\n", &many);
        assert!(existing.split(|&b| b == b'\n').all(|l| l.len() <= 998));
    }

    #[test]
    fn a_bcc_field_written_with_a_blank_before_its_colon_is_the_one_extended() {
        let out = with_bcc(
            b"To: b@x.org\r\nBcc : e@x.org\r\n\r\n",
            &rcpts(&["c@x.org"]),
        );
        assert_eq!(
            &out[..],
            &b"To: b@x.org\r\nBcc : e@x.org,\r\n c@x.org\r\n\r\n"[..]
        );
    }

    #[test]
    fn bcc_is_added_and_nothing_else_changes() {
        let msg = b"From: a@x.org\r\nTo: bob@x.org\r\n\r\nbody\r\n";
        assert!(matches!(with_bcc(msg, &[]), Cow::Borrowed(_)));
        let out = with_bcc(msg, &rcpts(&["c@x.org", "d@x.org"]));
        assert_eq!(
            &out[..],
            b"Bcc: c@x.org,\r\n d@x.org\r\nFrom: a@x.org\r\nTo: bob@x.org\r\n\r\nbody\r\n"
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
