//! An independent, whole-input model of DATA and BDAT decoding, written the obvious
//! slow way. The streaming [`super::Decoder`] must agree with it; shared by the
//! decoder's unit tests and the `data` fuzz target (which includes this file by path),
//! so it uses nothing but `core`/`alloc`.

/// DATA: the end is the first literal `CRLF . CRLF` (the message start counts as a
/// CRLF); the body before it is split on real CRLFs; each line loses one leading dot,
/// then its (necessarily bare) CRs and LFs become CRLF. Returns (output, bytes consumed
/// up to and including the terminator, bare CR/LF seen), or `None` without an end.
pub fn reference_data(input: &[u8]) -> Option<(Vec<u8>, usize, bool)> {
    let mut s = b"\r\n".to_vec();
    s.extend_from_slice(input);
    let p = s.windows(5).position(|w| w == b"\r\n.\r\n")?;
    let consumed = p + 3;
    let body = &s[2..p + 2];
    if body.is_empty() {
        return Some((Vec::new(), consumed, false));
    }
    let body = &body[..body.len() - 2];
    let (out, bare) = normalize_lines(body, true);
    Some(([out, b"\r\n".to_vec()].concat(), consumed, bare))
}

/// BDAT: split on real CRLFs, every remaining CR or LF is bare.
pub fn reference_bdat(input: &[u8]) -> (Vec<u8>, bool) {
    normalize_lines(input, false)
}

fn normalize_lines(body: &[u8], unstuff: bool) -> (Vec<u8>, bool) {
    let mut out = Vec::with_capacity(body.len());
    let mut bare = false;
    for (n, line) in split_crlf(body).into_iter().enumerate() {
        if n > 0 {
            out.extend_from_slice(b"\r\n");
        }
        let line = match line {
            [b'.', rest @ ..] if unstuff => rest,
            _ => line,
        };
        for &b in line {
            if b == b'\r' || b == b'\n' {
                bare = true;
                out.extend_from_slice(b"\r\n");
            } else {
                out.push(b);
            }
        }
    }
    (out, bare)
}

fn split_crlf(body: &[u8]) -> Vec<&[u8]> {
    let mut lines = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + 1 < body.len() {
        if body[i] == b'\r' && body[i + 1] == b'\n' {
            lines.push(&body[start..i]);
            i += 2;
            start = i;
        } else {
            i += 1;
        }
    }
    lines.push(&body[start..]);
    lines
}

/// Panics unless every CR in `out` is followed by LF and every LF preceded by CR.
pub fn assert_normalized(out: &[u8]) {
    for (i, &b) in out.iter().enumerate() {
        if b == b'\r' {
            assert_eq!(out.get(i + 1), Some(&b'\n'), "bare CR at {i} in the output");
        }
        if b == b'\n' {
            assert!(i > 0 && out[i - 1] == b'\r', "bare LF at {i} in the output");
        }
    }
}
