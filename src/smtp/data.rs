//! Streaming DATA / BDAT decoder: finds the end of data (`<CRLF>.<CRLF>` only),
//! removes dot-stuffing and handles bare CR / LF, whatever the chunk boundaries.
//!
//! Only a *real* CRLF (a CR immediately followed by LF, or the start of the message)
//! starts a line for end-of-data detection and dot-unstuffing. A bare CR or LF is
//! turned into CRLF in the output (and noted in [`Decoder::saw_bare`]) but does not
//! start such a line, so `<LF>.<LF>`, `<CR>.<CR>`, `<CRLF>.<LF>` and the other
//! SMTP-smuggling sequences never end a message: whatever follows them stays in the
//! body, where an upstream re-stuffing it sees only text.

/// What the decoder is waiting for, carried across chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of the message or right after a real CRLF (DATA only).
    LineStart,
    /// Inside a line.
    Text,
    /// Saw a CR; an LF next makes it a real CRLF.
    Cr,
    /// Saw `.` at a line start (DATA only).
    Dot,
    /// Saw `.` CR at a line start; an LF next ends the data (DATA only).
    DotCr,
    /// End of data reached (DATA only).
    Done,
}

/// Decodes the bytes of one message as they arrive, in chunks of any size.
#[derive(Debug, Clone)]
pub struct Decoder {
    /// DATA (dot-terminated, dot-stuffed) rather than BDAT (counted chunks).
    dot_terminated: bool,
    state: State,
    saw_bare: bool,
    size: u64,
}

impl Decoder {
    /// A decoder for `DATA`: ends at `<CRLF>.<CRLF>`, removes dot-stuffing.
    pub fn data() -> Self {
        Decoder {
            dot_terminated: true,
            state: State::LineStart,
            saw_bare: false,
            size: 0,
        }
    }

    /// A decoder for `BDAT` chunks: no terminator, no dot handling, only bare CR/LF
    /// normalization (state carries over from one chunk to the next).
    pub fn bdat() -> Self {
        Decoder {
            dot_terminated: false,
            state: State::Text,
            saw_bare: false,
            size: 0,
        }
    }

    /// A bare CR or LF was seen (and normalized to CRLF).
    pub fn saw_bare(&self) -> bool {
        self.saw_bare
    }

    /// Bytes of decoded message output so far (whether or not the caller kept them).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The end of data has been reached (DATA only).
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes `input`, appending message bytes to `out`. Returns `Some(consumed)`
    /// once the end of data is reached: `input[consumed..]` belongs to whatever follows
    /// (the next commands). Returns `None` when all of `input` was consumed and more
    /// is needed (always `None` for BDAT).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Text => {
                    let rest = &input[i..];
                    // memchr, not a byte loop: this is the hot path for large messages.
                    let run = memchr::memchr2(b'\r', b'\n', rest).unwrap_or(rest.len());
                    self.emit(out, &rest[..run]);
                    i += run;
                    if let Some(&b) = input.get(i) {
                        i += 1;
                        if b == b'\r' {
                            self.state = State::Cr;
                        } else {
                            self.bare(out);
                        }
                    }
                }
                State::LineStart => {
                    if input[i] == b'.' {
                        i += 1;
                        self.state = State::Dot;
                    } else {
                        self.state = State::Text;
                    }
                }
                State::Cr => {
                    if input[i] == b'\n' {
                        i += 1;
                        self.emit(out, b"\r\n");
                        self.state = if self.dot_terminated {
                            State::LineStart
                        } else {
                            State::Text
                        };
                    } else {
                        // The byte after a bare CR is not at a line start.
                        self.bare(out);
                        self.state = State::Text;
                    }
                }
                State::Dot => {
                    if input[i] == b'\r' {
                        i += 1;
                        self.state = State::DotCr;
                    } else {
                        // A stuffed line: its leading dot is dropped, the rest is text
                        // (a bare LF right after the dot included).
                        self.state = State::Text;
                    }
                }
                State::DotCr => {
                    if input[i] == b'\n' {
                        self.state = State::Done;
                        return Some(i + 1);
                    }
                    // `.` + bare CR: not the end; the dot goes, the CR becomes CRLF.
                    self.bare(out);
                    self.state = State::Text;
                }
                State::Done => return Some(i),
            }
        }
        (self.state == State::Done).then_some(i)
    }

    /// Ends a BDAT message (after its `LAST` chunk): a CR left dangling at the very
    /// end is bare.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.state == State::Cr {
            self.bare(out);
            self.state = State::Text;
        }
    }

    fn emit(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(bytes);
        self.size += bytes.len() as u64;
    }

    fn bare(&mut self, out: &mut Vec<u8>) {
        self.saw_bare = true;
        self.emit(out, b"\r\n");
    }
}

