//! The stream lettre talks over: plain TCP or TLS, with a kill switch and
//! write batching.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use lettre::transport::smtp::client::AsyncTokioStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The connection lettre talks over: plain or TLS (implicit or after STARTTLS), with a
/// kill switch that makes every later write fail.
///
/// Writes are held back until the next read (or until [`HOLD`] bytes wait): an SMTP
/// client always reads a reply after writing, so nothing waits longer than before,
/// but lettre's write-and-flush per piece (the body, then the final `.CRLF`, each a
/// packet of its own) becomes one send.
#[derive(Debug)]
pub(super) struct GuardedStream {
    pub(super) inner: Inner,
    pub(super) peer: SocketAddr,
    pub(super) poison: Arc<AtomicBool>,
    /// Written, not yet sent.
    pub(super) held: Vec<u8>,
    /// Read before anything from `inner` (see [`GuardedStream::after_starttls`]).
    greeting: &'static [u8],
    /// Bytes put here by the transaction, sent ahead of anything written after them.
    outbox: Outbox,
}

/// Bytes for the wire that bypass lettre: a transaction puts an in-memory message here,
/// dot-stuffed and with its end-of-data line ([`super::body::stuff`]), then only reads
/// the reply. lettre's own encoder looked at the message a byte at a time and cost a
/// relayed 1 KB message more CPU than reading it from the client.
pub(super) type Outbox = Arc<Mutex<Vec<u8>>>;

/// Most bytes [`GuardedStream`] holds back; larger writes go straight out.
pub(super) const HOLD: usize = 16 * 1024;

#[derive(Debug)]
pub(super) enum Inner {
    /// Plain TCP.
    Plain(TcpStream),
    /// Implicit TLS, or TLS after our own STARTTLS exchange.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl GuardedStream {
    /// Wraps `inner`; setting `poison` makes every later write fail.
    pub(super) fn new(inner: Inner, peer: SocketAddr, poison: Arc<AtomicBool>) -> Self {
        GuardedStream {
            inner,
            peer,
            poison,
            held: Vec::new(),
            greeting: b"",
            outbox: Outbox::default(),
        }
    }

    /// The handle a transaction writes past lettre with (see [`Outbox`]).
    pub(super) fn outbox(&self) -> Outbox {
        self.outbox.clone()
    }

    /// Moves what the outbox holds behind the held bytes, keeping the order of writes.
    fn take_outbox(&mut self) {
        // A poisoned lock only means a panic elsewhere while it was held; the bytes
        // are still whole (appends are single calls).
        let mut outbox = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
        if outbox.is_empty() {
            return;
        }
        if self.held.is_empty() {
            std::mem::swap(&mut self.held, &mut outbox);
        } else {
            self.held.extend_from_slice(&outbox);
            outbox.clear();
        }
        if outbox.capacity() > 2 * HOLD {
            *outbox = Vec::new();
        }
    }

    /// The stream of a connection whose greeting, EHLO and STARTTLS we handled
    /// (`starttls.rs`): lettre starts every connection by reading a greeting, so it
    /// reads a local one, then sends its EHLO over TLS. Nothing the upstream sent
    /// before the handshake is in it.
    pub(super) fn after_starttls(mut self) -> Self {
        self.greeting = b"220 mailgate: TLS established by STARTTLS\r\n";
        self
    }

    fn poisoned(&self) -> Option<io::Error> {
        self.poison.load(Ordering::SeqCst).then(|| {
            io::Error::other("message source failed; connection aborted before end of data")
        })
    }

    /// Sends the held bytes and flushes the stream under them; a poisoned stream sends
    /// nothing more.
    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.take_outbox();
        if let Some(e) = self.poisoned() {
            self.held.clear();
            return Poll::Ready(Err(e));
        }
        while !self.held.is_empty() {
            let sent = match &mut self.inner {
                Inner::Plain(s) => Pin::new(s).poll_write(cx, &self.held),
                Inner::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, &self.held),
            };
            match sent {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => drop(self.held.drain(..n)),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.held.capacity() > 2 * HOLD {
            self.held = Vec::new();
        }
        match &mut self.inner {
            Inner::Plain(s) => Pin::new(s).poll_flush(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = std::task::ready!(this.poll_send_held(cx)) {
            return Poll::Ready(Err(e));
        }
        if !this.greeting.is_empty() {
            let n = this.greeting.len().min(buf.remaining());
            buf.put_slice(&this.greeting[..n]);
            this.greeting = &this.greeting[n..];
            return Poll::Ready(Ok(()));
        }
        match &mut this.inner {
            Inner::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.poisoned() {
            return Poll::Ready(Err(e));
        }
        this.take_outbox();
        if this.held.len() + buf.len() > HOLD {
            if let Err(e) = std::task::ready!(this.poll_send_held(cx)) {
                return Poll::Ready(Err(e));
            }
            if buf.len() > HOLD {
                return match &mut this.inner {
                    Inner::Plain(s) => Pin::new(s).poll_write(cx, buf),
                    Inner::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
                };
            }
        }
        this.held.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    /// Leaves held bytes for the next read (see [`GuardedStream`]).
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.poisoned() {
            Some(e) => Poll::Ready(Err(e)),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = std::task::ready!(this.poll_send_held(cx)) {
            return Poll::Ready(Err(e));
        }
        match &mut this.inner {
            Inner::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl AsyncTokioStream for GuardedStream {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.peer)
    }
}
