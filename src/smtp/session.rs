//! One client session: the SMTP state machine (SPEC §5).

// TEMPORARY interface placeholder (lead): replaced by the session helper's implementation.
use std::net::SocketAddr;
use std::sync::Arc;

/// Any client stream (plain TCP or TLS).
pub trait AsyncStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> AsyncStream for T {}
/// A boxed client stream.
pub type BoxStream = Box<dyn AsyncStream>;

/// What every session shares.
pub struct SessionCtx {
    /// The configuration.
    pub config: Arc<crate::config::Config>,
    /// Where accepted messages go.
    pub delivery: Arc<crate::delivery::Delivery>,
    /// STARTTLS acceptor.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Cancelled at shutdown.
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// Runs one session.
pub async fn run(stream: BoxStream, peer: SocketAddr, is_tls: bool, ctx: Arc<SessionCtx>) {
    todo!()
}
