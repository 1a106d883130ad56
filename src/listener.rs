//! Accept loop: listeners, connection permits (in all and per client), allow-list, TLS
//! acceptors, graceful shutdown.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, host_lacks_ipv6};
use crate::delivery::Delivery;
use crate::reply::Reply;
use crate::smtp::session::{self, BoxStream, SessionCtx};

/// How long an implicit-TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits, beyond `shutdown_grace`, for sessions to say goodbye.
const DRAIN_MARGIN: Duration = Duration::from_secs(15);

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

/// What a new session starts with: the current config, its delivery and TLS acceptor. A
/// reload replaces it; a session keeps the one it began with to its end.
pub struct Live {
    current: RwLock<Arc<SessionCtx>>,
}

impl Live {
    /// The context for `config` and `delivery`: reads the TLS certificate and key.
    pub fn new(
        config: Arc<Config>,
        delivery: Arc<Delivery>,
        shutdown: CancellationToken,
    ) -> Result<Live, String> {
        let ctx = session_ctx(config, delivery, shutdown, Default::default())?;
        Ok(Live {
            current: RwLock::new(Arc::new(ctx)),
        })
    }

    /// The context new sessions get now.
    pub fn current(&self) -> Arc<SessionCtx> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// From now on, new sessions get `ctx`; returns the one it replaces.
    pub fn replace(&self, ctx: SessionCtx) -> Arc<SessionCtx> {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *current, Arc::new(ctx))
    }
}

/// A session context for `config`: the TLS acceptor is built from the certificate and key
/// files as they are now (a reload reads renewed ones). Implicit-TLS listeners need one.
pub fn session_ctx(
    config: Arc<Config>,
    delivery: Arc<Delivery>,
    shutdown: CancellationToken,
    failed_logins: Arc<crate::smtp::auth::FailedLogins>,
) -> Result<SessionCtx, String> {
    let tls = match &config.server.tls {
        Some(files) => Some(crate::tls::acceptor(&files.cert, &files.key)?),
        None => None,
    };
    if !config.server.tls_listen.is_empty() && tls.is_none() {
        return Err("tls_listen needs tls_cert and tls_key".to_string());
    }
    Ok(SessionCtx {
        config,
        delivery,
        tls,
        shutdown,
        failed_logins,
    })
}

/// Serves the bound listeners until `shutdown` is cancelled, then waits for the
/// sessions in flight: idle ones are told `421 4.3.0` at once, open transactions may
/// finish within `shutdown_grace` (then `421 4.3.0`).
pub async fn serve(
    config: Arc<Config>,
    delivery: Arc<Delivery>,
    listeners: Vec<Bound>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let live = Arc::new(Live::new(config, delivery, shutdown.clone())?);
    serve_live(live, listeners, shutdown).await
}

/// [`serve`] with the session context taken from `live` for each new connection.
pub async fn serve_live(
    live: Arc<Live>,
    listeners: Vec<Bound>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let config = live.current().config.clone();
    if listeners.iter().any(|l| l.implicit_tls) && live.current().tls.is_none() {
        return Err("tls_listen needs tls_cert and tls_key".to_string());
    }
    let gate = Arc::new(Gate {
        permits: Arc::new(Semaphore::new(config.server.max_connections)),
        per_client: PerClient::new(config.server.max_connections_per_client),
        refusals: RefusalLog::default(),
    });
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
        let live = live.clone();
        let gate = gate.clone();
        let sessions = tracker.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(accept_loop(
            bound.listener,
            bound.implicit_tls,
            live,
            gate,
            sessions,
            shutdown,
        ));
    }

    shutdown.cancelled().await;
    tracing::info!("shutting down: no new connections, waiting for sessions in flight");
    tracker.close();
    let grace = live.current().config.server.shutdown_grace;
    let drain = grace.saturating_add(DRAIN_MARGIN);
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        tracing::warn!("sessions still open after {drain:?}; exiting anyway");
    }
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    implicit_tls: bool,
    live: Arc<Live>,
    gate: Arc<Gate>,
    sessions: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
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
        // The session's config from here to its end, even across a reload.
        let ctx = live.current();
        let admitted = if network_allowed(&ctx.config.server.allow_networks, peer.ip()) {
            gate.admit(peer.ip())
        } else {
            Err(Refused::Network)
        };
        let admitted = match admitted {
            Ok(admitted) => admitted,
            Err(refused) => {
                if let Some(suppressed) = gate.refusals.note(refused, Instant::now()) {
                    tracing::warn!(
                        %peer,
                        suppressed,
                        "refused: {} (later refusals for this reason: at most one line a second)",
                        refused.reason()
                    );
                }
                sessions.spawn(refuse(stream, refused.reply()));
                continue;
            }
        };
        let tls: Option<TlsAcceptor> = match (implicit_tls, &ctx.tls) {
            (false, _) => None,
            (true, Some(acceptor)) => Some(acceptor.clone()),
            // Never plaintext on a TLS port (session_ctx makes this unreachable).
            (true, None) => {
                tracing::error!(%peer, "no TLS certificate for an implicit-TLS listener; connection closed");
                continue;
            }
        };
        sessions.spawn(async move {
            let _admitted = admitted;
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

/// Admission of a new connection: the overall and the per-client limits.
struct Gate {
    permits: Arc<Semaphore>,
    per_client: PerClient,
    refusals: RefusalLog,
}

/// A connection's places in both limits, given back when it is dropped.
struct Admitted {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _slot: Option<ClientSlot>,
}

impl Gate {
    fn admit(&self, ip: IpAddr) -> Result<Admitted, Refused> {
        // The per-client place first: a client at its limit must not take a global one.
        let slot = self.per_client.enter(ip)?;
        let permit = self
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::Full)?;
        Ok(Admitted {
            _permit: permit,
            _slot: slot,
        })
    }
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// Not in `allow_networks`.
    Network,
    /// `max_connections_per_client` reached for this address.
    PerClient,
    /// `max_connections` reached.
    Full,
}

impl Refused {
    const ALL: [Refused; 3] = [Refused::Network, Refused::PerClient, Refused::Full];

    fn reason(self) -> &'static str {
        match self {
            Refused::Network => "client network not in allow_networks",
            Refused::PerClient => "max_connections_per_client reached for this address",
            Refused::Full => "max_connections reached",
        }
    }

    fn reply(self) -> Reply {
        match self {
            Refused::Network => Reply::network_not_allowed(),
            Refused::PerClient => Reply::too_many_from_client(),
            Refused::Full => Reply::too_many_connections(),
        }
    }
}

