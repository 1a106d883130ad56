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
            for addr in list.iter() {
                let singles = match addr {
                    MailAddr::Single(single) => vec![single],
                    MailAddr::Group(group) => group.addrs.iter().collect(),
                };
                for single in singles {
                    let address = single.addr.trim();
                    if !address.contains('@') {
                        continue;
                    }
                    assert!(
                        seen.iter().any(|s| same_address(s, address)),
                        "accepted, but mailparse reads {name}: {address:?} that mailgate did not \
                         see (mailgate saw {seen:?}); section {:?}",
                        String::from_utf8_lossy(section)
                    );
                }
            }
        }
    }
});
