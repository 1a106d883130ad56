//! Accept loop: listeners, connection permits, allow-list, TLS acceptors, graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::delivery::Delivery;
use crate::reply::Reply;
use crate::smtp::session::{self, BoxStream, SessionCtx};

/// How long an implicit-TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for sessions in flight before giving up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// A bound listening socket.
pub struct Bound {
    listener: TcpListener,
    /// TLS from the first byte (a `tls_listen` entry).
    implicit_tls: bool,
}

impl Bound {
    /// The address actually bound (port 0 resolved).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Whether this is an implicit-TLS listener.
    pub fn is_implicit_tls(&self) -> bool {
        self.implicit_tls
    }
}

/// Binds every configured listener. An address the host lacks (no IPv6) is skipped
/// with a warning; binding nothing at all is an error.
pub async fn bind(config: &Config) -> Result<Vec<Bound>, String> {
    let mut bound = Vec::new();
    let wanted = config
        .server
        .listen
        .iter()
        .map(|a| (a, false))
        .chain(config.server.tls_listen.iter().map(|a| (a, true)));
    for (addr, implicit_tls) in wanted {
        match TcpListener::bind(addr).await {
            Ok(listener) => bound.push(Bound {
                listener,
                implicit_tls,
            }),
            Err(e) if host_lacks_ipv6(addr, &e) => {
                tracing::warn!("skipping listener {addr}: this host has no such address ({e})");
            }
            Err(e) => return Err(format!("cannot listen on {addr}: {e}")),
        }
    }
    if bound.is_empty() {
        return Err("no listener could be bound".to_string());
    }
    Ok(bound)
}

/// Binding an IPv6 address failed because the host has no IPv6 there: the address is
/// missing (`EADDRNOTAVAIL`, e.g. IPv6 disabled on the interface) or the kernel has no
/// IPv6 at all (`EAFNOSUPPORT`, which std does not map to an `ErrorKind`).
fn host_lacks_ipv6(addr: &SocketAddr, e: &std::io::Error) -> bool {
    addr.is_ipv6()
        && (e.kind() == std::io::ErrorKind::AddrNotAvailable
            || e.raw_os_error() == Some(libc::EAFNOSUPPORT))
}

/// Serves the bound listeners until `shutdown` is cancelled, then waits for the
/// sessions in flight (each is told `421 4.3.0` at its next command).
pub async fn serve(
    config: Arc<Config>,
    delivery: Arc<Delivery>,
    listeners: Vec<Bound>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let tls = match &config.server.tls {
        Some(files) => Some(crate::tls::acceptor(&files.cert, &files.key)?),
        None => None,
    };
    if listeners.iter().any(|l| l.implicit_tls) && tls.is_none() {
        return Err("tls_listen needs tls_cert and tls_key".to_string());
    }
    let ctx = Arc::new(SessionCtx {
        config: config.clone(),
        delivery,
        tls: tls.clone(),
        shutdown: shutdown.clone(),
    });
    let permits = Arc::new(Semaphore::new(config.server.max_connections));
    let tracker = TaskTracker::new();

    for bound in listeners {
        let addr = bound
            .local_addr()
            .map_err(|e| format!("listener address: {e}"))?;
        if bound.implicit_tls {
            tracing::info!("listening on {addr} (implicit TLS)");
        } else {
            tracing::info!("listening on {addr}");
        }
        let ctx = ctx.clone();
        let permits = permits.clone();
        let tls = if bound.implicit_tls {
            tls.clone()
        } else {
            None
        };
        let sessions = tracker.clone();
        tracker.spawn(accept_loop(bound.listener, tls, ctx, permits, sessions));
    }

    shutdown.cancelled().await;
    tracing::info!("shutting down: no new connections, waiting for sessions in flight");
    tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("sessions still open after {DRAIN_TIMEOUT:?}; exiting anyway");
    }
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    implicit_tls: Option<TlsAcceptor>,
    ctx: Arc<SessionCtx>,
    permits: Arc<Semaphore>,
    sessions: TaskTracker,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        if !network_allowed(&ctx.config.server.allow_networks, peer.ip()) {
            tracing::info!(%peer, "refused: client network not in allow_networks");
            sessions.spawn(refuse(stream, Reply::network_not_allowed()));
            continue;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "refused: max_connections reached");
            sessions.spawn(refuse(stream, Reply::too_many_connections()));
            continue;
        };
        let ctx = ctx.clone();
        let tls = implicit_tls.clone();
        sessions.spawn(async move {
            let _permit = permit;
            let is_tls = tls.is_some();
            let stream: BoxStream = match tls {
                None => Box::new(stream),
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => Box::new(tls_stream),
                        Ok(Err(e)) => {
                            tracing::info!(%peer, "TLS handshake failed: {e}");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            session::run(stream, peer, is_tls, ctx).await;
        });
    }
}

/// Whether a client at `ip` may connect: `allowed` is empty or holds its network. On a
/// dual-stack `[::]` listener an IPv4 client shows up as `::ffff:a.b.c.d`; it is matched
/// as the IPv4 address it is.
fn network_allowed(allowed: &[ipnet::IpNet], ip: std::net::IpAddr) -> bool {
    let ip = ip.to_canonical();
    allowed.is_empty() || allowed.iter().any(|net| net.contains(&ip))
}

/// Sends one refusal line and closes, without reading anything.
async fn refuse(mut stream: TcpStream, reply: Reply) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = stream.write_all(reply.to_wire().as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Error, ErrorKind};

    #[test]
    fn allow_networks_matches_ipv4_clients_of_a_dual_stack_listener() {
        let nets: Vec<ipnet::IpNet> =
            vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(network_allowed(&nets, ip("10.1.2.3")));
        assert!(network_allowed(&nets, ip("::ffff:10.1.2.3")));
        assert!(network_allowed(&nets, ip("fd00::1")));
        assert!(!network_allowed(&nets, ip("::ffff:192.168.1.1")));
        assert!(!network_allowed(&nets, ip("127.0.0.1")));
        assert!(network_allowed(&[], ip("192.0.2.1")));
    }

    #[test]
    fn only_a_missing_ipv6_stack_or_address_is_skipped() {
        let v6: SocketAddr = "[::1]:2525".parse().unwrap();
        let v4: SocketAddr = "127.0.0.1:2525".parse().unwrap();
        let no_family = Error::from_raw_os_error(libc::EAFNOSUPPORT);
        let no_address = Error::from_raw_os_error(libc::EADDRNOTAVAIL);
        assert!(host_lacks_ipv6(&v6, &no_family));
        assert!(host_lacks_ipv6(&v6, &no_address));
        assert!(!host_lacks_ipv6(&v4, &no_address));
        assert!(!host_lacks_ipv6(&v6, &Error::from(ErrorKind::AddrInUse)));
        assert!(!host_lacks_ipv6(
            &v6,
            &Error::from_raw_os_error(libc::EACCES)
        ));
    }
}
