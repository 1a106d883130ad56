//! The header capture and the address-header checks against a second, independent
//! reader: the `mailparse` crate (a dependency of this fuzz crate only).
//!
//! Input layout: byte 0 bit 0 says whether the rest is a DATA stream (dot-terminated,
//! dot-stuffed) or BDAT bytes; both go through the session's decoder, then the session's
//! `HeaderCapture`, then the checks the session runs after DATA on every channel:
//! `routing::check_unambiguous` on mailgate's own reading (`routing::parse_headers` for
//! `From:`/`Sender:`, `message::recipients::recipient_headers` for `To:`/`Cc:`/`Bcc:`).
//!
//! Invariant: whenever mailgate accepts the header section, every address that
//! mailparse reads in a `From:`, `Sender:`, `To:`, `Cc:` or `Bcc:` header of the whole
//! message (its own idea of where the header section ends included) is one that
//! mailgate's reading holds, so no address reaches a reader unchecked. Entries
//! mailparse reads without an `@` (a bare local part) are not addresses for this.
//! mailparse knows no comments (it reads `(x) a@b.c` as the address `(x) a@b.c`) and
//! keeps stray separators (`a: b@c;, d@e` gives `, d@e`): comments are removed from what
//! it reads, and each `local@domain` run in what is left must be one mailgate saw. So
//! must every such run in the display names and group names mailparse reads (encoded
//! words decoded by mailparse): what a mail program shows as an address. 8-bit header
//! bytes that are not UTF-8 are U+FFFD for mailgate and Latin-1 for mailparse: addresses
//! are compared with each run of non-ASCII characters as one placeholder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgate::message::recipients::{recipient_headers, same_address};
use mailgate::routing;
use mailgate::smtp::data::{Decoder, HeaderCapture};
use mailparse::{MailAddr, MailHeaderMap};

/// Generous: the session's default is 1 MiB; the fuzzer's inputs stay far below.
const LIMIT: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, input)) = data.split_first() else {
        return;
    };
    let mut message = Vec::new();
    if flags & 1 == 1 {
        // An unfinished stream counts as if it ended here.
        Decoder::data().feed(input, &mut message);
    } else {
        let mut decoder = Decoder::bdat();
        decoder.feed(input, &mut message);
        decoder.finish(&mut message);
    }
    let mut capture = HeaderCapture::new(LIMIT);
    capture.push(&message);
    capture.finish();
    let Some(section) = capture.section() else {
        return;
    };
    let headers = routing::parse_headers(section);
    if routing::check_unambiguous(section, &headers).is_err() {
        return;
    }
    let recipients = recipient_headers(section);
    let seen: Vec<&str> = headers
        .from
        .iter()
        .chain(&headers.sender)
        .flatten()
        .map(|a| a.trim())
        .chain(recipients.all())
        .collect();

    let Ok((parsed, _)) = mailparse::parse_headers(&message) else {
        return;
    };
    for name in ["From", "Sender", "To", "Cc", "Bcc"] {
        for header in parsed.get_all_headers(name) {
            let Ok(list) = mailparse::addrparse_header(header) else {
                continue;
            };
            // What mailparse reads as addresses, and the names a mail program shows.
            let mut texts: Vec<String> = Vec::new();
            for addr in list.iter() {
                let singles = match addr {
                    MailAddr::Single(single) => vec![single],
                    MailAddr::Group(group) => {
                        texts.push(group.group_name.clone());
                        group.addrs.iter().collect()
                    }
                };
                for single in singles {
                    texts.push(without_comments(&single.addr));
                    texts.extend(single.display_name.clone());
                }
            }
            for text in &texts {
                for address in addresses_in(text) {
                    assert!(
                        seen.iter().any(|s| same_address(s, &address)
                            || skeleton(s) == skeleton(&address)),
                        "accepted, but mailparse reads {name}: {text:?} ({address:?}) that \
                         mailgate did not see (mailgate saw {seen:?}); section {:?}",
                        String::from_utf8_lossy(section)
                    );
                }
            }
        }
    }
});

/// `text` without its RFC 5322 comments (outside quoted strings, nested, with escapes).
fn without_comments(text: &str) -> String {
    let mut out = String::new();
    let (mut depth, mut quoted, mut escaped) = (0u32, false, false);
    for c in text.chars() {
        if escaped {
            escaped = false;
            if depth == 0 {
                out.push(c);
            }
            continue;
        }
        match c {
            '\\' => {
                escaped = true;
                if depth == 0 {
                    out.push(c);
                }
            }
            '"' if depth == 0 => {
                quoted = !quoted;
                out.push(c);
            }
            '(' if !quoted => depth = depth.saturating_add(1),
            ')' if !quoted && depth > 0 => depth -= 1,
            c if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// The `local@domain` runs of `text` (split at blanks, controls and specials; around
/// each `@`, the non-empty parts next to it, dots trimmed: `a@b@c` holds `a@b` and `b@c`).
fn addresses_in(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    // ASCII only: a non-ASCII "blank" (U+0085) is mailparse's Latin-1 reading of a byte.
    let pieces = text.split(|c: char| {
        c.is_ascii_whitespace() || c.is_ascii_control() || ",;<>()\":[]\\".contains(c)
    });
    for piece in pieces {
        let parts: Vec<&str> = piece.split('@').map(|p| p.trim_matches('.')).collect();
        for pair in parts.windows(2) {
            if !pair[0].is_empty() && !pair[1].is_empty() {
                out.push(format!("{}@{}", pair[0], pair[1]));
            }
        }
    }
    out
}

/// `address` lower-cased, each run of non-ASCII characters one `\u{0}`.
fn skeleton(address: &str) -> String {
    let mut out = String::new();
    for c in address.chars() {
        if c.is_ascii() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('\u{0}') {
            out.push('\u{0}');
        }
    }
    out
}
