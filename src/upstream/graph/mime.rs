//! Pure (over any `BufRead`): the MIME structure of a message read as a stream, and its
//! parts decoded chunk by chunk, so that the upload path (SPEC §7) holds one chunk of a
//! 30 MB attachment at a time rather than the message. mail-parser parses whole messages
//! from memory; it is used here on header sections only, which are small and bounded.

use std::io::{self, BufRead, Read, Seek, SeekFrom};

use base64::Engine as _;

/// Most bytes of one header section kept (the rest of a longer one is skipped): far more
/// than any real part's headers, and what bounds the memory of a scan.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Multipart nesting deeper than this is read as one opaque leaf.
const MAX_DEPTH: usize = 16;
/// Longest line read at once; longer lines are read in pieces (none is a boundary).
const MAX_LINE: usize = 8 * 1024;

/// One leaf part: its header section and where its body lies in the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    /// The part's header section (at most [`MAX_HEADER_BYTES`]), without the blank line.
    pub headers: Vec<u8>,
    /// Offset of the body's first byte.
    pub start: u64,
    /// Offset just past the body (the line break before the next boundary excluded).
    pub end: u64,
}

/// A message's structure: its top header section and its leaf parts, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Structure {
    /// The message's header section.
    pub top: Vec<u8>,
    /// Leaf parts in message order (the message itself when it is not multipart).
    pub leaves: Vec<Leaf>,
}

/// How the reading of one entity ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// At a boundary line of this stack level, closing (`--b--`) or not.
    Boundary {
        level: usize,
        closing: bool,
    },
    Eof,
}

struct Scanner<R> {
    reader: R,
    pos: u64,
    boundaries: Vec<Vec<u8>>,
    leaves: Vec<Leaf>,
    line: Vec<u8>,
}

/// Reads the structure of the message in `reader` (from its start), line by line.
pub fn scan<R: BufRead>(reader: R) -> io::Result<Structure> {
    let mut s = Scanner {
        reader,
        pos: 0,
        boundaries: Vec::new(),
        leaves: Vec::new(),
        line: Vec::with_capacity(256),
    };
    let top = s.headers()?;
    s.entity(top.clone(), 0)?;
    Ok(Structure {
        top,
        leaves: s.leaves,
    })
}

/// The `boundary` of a multipart header section, if it is one.
fn multipart_boundary(headers: &[u8]) -> Option<Vec<u8>> {
    let mut raw = headers.to_vec();
    raw.extend_from_slice(b"\r\n\r\n");
    let parsed = mail_parser::MessageParser::default().parse_headers(&raw)?;
    let ct = parsed
        .headers()
        .iter()
        .find(|h| h.name == mail_parser::HeaderName::ContentType)?
        .value()
        .as_content_type()?;
    if !ct.ctype().eq_ignore_ascii_case("multipart") {
        return None;
    }
    let b = ct.attribute("boundary")?.as_bytes();
    (!b.is_empty() && b.len() <= 200).then(|| b.to_vec())
}

impl<R: BufRead> Scanner<R> {
    /// One line into `self.line` (at most [`MAX_LINE`] bytes, its line break included);
    /// `false` at the end.
    fn next_line(&mut self) -> io::Result<bool> {
        self.line.clear();
        while self.line.len() < MAX_LINE {
            let buf = self.reader.fill_buf()?;
            if buf.is_empty() {
                break;
            }
            let room = MAX_LINE - self.line.len();
            let take = buf.iter().take(room).position(|&b| b == b'\n');
            let n = take.map_or(buf.len().min(room), |i| i + 1);
            self.line.extend_from_slice(&buf[..n]);
            self.reader.consume(n);
            if take.is_some() {
                break;
            }
        }
        self.pos += self.line.len() as u64;
        Ok(!self.line.is_empty())
    }