/// Open connections per client address. Loopback clients are exempt (as Postfix's
/// anvil exempts mynetworks): local programs are the proxy's own users, and one
/// address stands for all of them. An address leaves the table with its last
/// connection, so the table never holds more than `max_connections` entries.
struct PerClient {
    limit: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One counted connection; dropping it gives the place back.
struct ClientSlot {
    ip: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PerClient {
    fn new(limit: usize) -> Self {
        PerClient {
            limit,
            open: Arc::default(),
        }
    }

    /// `None` for an exempt (loopback) client, a slot while under the limit.
    fn enter(&self, ip: IpAddr) -> Result<Option<ClientSlot>, Refused> {
        let ip = ip.to_canonical();
        if ip.is_loopback() {
            return Ok(None);
        }
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(ip).or_insert(0);
        if *count >= self.limit {
            return Err(Refused::PerClient);
        }
        *count += 1;
        Ok(Some(ClientSlot {
            ip,
            open: self.open.clone(),
        }))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Refusals are logged at most once a second per reason, so a flood cannot fill the
/// log; the next line says how many were left out.
#[derive(Default)]
struct RefusalLog {
    /// Per reason (in [`Refused::ALL`] order): last line written, refusals not logged since.
    last: Mutex<[(Option<Instant>, u64); 3]>,
}

impl RefusalLog {
    /// Notes a refusal at `now`; `Some(suppressed)` when it is to be logged.
    fn note(&self, refused: Refused, now: Instant) -> Option<u64> {
        let i = Refused::ALL.iter().position(|r| *r == refused)?;
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let (logged, suppressed) = &mut last[i];
        match logged {
            Some(at) if now.duration_since(*at) < Duration::from_secs(1) => {
                *suppressed += 1;
                None
            }
            _ => {
                *logged = Some(now);
                Some(std::mem::take(suppressed))
            }
        }
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
    fn per_client_limit_counts_open_connections_per_address() {
        let limit = PerClient::new(2);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a1 = limit.enter(ip("192.0.2.1")).unwrap();
        let a2 = limit.enter(ip("::ffff:192.0.2.1")).unwrap();
        assert!(a1.is_some() && a2.is_some());
        assert_eq!(
            limit.enter(ip("192.0.2.1")).err(),
            Some(Refused::PerClient),
            "third from one address"
        );
        let b = limit.enter(ip("192.0.2.2")).unwrap();
        assert!(b.is_some(), "another address has its own count");
        drop(a1);
        let a3 = limit.enter(ip("192.0.2.1")).unwrap();
        assert!(a3.is_some(), "a closed connection gives its place back");
        drop((a2, a3, b));
        assert!(
            limit.open.lock().unwrap().is_empty(),
            "no entry outlives its connections"
        );
        // Loopback is exempt, however many.
        for _ in 0..5 {
            assert!(limit.enter(ip("127.0.0.2")).unwrap().is_none());
            assert!(limit.enter(ip("::1")).unwrap().is_none());
        }
    }

    #[test]
    fn the_gate_refuses_a_client_at_its_limit_without_taking_a_global_place() {
        let gate = Gate {
            permits: Arc::new(Semaphore::new(3)),
            per_client: PerClient::new(1),
            refusals: RefusalLog::default(),
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let _a = gate.admit(ip("192.0.2.1")).unwrap();
        for _ in 0..10 {
            assert_eq!(gate.admit(ip("192.0.2.1")).err(), Some(Refused::PerClient));
        }
        let _b = gate.admit(ip("192.0.2.2")).unwrap();
        let _c = gate.admit(ip("127.0.0.1")).unwrap();
        assert_eq!(gate.admit(ip("127.0.0.1")).err(), Some(Refused::Full));
        assert_eq!(
            Refused::PerClient.reply().to_string(),
            Reply::too_many_from_client().to_string()
        );
    }

    #[test]
    fn refusals_are_logged_once_a_second_per_reason_with_a_count() {
        let log = RefusalLog::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(log.note(Refused::Full, at(0)), Some(0));
        assert_eq!(log.note(Refused::Full, at(10)), None);
        assert_eq!(log.note(Refused::Full, at(999)), None);
        assert_eq!(log.note(Refused::PerClient, at(500)), Some(0), "own budget");
        assert_eq!(log.note(Refused::Full, at(1000)), Some(2));
        assert_eq!(log.note(Refused::Full, at(1500)), None);
        assert_eq!(log.note(Refused::Network, at(1500)), Some(0));
        assert_eq!(log.note(Refused::Full, at(2100)), Some(1));
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