#[cfg(test)]
mod model;

#[cfg(test)]
mod tests {
    use super::*;

    use super::model::{assert_normalized, reference_bdat, reference_data};

    /// Feeds `input` in the given chunks, as a session would: stops at the end.
    fn run_chunks(chunks: &[&[u8]]) -> (Vec<u8>, Option<usize>, bool) {
        let mut d = Decoder::data();
        let mut out = Vec::new();
        let mut offset = 0;
        for chunk in chunks {
            if let Some(n) = d.feed(chunk, &mut out) {
                assert_eq!(d.size(), out.len() as u64);
                return (out, Some(offset + n), d.saw_bare());
            }
            offset += chunk.len();
        }
        assert_eq!(d.size(), out.len() as u64);
        (out, None, d.saw_bare())
    }

    fn whole(input: &[u8]) -> (Vec<u8>, Option<usize>, bool) {
        run_chunks(&[input])
    }

    /// Decoding in one piece, byte by byte and in every 2-way and some 3-way splits
    /// gives the same result.
    fn assert_split_invariant(input: &[u8]) -> (Vec<u8>, Option<usize>, bool) {
        let expected = whole(input);
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(
            run_chunks(&bytes),
            expected,
            "byte by byte: {:?}",
            String::from_utf8_lossy(input)
        );
        for cut in 0..=input.len() {
            let (a, b) = input.split_at(cut);
            assert_eq!(
                run_chunks(&[a, b]),
                expected,
                "split at {cut}: {:?}",
                String::from_utf8_lossy(input)
            );
            let second = (cut + 3).min(input.len());
            let (b1, b2) = input[cut..].split_at(second - cut);
            assert_eq!(run_chunks(&[a, b1, b2]), expected);
        }
        expected
    }

    const HIDDEN: &[u8] =
        b"MAIL FROM:<admin@bank.example>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n\
From: admin@bank.example\r\nSubject: smuggled\r\n\r\nPay now.\r\n";

    /// The end-of-data look-alikes from SEC Consult's SMTP smuggling research
    /// (and variants): none may end the message.
    const SMUGGLING: &[&[u8]] = &[
        b"\n.\n",
        b"\n.\r\n",
        b"\r.\r",
        b"\r.\r\n",
        b"\r\n.\n",
        b"\r\n.\r",
        b"\r.\n",
        b"\n.\r",
        b"\r\n.\r\r\n",
        b"\r\n\x00.\r\n",
        b"\r\n.\x00\r\n",
        b"\n\n.\n\n",
        b"\r\r.\r\r",
        b"\r\n.\n\r\n",
        b"\n\r.\n\r",
    ];

    #[test]
    fn smuggling_payloads_never_end_the_message() {
        for payload in SMUGGLING {
            let mut input = b"From: a@example.com\r\nSubject: hi\r\n\r\nfirst part".to_vec();
            input.extend_from_slice(payload);
            input.extend_from_slice(HIDDEN);
            input.extend_from_slice(b"\r\n.\r\n");
            input.extend_from_slice(b"QUIT\r\n");
            let (out, consumed, bare) = assert_split_invariant(&input);
            let shown = String::from_utf8_lossy(payload);
            assert_eq!(
                consumed,
                Some(input.len() - 6),
                "payload {shown:?} must not end the data early"
            );
            assert!(
                out.windows(HIDDEN.len()).any(|w| w == HIDDEN),
                "hidden commands stay in the body ({shown:?})"
            );
            assert!(out.ends_with(b"Pay now.\r\n\r\n"), "{shown:?}");
            assert_normalized(&out);
            // Every payload but the NUL ones hides a bare CR or LF.
            assert_eq!(bare, !payload.contains(&0), "{shown:?}");
        }
    }

    #[test]
    fn the_only_end_is_crlf_dot_crlf() {
        let message = b"Subject: x\r\n\r\nbody\r\n.\r\n";
        let input = [&message[..], b"MAIL FROM:<b@c>\r\n"].concat();
        let (out, consumed, bare) = assert_split_invariant(&input);
        assert_eq!(out, b"Subject: x\r\n\r\nbody\r\n");
        assert_eq!(consumed, Some(message.len()));
        assert!(!bare);
    }

    #[test]
    fn empty_message() {
        let (out, consumed, bare) = assert_split_invariant(b".\r\nQUIT\r\n");
        assert_eq!(out, b"");
        assert_eq!(consumed, Some(3));
        assert!(!bare);
    }

    #[test]
    fn stuffed_first_line_is_unstuffed() {
        let (out, consumed, _) = assert_split_invariant(b"..x\r\n..\r\n...y\r\n.\r\n");
        assert_eq!(out, b".x\r\n.\r\n..y\r\n");
        assert_eq!(consumed, Some(18));
    }

