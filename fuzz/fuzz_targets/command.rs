//! `parse_command` on arbitrary bytes: never panics, and a refusal is a well-formed
//! one-line reply (no client bytes can inject a CR, LF or other control character).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgate::smtp::session::{MAX_LINE, parse_command};

fuzz_target!(|data: &[u8]| {
    // The input as one "line" (whatever it holds), then cut into lines the way the
    // session reads them: up to and including each LF, at most MAX_LINE bytes.
    check(data);
    for line in data.split_inclusive(|&b| b == b'\n') {
        if line.len() <= MAX_LINE {
            check(line);
        }
    }
});

fn check(line: &[u8]) {
    if let Err(reply) = parse_command(line) {
        assert!(
            (400..600).contains(&reply.code),
            "refusal with code {}",
            reply.code
        );
        assert!(
            !reply.text.chars().any(char::is_control),
            "control character in reply text {:?}",
            reply.text
        );
    }
}