    /// A header section, up to and including its blank line.
    fn headers(&mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while self.next_line()? {
            if self.line == b"\r\n" || self.line == b"\n" {
                break;
            }
            if self.boundary().is_some() {
                // A part cut off before its blank line: the boundary ends it. Rewinding
                // is not possible on a stream, so it is kept as a header line, which the
                // parts' parsers ignore.
                break;
            }
            if out.len() + self.line.len() <= MAX_HEADER_BYTES {
                out.extend_from_slice(&self.line);
            }
        }
        while out.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            out.pop();
        }
        Ok(out)
    }

    /// The boundary `self.line` is, if any (innermost first).
    fn boundary(&self) -> Option<End> {
        let rest = self.line.strip_prefix(b"--")?;
        let rest = rest.trim_ascii_end();
        self.boundaries
            .iter()
            .enumerate()
            .rev()
            .find_map(|(level, b)| {
                let after = rest.strip_prefix(b.as_slice())?;
                match after {
                    b"" => Some(End::Boundary {
                        level,
                        closing: false,
                    }),
                    b"--" => Some(End::Boundary {
                        level,
                        closing: true,
                    }),
                    _ => None,
                }
            })
    }

    /// Skips lines up to the next boundary line; returns it and where the text before
    /// it ends (its own line break excluded, which belongs to the boundary).
    fn skip(&mut self) -> io::Result<(End, u64)> {
        let origin = self.pos;
        let mut line_break = 0u64;
        loop {
            let start = self.pos;
            if !self.next_line()? {
                return Ok((End::Eof, self.pos));
            }
            if let Some(end) = self.boundary() {
                return Ok((end, start.saturating_sub(line_break).max(origin)));
            }
            line_break = if self.line.ends_with(b"\r\n") {
                2
            } else if self.line.ends_with(b"\n") {
                1
            } else {
                0
            };
        }
    }

    /// The entity whose header section was just read.
    fn entity(&mut self, headers: Vec<u8>, depth: usize) -> io::Result<End> {
        let boundary = (depth < MAX_DEPTH)
            .then(|| multipart_boundary(&headers))
            .flatten();
        let Some(boundary) = boundary else {
            let start = self.pos;
            let (end, at) = self.skip()?;
            self.leaves.push(Leaf {
                headers,
                start,
                end: at.max(start),
            });
            return Ok(end);
        };
        self.boundaries.push(boundary);
        let level = self.boundaries.len() - 1;
        let (mut end, _) = self.skip()?;
        loop {
            match end {
                End::Boundary { level: l, closing } if l == level => {
                    if closing {
                        self.boundaries.truncate(level);
                        return Ok(self.skip()?.0);
                    }
                    let headers = self.headers()?;
                    end = self.entity(headers, depth + 1)?;
                }
                other => {
                    self.boundaries.truncate(level);
                    return Ok(other);
                }
            }
        }
    }
}

/// A part's `Content-Transfer-Encoding`, as the decoder reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `base64`.
    Base64,
    /// `quoted-printable`.
    QuotedPrintable,
    /// `7bit`, `8bit`, `binary` or none: the bytes as they are.
    Identity,
}

impl Encoding {
    /// From the header's value.
    pub fn of(value: Option<&str>) -> Self {
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            Some("base64") => Encoding::Base64,
            Some("quoted-printable") => Encoding::QuotedPrintable,
            _ => Encoding::Identity,
        }
    }
}

/// Decodes one part's body from a reader chunk by chunk.
pub struct Decoder<R> {
    reader: io::Take<R>,
    encoding: Encoding,
    /// Base64 characters read but not decoded yet (fewer than 4), or a QP line's tail.
    pending: Vec<u8>,
    /// Decoded bytes beyond the last chunk asked for (base64 quads, QP lines overshoot).
    ready: Vec<u8>,
    done: bool,
}

/// Base64 as MIME bodies have it: padding optional (it is filtered out with the line
/// breaks), trailing bits tolerated.
const LENIENT: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::RequireNone),
);

impl<R: Read + Seek> Decoder<R> {
    /// The body of `leaf` in `reader`.
    pub fn new(mut reader: R, leaf: &Leaf, encoding: Encoding) -> io::Result<Self> {
        reader.seek(SeekFrom::Start(leaf.start))?;
        Ok(Decoder {
            reader: reader.take(leaf.end.saturating_sub(leaf.start)),
            encoding,
            pending: Vec::new(),
            ready: Vec::new(),
            done: false,
        })
    }
}

