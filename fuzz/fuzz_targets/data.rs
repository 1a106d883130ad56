//! `smtp::data::Decoder` in DATA and BDAT mode, fed in arbitrary chunks.
//!
//! Input layout: byte 0 picks the mode (bit 0: BDAT) and how many chunk lengths follow
//! (bits 1-3: 0 to 7); each following byte is one chunk length (0 to 255); the rest is
//! the stream the client sends after `DATA` (or the BDAT chunk contents).
//!
//! Invariants, checked on every input:
//! - the result (output, consumed count, bare CR/LF seen) is the same whole, in the
//!   chosen chunks, and byte by byte, and equals an independent whole-input model
//!   (an unfinished DATA stream: a prefix of the model's output once terminated);
//! - the output has no bare CR or LF;
//! - once re-stuffed as lettre sends it (final CRLF dropped, dot-stuffed, `CRLF.CRLF`
//!   appended), the only end-of-data on the wire is the appended one;
//! - `size()` equals the output length; consumed never exceeds the bytes fed;
//!   after the end, more input is neither consumed nor decoded.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The same whole-input model the decoder's unit tests check against.
#[path = "../../src/smtp/data/model.rs"]
mod model;
use model::assert_normalized;
use mailgate::smtp::data::Decoder;

/// What one decoding run produced.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    out: Vec<u8>,
    /// DATA: where the end of data was found in the whole input, if it was.
    consumed: Option<usize>,
    saw_bare: bool,
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let bdat = flags & 1 == 1;
    let lengths = usize::from((flags >> 1) & 7).min(rest.len());
    let (lengths, input) = rest.split_at(lengths);
    let lengths: Vec<usize> = lengths.iter().map(|&b| usize::from(b)).collect();

    let whole = run(bdat, input, &[]);
    let chunked = run(bdat, input, &lengths);
    assert_eq!(chunked, whole, "chunks {lengths:?} change the result");
    let by_byte = run(bdat, input, &vec![1; input.len()]);
    assert_eq!(by_byte, whole, "byte-by-byte feeding changes the result");

    let model = if bdat {
        Some(model_bdat(input))
    } else {
        model_data(input)
    };
    match model {
        Some(model) => assert_eq!(whole, model, "decoder and model disagree"),
        None => {
            assert_eq!(
                whole.consumed, None,
                "end of data found where there is none"
            );
            // The decoder only appends, so what it made of an unfinished stream starts
            // what the model makes of that stream once terminated.
            let ended = model_data(&[input, b"\r\n.\r\n"].concat()).expect("terminated");
            assert!(ended.out.starts_with(&whole.out), "partial output diverges");
        }
    }

    assert_normalized(&whole.out);
    assert_single_terminator(&whole.out);
});

/// Feeds `input` in chunks of the given lengths (the rest as a last chunk), stopping
/// at the end of data as the session does, and checks the per-call invariants.
fn run(bdat: bool, input: &[u8], lengths: &[usize]) -> Outcome {
    let mut decoder = if bdat {
        Decoder::bdat()
    } else {
        Decoder::data()
    };
    let mut out = Vec::new();
    let mut offset = 0;
    let mut consumed = None;
    for chunk in chunks(input, lengths) {
        let end = decoder.feed(chunk, &mut out);
        assert_eq!(
            decoder.size(),
            out.len() as u64,
            "size() is not the output length"
        );
        match end {
            Some(n) => {
                assert!(!bdat, "BDAT has no end of data");
                assert!(n <= chunk.len(), "consumed {n} of {} bytes", chunk.len());
                assert!(decoder.is_done());
                consumed = Some(offset + n);
                let decoded = out.len();
                assert_eq!(decoder.feed(&input[offset + n..], &mut out), Some(0));
                assert_eq!(out.len(), decoded, "output after the end of data");
                break;
            }
            None => assert!(!decoder.is_done()),
        }
        offset += chunk.len();
    }
    if bdat {
        decoder.finish(&mut out);
        assert_eq!(
            decoder.size(),
            out.len() as u64,
            "size() is not the output length"
        );
    }
    Outcome {
        out,
        consumed,
        saw_bare: decoder.saw_bare(),
    }
}

/// `input` cut after each of `lengths` bytes (clamped), then the rest.
fn chunks<'a>(input: &'a [u8], lengths: &[usize]) -> Vec<&'a [u8]> {
    let mut rest = input;
    let mut pieces = Vec::with_capacity(lengths.len() + 1);
    for &len in lengths {
        let (piece, tail) = rest.split_at(len.min(rest.len()));
        pieces.push(piece);
        rest = tail;
    }
    pieces.push(rest);
    pieces
}

/// The decoder's unit-test model, as an [`Outcome`].
fn model_data(input: &[u8]) -> Option<Outcome> {
    model::reference_data(input).map(|(out, consumed, saw_bare)| Outcome {
        out,
        consumed: Some(consumed),
        saw_bare,
    })
}

/// The BDAT model, as an [`Outcome`].
fn model_bdat(input: &[u8]) -> Outcome {
    let (out, saw_bare) = model::reference_bdat(input);
    Outcome {
        out,
        consumed: None,
        saw_bare,
    }
}

/// Sends `out` the way the relay does (upstream.rs strips the final CRLF, then lettre's
/// `message_iter` dot-stuffs and appends `CRLF.CRLF`) and checks that the upstream
/// sees exactly one end of data: the appended one.
fn assert_single_terminator(out: &[u8]) {
    let body = out.strip_suffix(b"\r\n").unwrap_or(out);
    // The CRLF ending the DATA command line comes first on the wire.
    let mut wire = b"\r\n".to_vec();
    lettre_stuff(body, &mut wire);
    wire.extend_from_slice(b"\r\n.\r\n");
    let first = wire.windows(5).position(|w| w == b"\r\n.\r\n");
    assert_eq!(
        first,
        Some(wire.len() - 5),
        "re-stuffed output ends early: {:?}",
        String::from_utf8_lossy(&wire)
    );
}

/// A copy of lettre 0.11's `ClientCodec::encode` (private there): doubles a dot that
/// starts a line, a line starting after CR LF (or at the very beginning).
fn lettre_stuff(frame: &[u8], buf: &mut Vec<u8>) {
    #[derive(Clone, Copy)]
    enum Status {
        Middle,
        AfterCr,
        LineStart,
    }
    let mut status = Status::LineStart;
    for &b in frame {
        buf.push(b);
        status = match (b, status) {
            (b'\r', _) => Status::AfterCr,
            (b'\n', Status::AfterCr) => Status::LineStart,
            (b'.', Status::LineStart) => {
                buf.push(b'.');
                Status::Middle
            }
            (_, Status::AfterCr | Status::LineStart) => Status::Middle,
            (_, Status::Middle) => Status::Middle,
        };
    }
}
