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

/// Keeps a message's header section as the decoded bytes go by: everything before the
/// first empty line (the whole message if it has none), at most `limit` bytes.
///
/// The decoder's output has only CRLF line ends, so the empty line is `CRLF CRLF` (or a
/// CRLF at the very start: an empty header section). A section over the limit is never
/// cut and passed on: the capture says [`HeaderCapture::too_big`] instead, and keeps no
/// more than `limit` bytes, so memory stays bounded whatever the client sends.
#[derive(Debug, Clone)]
pub struct HeaderCapture {
    bytes: Vec<u8>,
    limit: usize,
    state: Capture,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Capture {
    /// The end of the header section is not seen yet.
    Open,
    /// `bytes` is the whole header section.
    Complete,
    /// The header section is larger than the limit.
    TooBig,
}

impl HeaderCapture {
    /// A capture that keeps a header section of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        HeaderCapture {
            bytes: Vec::new(),
            limit,
            state: Capture::Open,
        }
    }

    /// Takes the next decoded bytes of the message.
    pub fn push(&mut self, out: &[u8]) {
        if self.state != Capture::Open {
            return;
        }
        // The empty line may straddle two pushes. The section ends with the CRLF before
        // the empty line, so its end is seen once `limit + 2` bytes are in: keeping two
        // more than that (a CRLF CRLF starting right at the limit) is enough to decide.
        let search_from = self.bytes.len().saturating_sub(3);
        let cap = self.limit.saturating_add(4);
        let room = cap - self.bytes.len();
        self.bytes.extend_from_slice(&out[..out.len().min(room)]);
        let end = if self.bytes.starts_with(b"\r\n") {
            Some(0)
        } else {
            memchr::memmem::find(&self.bytes[search_from..], b"\r\n\r\n")
                .map(|p| search_from + p + 2)
        };
        match end {
            Some(end) if end <= self.limit => {
                self.bytes.truncate(end);
                self.state = Capture::Complete;
            }
            Some(_) => self.overflow(),
            None if self.bytes.len() >= cap => self.overflow(),
            None => {}
        }
    }

    /// The message has ended: with no empty line, all of it is the header section.
    pub fn finish(&mut self) {
        if self.state == Capture::Open {
            if self.bytes.len() > self.limit {
                self.overflow();
            } else {
                self.state = Capture::Complete;
            }
        }
    }

    /// The header section, once complete (after [`HeaderCapture::finish`] at the latest);
    /// `None` while it is still open or when it is too big.
    pub fn section(&self) -> Option<&[u8]> {
        (self.state == Capture::Complete).then_some(self.bytes.as_slice())
    }

    /// The header section is larger than the limit.
    pub fn too_big(&self) -> bool {
        self.state == Capture::TooBig
    }

    /// Bytes held (never more than the limit once too big).
    pub fn held(&self) -> usize {
        self.bytes.len()
    }

    fn overflow(&mut self) {
        self.bytes.truncate(self.limit);
        self.state = Capture::TooBig;
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

    /// The header section as a whole-input reference: up to the CRLF before the first
    /// empty line, or everything.
    fn reference_section(input: &[u8]) -> &[u8] {
        if input.starts_with(b"\r\n") {
            return &input[..0];
        }
        match input.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(p) => &input[..p + 2],
            None => input,
        }
    }

    fn capture(limit: usize, chunks: &[&[u8]]) -> HeaderCapture {
        let mut c = HeaderCapture::new(limit);
        for chunk in chunks {
            c.push(chunk);
        }
        c.finish();
        c
    }

    #[test]
    fn header_capture_stops_at_the_empty_line() {
        let c = capture(
            1000,
            &[b"From: a@b\r", b"\nTo: c@d\r\n\r", b"\nbody\r\n\r\nmore"],
        );
        assert_eq!(c.section(), Some(&b"From: a@b\r\nTo: c@d\r\n"[..]));
        let empty = capture(1000, &[b"\r", b"\nbody\r\n"]);
        assert_eq!(empty.section(), Some(&b""[..]));
        let no_body = capture(1000, &[b"From: a@b\r\nTo: c@d\r\n"]);
        assert_eq!(no_body.section(), Some(&b"From: a@b\r\nTo: c@d\r\n"[..]));
        // Still open until the message ends.
        let mut open = HeaderCapture::new(1000);
        open.push(b"From: a@b\r\n");
        assert_eq!(open.section(), None);
        assert!(!open.too_big());
    }

    #[test]
    fn header_capture_is_exact_at_the_limit_and_refuses_beyond() {
        // A 64 KiB cap used to cut here and pass the rest off as the whole section.
        let mut headers = b"From: a@example.com\r\n".to_vec();
        while headers.len() < 100 * 1024 {
            headers.extend_from_slice(b"X-Filler: 0123456789012345678901234567890123456789\r\n");
        }
        headers.extend_from_slice(b"From: ceo@elsewhere.test\r\n");
        let mut message = headers.clone();
        message.extend_from_slice(b"\r\nbody\r\n");
        let n = headers.len();
        for limit in [n, n + 1, n + 10, 1 << 20] {
            let c = capture(limit, &message.chunks(4096).collect::<Vec<_>>());
            assert_eq!(c.section(), Some(&headers[..]), "limit {limit}");
        }
        for limit in [0, 1, 64 * 1024, n - 2, n - 1] {
            let c = capture(limit, &message.chunks(4096).collect::<Vec<_>>());
            assert!(c.too_big() && c.section().is_none(), "limit {limit}");
            assert!(c.held() <= limit, "limit {limit}: held {}", c.held());
        }
        // Endless headers never grow the capture past the limit.
        let mut endless = HeaderCapture::new(1000);
        for _ in 0..1000 {
            endless.push(&[b'h'; 1000]);
            assert!(endless.held() <= 1004);
        }
        assert!(endless.too_big() && endless.held() == 1000);
    }

    #[test]
    fn header_capture_matches_the_reference_in_any_chunks() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for _ in 0..20_000 {
            let input = rng.bytes(b"\r\nab", 40);
            let limit = (rng.next() % 24) as usize;
            let cut = (rng.next() % (input.len() as u64 + 1)) as usize;
            let (a, b) = input.split_at(cut);
            let want = reference_section(&input);
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            for c in [capture(limit, &[a, b]), capture(limit, &bytes)] {
                let shown = String::from_utf8_lossy(&input);
                if want.len() <= limit {
                    assert_eq!(c.section(), Some(want), "{shown:?} limit {limit}");
                } else {
                    assert!(c.too_big(), "{shown:?} limit {limit}");
                    assert!(c.held() <= limit);
                }
            }
        }
    }
}