    #[test]
    fn crlf_dot_cr_cr_lf_is_not_the_end() {
        let input = b"a\r\n.\r\r\nb\r\n.\r\n";
        let (out, consumed, bare) = assert_split_invariant(input);
        assert_eq!(out, b"a\r\n\r\n\r\nb\r\n");
        assert_eq!(consumed, Some(input.len()));
        assert!(bare);
    }

    #[test]
    fn dot_followed_by_bare_lf_loses_the_dot() {
        let input = b"a\r\n.\nb\r\n.\r\n";
        let (out, _, bare) = assert_split_invariant(input);
        assert_eq!(out, b"a\r\n\r\nb\r\n");
        assert!(bare);
    }

    #[test]
    fn line_after_bare_lf_is_not_unstuffed() {
        let (out, _, bare) = assert_split_invariant(b"a\n..b\r\n.\r\n");
        assert_eq!(out, b"a\r\n..b\r\n");
        assert!(bare);
    }

    #[test]
    fn bare_cr_and_lf_become_crlf() {
        let (out, _, bare) = assert_split_invariant(b"a\rb\nc\r\r\nd\n\r\n.\r\n");
        assert_eq!(out, b"a\r\nb\r\nc\r\n\r\nd\r\n\r\n");
        assert!(bare);
    }

    #[test]
    fn unterminated_data_consumes_everything() {
        let input = b"a\r\n.\n\r\n.x\r\n";
        let (out, consumed, _) = assert_split_invariant(input);
        assert_eq!(consumed, None);
        assert_eq!(out, b"a\r\n\r\n\r\nx\r\n");
    }

    #[test]
    fn feeding_after_the_end_consumes_nothing() {
        let mut d = Decoder::data();
        let mut out = Vec::new();
        assert_eq!(d.feed(b"x\r\n.\r\n", &mut out), Some(6));
        assert!(d.is_done());
        assert_eq!(d.feed(b"more", &mut out), Some(0));
        assert_eq!(out, b"x\r\n");
    }

    /// A small deterministic generator (xorshift) so the randomized tests repeat.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn bytes(&mut self, alphabet: &[u8], max_len: usize) -> Vec<u8> {
            let len = (self.next() % max_len as u64) as usize;
            (0..len)
                .map(|_| alphabet[(self.next() % alphabet.len() as u64) as usize])
                .collect()
        }
    }

    #[test]
    fn random_inputs_match_the_reference_model() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let mut input = rng.bytes(b"\r\n.ab", 24);
            input.extend_from_slice(b"\r\n.\r\n");
            let (want_out, want_consumed, want_bare) = reference_data(&input).unwrap();
            let cut = (rng.next() % (input.len() as u64 + 1)) as usize;
            let (a, b) = input.split_at(cut);
            let got = run_chunks(&[a, b]);
            assert_eq!(
                got,
                (want_out, Some(want_consumed), want_bare),
                "{:?}",
                String::from_utf8_lossy(&input)
            );
        }
    }

    fn run_bdat(chunks: &[&[u8]]) -> (Vec<u8>, bool) {
        let mut d = Decoder::bdat();
        let mut out = Vec::new();
        for chunk in chunks {
            assert_eq!(d.feed(chunk, &mut out), None);
        }
        d.finish(&mut out);
        assert_eq!(d.size(), out.len() as u64);
        (out, d.saw_bare())
    }

    #[test]
    fn bdat_keeps_dots_and_normalizes_across_chunks() {
        let input = b".\r\n..x\r\n.\r\nend\r";
        for cut in 0..=input.len() {
            let (a, b) = input.split_at(cut);
            let (out, bare) = run_bdat(&[a, b]);
            assert_eq!(out, b".\r\n..x\r\n.\r\nend\r\n");
            assert!(bare, "the final dangling CR is bare");
        }
    }

    #[test]
    fn bdat_crlf_split_between_chunks_is_not_bare() {
        let (out, bare) = run_bdat(&[b"line\r", b"\nnext\r\n"]);
        assert_eq!(out, b"line\r\nnext\r\n");
        assert!(!bare);
    }

    #[test]
    fn bdat_random_inputs_match_the_reference_model() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for _ in 0..10_000 {
            let input = rng.bytes(b"\r\n.a", 20);
            let cut = (rng.next() % (input.len() as u64 + 1)) as usize;
            let (a, b) = input.split_at(cut);
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            let want = reference_bdat(&input);
            assert_eq!(
                run_bdat(&[a, b]),
                want,
                "{:?}",
                String::from_utf8_lossy(&input)
            );
            assert_eq!(run_bdat(&bytes), want);
        }
    }
}
