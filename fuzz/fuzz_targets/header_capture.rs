//! `smtp::data::HeaderCapture` at and beyond its size limit, fed in arbitrary chunks,
//! then `routing::parse_headers` on what it captured.
//!
//! Input layout: bytes 0-1 (u16, little-endian) give the limit, taken modulo the input's
//! length + 5: the limit stays within a few bytes of any section the input can hold,
//! so sections under, at and beyond it stay likely however the fuzzer resizes the
//! input (the session's limit is `max_header_size`; the code does not depend on its
//! size); byte 2 bit 0 says whether the rest is first decoded as a DATA stream (as the
//! session does), bits 1-3 how many chunk lengths follow (0 to 7); each following byte
//! is one chunk length (0 to 255); the rest is the input.
//!
//! Invariants, checked on every input:
//! - the outcome is the same whole, in the chosen chunks, and byte by byte;
//! - if the header section (up to the CRLF before the first empty line, or everything)
//!   fits the limit, the capture is exactly that section; if not, it says too big and
//!   holds at most the limit bytes; it never holds more than the limit + 4;
//! - parsing the captured section never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgate::smtp::data::{Decoder, HeaderCapture};

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let raw_limit = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let flags = data[2];
    let decode = flags & 1 == 1;
    let rest = &data[3..];
    let lengths = usize::from((flags >> 1) & 7).min(rest.len());
    let (lengths, input) = rest.split_at(lengths);
    let limit = raw_limit % (input.len() + 5);
    let lengths: Vec<usize> = lengths.iter().map(|&b| usize::from(b)).collect();

    let (whole, message) = run(limit, decode, input, &[]);
    let (chunked, _) = run(limit, decode, input, &lengths);
    assert_eq!(chunked, whole, "chunks {lengths:?} change the result");
    let (by_byte, _) = run(limit, decode, input, &vec![1; input.len()]);
    assert_eq!(by_byte, whole, "byte-by-byte feeding changes the result");

    let section = reference_section(&message);
    match whole {
        Outcome::Complete(captured) => {
            assert!(section.len() <= limit, "a section over the limit was taken");
            assert_eq!(captured, section, "captured bytes differ from the section");
            let _ = mailgate::routing::parse_headers(&captured);
        }
        Outcome::TooBig(held) => {
            assert!(section.len() > limit, "a section within the limit was refused");
            assert!(held <= limit, "holds {held} bytes over the limit {limit}");
        }
    }
});

/// How a capture ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Complete(Vec<u8>),
    TooBig(usize),
}

/// Feeds `input` (decoded first when `decode`) in chunks of `lengths` (then the rest);
/// returns the outcome and the whole message the capture saw.
fn run(limit: usize, decode: bool, input: &[u8], lengths: &[usize]) -> (Outcome, Vec<u8>) {
    let mut capture = HeaderCapture::new(limit);
    let mut decoder = Decoder::data();
    let mut message = Vec::new();
    let mut out = Vec::new();
    let mut offset = 0;
    let mut sizes = lengths.iter().copied().chain(std::iter::once(usize::MAX));
    while offset < input.len() {
        let n = sizes.next().unwrap_or(usize::MAX).min(input.len() - offset);
        let chunk = &input[offset..offset + n];
        offset += n;
        if decode {
            let end = decoder.feed(chunk, &mut out);
            capture.push(&out);
            message.extend_from_slice(&out);
            out.clear();
            if end.is_some() {
                break;
            }
        } else {
            capture.push(chunk);
            message.extend_from_slice(chunk);
        }
        assert!(capture.held() <= limit.saturating_add(4));
    }
    capture.finish();
    let outcome = match capture.section() {
        Some(section) => Outcome::Complete(section.to_vec()),
        None => {
            assert!(capture.too_big(), "finished capture neither complete nor too big");
            Outcome::TooBig(capture.held())
        }
    };
    (outcome, message)
}

/// The header section by a whole-input reading: up to the CRLF before the first empty line.
fn reference_section(message: &[u8]) -> &[u8] {
    if message.starts_with(b"\r\n") {
        return &message[..0];
    }
    match message.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(p) => &message[..p + 2],
        None => message,
    }
}
