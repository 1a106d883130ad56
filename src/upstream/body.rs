//! The body on its way out: one scan for 8-bit content and bare CR/LF (never sent
//! upstream), its final CRLF dropped, and the spool file read in chunks.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{Body, Error, blocking};

/// Size of the pieces a message is written in.
pub(super) const CHUNK: usize = 64 * 1024;

/// The body, checked, with its final CRLF dropped (lettre adds `CRLF . CRLF`).
pub(super) struct PreparedBody<'a> {
    pub(super) source: Source<'a>,
    /// Bytes to send.
    pub(super) len: u64,
    /// Has bytes above 127.
    pub(super) eightbit: bool,
    /// The message is empty: nothing at all before the terminating dot.
    pub(super) empty: bool,
}

/// The end of an empty message: lettre's `message_iter` always writes `CRLF . CRLF`,
/// which would add an empty line, so an empty body goes out as the bare dot line.
pub(super) struct EmptyMessageEnd;

impl std::fmt::Display for EmptyMessageEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(".\r\n")
    }
}

pub(super) enum Source<'a> {
    /// In memory.
    Bytes(&'a [u8]),
    /// Positioned at the start.
    File(fs::File),
}

impl<'a> PreparedBody<'a> {
    /// Scans `body` (a spool file in one pass off the async threads).
    pub(super) async fn new(body: Body<'a>) -> Result<Self, Error> {
        match body {
            Body::Bytes(bytes) => {
                let mut scan = Scan::default();
                scan.feed(bytes);
                scan.check()?;
                let empty = bytes.is_empty();
                let bytes = bytes.strip_suffix(b"\r\n").unwrap_or(bytes);
                Ok(PreparedBody {
                    source: Source::Bytes(bytes),
                    len: bytes.len() as u64,
                    eightbit: scan.eightbit,
                    empty,
                })
            }
            Body::File(path) => {
                let path = path.to_path_buf();
                let shown = path.display().to_string();
                let (file, scan, len) = blocking(move || scan_file(&path))
                    .await
                    .map_err(|e| Error::io(shown, e))?;
                scan.check()?;
                let empty = len == 0;
                let len = if scan.ends_with_crlf { len - 2 } else { len };
                Ok(PreparedBody {
                    source: Source::File(file),
                    len,
                    eightbit: scan.eightbit,
                    empty,
                })
            }
        }
    }
}

/// Appends `body` (checked: no bare CR or LF, its final CRLF dropped) to `out` as the
/// wire carries it: a dot at the start of a line doubled (RFC 5321 §4.5.2), then
/// `CRLF . CRLF`. What lettre's `message_iter` sends for it, found with `memmem` rather
/// than a byte at a time.
pub(super) fn stuff(body: &[u8], out: &mut Vec<u8>) {
    out.reserve(body.len() + body.len() / 64 + 5);
    if body.first() == Some(&b'.') {
        out.push(b'.');
    }
    let mut start = 0;
    // Every LF follows a CR here (`Scan::check`), so `\n.` is a dot starting a line.
    for i in memchr::memmem::find_iter(body, b"\n.") {
        out.extend_from_slice(&body[start..=i]);
        out.push(b'.');
        start = i + 1;
    }
    out.extend_from_slice(&body[start..]);
    out.extend_from_slice(b"\r\n.\r\n");
}

/// What one pass over the body finds.
#[derive(Debug, Default)]
pub(super) struct Scan {
    pub(super) eightbit: bool,
    /// A CR not followed by LF, or an LF not preceded by CR.
    pub(super) bare: bool,
    pub(super) prev_cr: bool,
    /// The last two bytes seen are CRLF.
    pub(super) ends_with_crlf: bool,
}

impl Scan {
    /// Vectorized (`is_ascii`, `memchr`): a byte-by-byte loop here cost as much CPU as
    /// receiving the message.
    pub(super) fn feed(&mut self, chunk: &[u8]) {
        let Some(&last) = chunk.last() else {
            return;
        };
        self.eightbit |= !chunk.is_ascii();
        // Byte `i - 1`, where it may sit at the end of the previous chunk.
        let cr_before = |i: usize| match i {
            0 => self.prev_cr,
            _ => chunk[i - 1] == b'\r',
        };
        for i in memchr::memchr2_iter(b'\r', b'\n', chunk) {
            if chunk[i] == b'\n' {
                // An LF without a CR before it.
                self.bare |= !cr_before(i);
            } else if chunk.get(i + 1).is_some_and(|&next| next != b'\n') {
                // A CR followed by something else (one at the end is judged by the
                // next chunk, or by `check`).
                self.bare = true;
            }
        }
        if self.prev_cr && chunk[0] != b'\n' {
            self.bare = true;
        }
        self.ends_with_crlf = last == b'\n' && cr_before(chunk.len() - 1);
        self.prev_cr = last == b'\r';
    }

    /// The session hands us normalized data; a bare CR or LF here means a bug upstream
    /// of us, and passing it on could let an upstream see a second message (smuggling).
    pub(super) fn check(&self) -> Result<(), Error> {
        if self.bare || self.prev_cr {
            return Err(Error::local(
                "message has a bare CR or LF; not sent upstream",
            ));
        }
        Ok(())
    }
}

pub(super) fn scan_file(path: &Path) -> io::Result<(fs::File, Scan, u64)> {
    let mut file = fs::File::open(path)?;
    let mut scan = Scan::default();
    let mut len = 0u64;
    let mut buf = vec![0; CHUNK];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        scan.feed(&buf[..n]);
        len += n as u64;
    }
    file.seek(SeekFrom::Start(0))?;
    Ok((file, scan, len))
}

/// The spool file in pieces; on a read error or a short file it trips the stream's
/// kill switch, so lettre's final dot never reaches the upstream.
pub(super) struct FileChunks {
    pub(super) file: fs::File,
    pub(super) remaining: u64,
    pub(super) poison: Arc<AtomicBool>,
}

impl Iterator for FileChunks {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        if self.remaining == 0 {
            return None;
        }
        let mut buf = vec![0; (self.remaining as usize).min(CHUNK)];
        match self.file.read_exact(&mut buf) {
            Ok(()) => {
                self.remaining -= buf.len() as u64;
                Some(buf)
            }
            Err(e) => {
                tracing::error!(error = %e, "reading the spooled message failed; aborting DATA");
                self.poison.store(true, Ordering::SeqCst);
                self.remaining = 0;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// lettre's encoder (`ClientCodec`), as `message_iter` used it: the reference.
    fn lettre_wire(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut line_start = true;
        let mut after_cr = false;
        for &b in body {
            if line_start && b == b'.' {
                out.push(b'.');
            }
            out.push(b);
            line_start = after_cr && b == b'\n';
            after_cr = b == b'\r';
        }
        out.extend_from_slice(b"\r\n.\r\n");
        out
    }

    #[test]
    fn stuffing_matches_lettre() {
        for body in [
            &b""[..],
            b".",
            b"..",
            b".a\r\n.\r\n..b\r\nc.d\r\n.",
            b"Subject: x\r\n\r\nno dots here",
            b"a\r\n\r\n.\r\n\r\n.",
        ] {
            let mut out = b"held ".to_vec();
            stuff(body, &mut out);
            let mut want = b"held ".to_vec();
            want.extend_from_slice(&lettre_wire(body));
            assert_eq!(out, want, "{}", String::from_utf8_lossy(body));
        }
    }
}