impl<R: Read> Decoder<R> {
    /// Up to `max` decoded bytes; fewer only at the end (empty: nothing left).
    pub fn chunk(&mut self, max: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(max.min(4 * 1024 * 1024));
        out.append(&mut self.ready);
        let mut raw = vec![0u8; 64 * 1024];
        while out.len() < max && !self.done {
            match self.encoding {
                Encoding::Identity => {
                    let want = (max - out.len()).min(raw.len());
                    let n = self.reader.read(&mut raw[..want])?;
                    if n == 0 {
                        self.done = true;
                    }
                    out.extend_from_slice(&raw[..n]);
                }
                Encoding::Base64 => {
                    // Enough characters for what is still wanted, whole quads only.
                    let want = ((max - out.len()).div_ceil(3) * 4).clamp(4, raw.len());
                    let n = self.reader.read(&mut raw[..want])?;
                    if n == 0 {
                        self.done = true;
                    }
                    self.pending.extend(
                        raw[..n]
                            .iter()
                            .copied()
                            .filter(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/')),
                    );
                    let whole = if self.done {
                        self.pending.len()
                    } else {
                        self.pending.len() / 4 * 4
                    };
                    let mut quads: Vec<u8> = self.pending.drain(..whole).collect();
                    if quads.len() % 4 == 1 {
                        // A lone trailing character carries no whole byte.
                        quads.pop();
                    }
                    let decoded = LENIENT
                        .decode(&quads)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    out.extend_from_slice(&decoded);
                }
                Encoding::QuotedPrintable => {
                    let n = self.reader.read(&mut raw[..4096])?;
                    if n == 0 {
                        self.done = true;
                    }
                    self.pending.extend_from_slice(&raw[..n]);
                    // Decode whole lines only (a soft break or escape never straddles).
                    let cut = if self.done {
                        self.pending.len()
                    } else {
                        self.pending
                            .iter()
                            .rposition(|&b| b == b'\n')
                            .map_or(0, |i| i + 1)
                    };
                    let lines: Vec<u8> = self.pending.drain(..cut).collect();
                    out.extend(quoted_printable(&lines));
                }
            }
        }
        if out.len() > max {
            self.ready = out.split_off(max);
        }
        Ok(out)
    }
}

/// Quoted-printable (RFC 2045 §6.7) decoded leniently: a bad escape stays as it is.
fn quoted_printable(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    let hex = |b: u8| (b as char).to_digit(16);
    while let Some(&b) = text.get(i) {
        if b != b'=' {
            out.push(b);
            i += 1;
            continue;
        }
        match (text.get(i + 1), text.get(i + 2)) {
            (Some(b'\r'), Some(b'\n')) => i += 3,
            (Some(b'\n'), _) => i += 2,
            (Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                let v = hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0);
                out.push(v as u8);
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn decoded(msg: &[u8], leaf: &Leaf, enc: Encoding, chunk: usize) -> Vec<u8> {
        let mut d = Decoder::new(Cursor::new(msg.to_vec()), leaf, enc).unwrap();
        let mut all = Vec::new();
        for _ in 0..100_000 {
            let c = d.chunk(chunk).unwrap();
            if c.is_empty() {
                return all;
            }
            assert!(c.len() <= chunk, "{} > {chunk}", c.len());
            all.extend(c);
        }
        panic!("decoder never ended");
    }

    #[test]
    fn nested_multiparts_yield_their_leaves_and_exact_body_ranges() {
        let msg = b"From: a@x\r\nContent-Type: multipart/mixed; boundary=\"out\"\r\n\r\npreamble\r\n--out\r\nContent-Type: multipart/alternative; boundary=in\r\n\r\n--in\r\nContent-Type: text/plain\r\n\r\nhello\r\n--in\r\nContent-Type: text/html\r\n\r\n<p>hi</p>\r\n--in--\r\n\r\n--out\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0x\r\nLjQK\r\n--out--\r\nepilogue\r\n";
        let s = scan(Cursor::new(&msg[..])).unwrap();
        assert!(s.top.starts_with(b"From: a@x"));
        let bodies: Vec<&[u8]> = s
            .leaves
            .iter()
            .map(|l| &msg[l.start as usize..l.end as usize])
            .collect();
        assert_eq!(
            bodies,
            vec![&b"hello"[..], b"<p>hi</p>", b"JVBERi0x\r\nLjQK"]
        );
        assert!(s.leaves[2].headers.ends_with(b"base64"));
        let pdf = decoded(msg, &s.leaves[2], Encoding::Base64, 3);
        assert_eq!(pdf, b"%PDF-1.4\n");
    }

    #[test]
    fn a_plain_message_is_one_leaf_to_the_end() {
        let msg = b"Subject: x\nContent-Type: text/plain\n\nline 1\nline 2\n";
        let s = scan(Cursor::new(&msg[..])).unwrap();
        assert_eq!(s.leaves.len(), 1);
        assert_eq!(
            &msg[s.leaves[0].start as usize..s.leaves[0].end as usize],
            b"line 1\nline 2\n"
        );
    }

    #[test]
    fn an_unclosed_multipart_ends_at_the_end_and_a_deep_one_is_bounded() {
        let msg = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nabc\r\n";
        let s = scan(Cursor::new(&msg[..])).unwrap();
        assert_eq!(s.leaves.len(), 1);
        let mut deep = Vec::new();
        for i in 0..40 {
            deep.extend(
                format!("Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n").bytes(),
            );
        }
        deep.extend(b"\r\nleaf\r\n");
        let s = scan(Cursor::new(&deep[..])).unwrap();
        assert_eq!(s.leaves.len(), 1);
    }

    #[test]
    fn base64_decodes_the_same_in_any_chunk_size() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&data);
        let mut body = Vec::new();
        for line in b64.as_bytes().chunks(76) {
            body.extend_from_slice(line);
            body.extend_from_slice(b"\r\n");
        }
        let leaf = Leaf {
            headers: Vec::new(),
            start: 0,
            end: body.len() as u64,
        };
        for chunk in [1, 3, 4, 1000, 327_680] {
            assert_eq!(
                decoded(&body, &leaf, Encoding::Base64, chunk),
                data,
                "{chunk}"
            );
        }
    }

    #[test]
    fn quoted_printable_and_identity_parts_decode() {
        let body = b"caf=C3=A9 soft=\r\nbreak =ZZ\r\n";
        let leaf = Leaf {
            headers: Vec::new(),
            start: 0,
            end: body.len() as u64,
        };
        assert_eq!(
            decoded(body, &leaf, Encoding::QuotedPrintable, 2),
            "café softbreak =ZZ\r\n".as_bytes()
        );
        assert_eq!(decoded(body, &leaf, Encoding::Identity, 5), body);
        assert_eq!(Encoding::of(Some(" BASE64 ")), Encoding::Base64);
        assert_eq!(Encoding::of(None), Encoding::Identity);
    }
}
