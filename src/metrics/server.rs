//! The `[metrics] listen` HTTP server: `/metrics` (Prometheus text, or OpenMetrics when
//! the scraper asks for it), `/healthz`, and with `status_page` the status page `/` and
//! `/status.json` ([`super::page`], [`super::status`]); every other path is 404. Only
//! loopback clients and `allow_networks` are answered; everyone else gets 403 on every
//! path (SPEC §9).
//!
//! hyper parses HTTP. Each connection serves one request (no keep-alive) within
//! [`CONNECTION_TIMEOUT`]; at most [`MAX_CONNECTIONS`] are served at once and a connection
//! beyond that is closed at once, so a slow or hostile client cannot hold the server.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{
    ACCEPT, ALLOW, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HeaderValue,
    REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Longest a connection may take, from accept to the response sent.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client may take to send its request's header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest the spool probe of `/healthz` may take (a hung disk or NFS mount is unhealthy).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What `/healthz` looks at.
#[derive(Debug)]
pub struct Health {
    /// The SMTP listeners accept connections (false before they run and once shutting down).
    listening: AtomicBool,
    /// Where a probe file is written and removed: `spool_dir/tmp`, where messages are drafted.
    probe_dir: PathBuf,
    probes: AtomicU64,
    /// A probe is running on the blocking pool. One that outlived its timeout (a hung
    /// disk or NFS mount) still holds a thread there: no second one is started beside
    /// it, or every scrape would take one more thread until the pool is exhausted.
    probing: Arc<AtomicBool>,
    /// What a probe does (a test makes it hang).
    probe: fn(&Path) -> io::Result<()>,
    /// How long a probe may take.
    probe_timeout: Duration,
    /// `[state] backend = "redis"`: it must answer (limited channels wait while it does not).
    shared_state: Option<crate::state::shared::RedisState>,
    /// Cancelled at shutdown: read by `check` itself, so /healthz turns 503 the moment
    /// the listeners start to stop, not when a watcher task gets round to it.
    shutdown: std::sync::OnceLock<CancellationToken>,
}

impl Health {
    /// Health of a proxy whose spool is `spool_dir`; not listening yet.
    pub fn new(spool_dir: &Path) -> Self {
        Health {
            listening: AtomicBool::new(false),
            probe_dir: spool_dir.join("tmp"),
            probes: AtomicU64::new(0),
            probing: Arc::new(AtomicBool::new(false)),
            probe,
            probe_timeout: PROBE_TIMEOUT,
            shared_state: None,
            shutdown: std::sync::OnceLock::new(),
        }
    }

    /// Also reports the shared state's Redis: unhealthy while it does not answer.
    pub fn with_shared_state(mut self, redis: crate::state::shared::RedisState) -> Self {
        self.shared_state = Some(redis);
        self
    }

    /// The listeners stop when `shutdown` is cancelled.
    pub fn stop_with(&self, shutdown: CancellationToken) {
        let _ = self.shutdown.set(shutdown);
    }

    /// The SMTP listeners run (true) or have stopped (false).
    pub fn set_listening(&self, listening: bool) {
        self.listening.store(listening, Ordering::SeqCst);
    }

    /// `Ok(())`, or why the proxy is not healthy.
    pub async fn check(&self) -> Result<(), String> {
        let stopping = self.shutdown.get().is_some_and(|t| t.is_cancelled());
        if stopping || !self.listening.load(Ordering::SeqCst) {
            return Err("SMTP listeners are not running".to_string());
        }
        let n = self.probes.fetch_add(1, Ordering::Relaxed);
        let path = self
            .probe_dir
            .join(format!(".healthz-{}-{n}", std::process::id()));
        let shown = self.probe_dir.display().to_string();
        if self.probing.swap(true, Ordering::SeqCst) {
            return Err(format!(
                "spool check still running (an earlier one has not finished): {shown}"
            ));
        }
        let (probing, run) = (self.probing.clone(), self.probe);
        let probe = tokio::task::spawn_blocking(move || {
            let result = run(&path);
            probing.store(false, Ordering::SeqCst);
            result
        });
        match tokio::time::timeout(self.probe_timeout, probe).await {
            Ok(Ok(Ok(()))) => match &self.shared_state {
                // Bounded by the Redis call timeout.
                Some(redis) => redis.ping().await.map_err(|e| {
                    format!(
                        "shared state unavailable (Redis {}): {}; limited channels wait",
                        redis.display(),
                        e.0
                    )
                }),
                None => Ok(()),
            },
            Ok(Ok(Err(e))) => Err(format!("spool is not writable: {shown}: {e}")),
            Ok(Err(e)) => Err(format!("spool check failed: {e}")),
            Err(_) => Err(format!(
                "spool check timed out after {}s: {shown}",
                self.probe_timeout.as_secs()
            )),
        }
    }
}

/// Writes a few bytes to a new file and removes it: a read-only or full file system, a
/// missing folder or a folder that is no folder any more all fail here, for root too
/// (whom permission bits do not stop).
fn probe(path: &Path) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(crate::fsutil::FILE_MODE)
            .open(path)?;
        file.write_all(b"mailgate health probe\n")?;
        file.sync_data()
    })();
    let removed = std::fs::remove_file(path);
    written?;
    removed
}

/// The HTTP server, bound and running.
pub struct MetricsServer {
    addrs: Vec<SocketAddr>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl MetricsServer {
    /// Binds every address of `listen` (an IPv6 one the host lacks is skipped, as for the
    /// SMTP listeners) and starts serving `health` and the process's metrics.
    pub async fn start(
        settings: &crate::config::Metrics,
        health: Arc<Health>,
    ) -> Result<Self, String> {
        let listen = &settings.listen;
        let access = Arc::new(Access {
            allow_networks: settings.allow_networks.clone(),
            status_page: settings.status_page,
        });
        let mut listeners = Vec::new();
        for addr in listen {
            match TcpListener::bind(addr).await {
                Ok(listener) => listeners.push(listener),
                Err(e) if addr.is_ipv6() && crate::config::host_lacks_ipv6(addr, &e) => {
                    tracing::warn!(
                        "skipping metrics address {addr}: this host has no such address ({e})"
                    );
                }
                Err(e) => return Err(format!("cannot serve metrics on {addr}: {e}")),
            }
        }
        if listeners.is_empty() {
            return Err("no metrics address could be bound".to_string());
        }
        let stop = CancellationToken::new();
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut tasks = JoinSet::new();
        let mut addrs = Vec::new();
        for listener in listeners {
            let addr = listener
                .local_addr()
                .map_err(|e| format!("metrics address: {e}"))?;
            // Not "listening on": that phrase announces SMTP listeners.
            if access.status_page {
                tracing::info!(
                    "serving metrics at http://{addr}/metrics, health at http://{addr}/healthz and the status page at http://{addr}/"
                );
            } else {
                tracing::info!(
                    "serving metrics at http://{addr}/metrics and health at http://{addr}/healthz"
                );
            }
            addrs.push(addr);
            tasks.spawn(accept_loop(
                listener,
                health.clone(),
                access.clone(),
                permits.clone(),
                stop.clone(),
            ));
        }
        Ok(MetricsServer { addrs, stop, tasks })
    }

    /// The bound addresses (port 0 resolved).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Stops accepting and waits for the connections in flight (each bounded).
    pub async fn stop(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Who is answered, and what.
#[derive(Debug)]
struct Access {
    allow_networks: Vec<ipnet::IpNet>,
    status_page: bool,
}

async fn accept_loop(
    listener: TcpListener,
    health: Arc<Health>,
    access: Arc<Access>,
    permits: Arc<Semaphore>,
    stop: CancellationToken,
) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        while connections.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: do not spin.
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!("metrics: too many connections; closing one");
            continue;
        };
        let (health, access) = (health.clone(), access.clone());
        let allowed = super::status::allowed(peer.ip(), &access.allow_networks);
        connections.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |request| {
                let (health, access) = (health.clone(), access.clone());
                async move {
                    let reply = if allowed {
                        respond(&health, &access, &request).await
                    } else {
                        tracing::debug!(%peer, "metrics: client not in [metrics] allow_networks");
                        text(StatusCode::FORBIDDEN, "forbidden\n")
                    };
                    Ok::<_, Infallible>(reply)
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
        });
    }
    // Connections in flight end within CONNECTION_TIMEOUT.
    while connections.join_next().await.is_some() {}
}

type Reply = Response<Full<Bytes>>;

async fn respond(health: &Health, access: &Access, request: &Request<Incoming>) -> Reply {
    let path = request.uri().path();
    let page = access.status_page && (path == "/" || path == "/status.json");
    if path != "/metrics" && path != "/healthz" && !page {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut reply = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        reply
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return reply;
    }
    if page {
        return status_reply(path == "/status.json").await;
    }
    if path == "/healthz" {
        return match health.check().await {
            // Exactly `ok` (SPEC §8), for checkers that compare the body.
            Ok(()) => text(StatusCode::OK, "ok"),
            Err(reason) => {
                tracing::warn!(reason, "health check failed");
                text(StatusCode::SERVICE_UNAVAILABLE, &reason)
            }
        };
    }
    let wants_openmetrics = request
        .headers()
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let metrics = super::global();
    let (body, content_type) = if wants_openmetrics {
        (metrics.openmetrics(), OPENMETRICS_TEXT)
    } else {
        (metrics.prometheus_text(), PROMETHEUS_TEXT)
    };
    let mut reply = Response::new(Full::new(Bytes::from(body)));
    reply
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    reply
}

/// The status page or its JSON: read-only, never cached, loading nothing (CSP).
async fn status_reply(json: bool) -> Reply {
    let status = super::status::board().status().await;
    let (body, content_type) = if json {
        (status.to_json(), "application/json")
    } else {
        (super::page::render(&status), "text/html; charset=utf-8")
    };
    let mut reply = Response::new(Full::new(Bytes::from(body)));
    let headers = reply.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(STATUS_CSP),
    );
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    reply
}

/// The status page's Content-Security-Policy (SPEC §8): nothing but its inline style.
pub const STATUS_CSP: &str = "default-src 'none'; style-src 'unsafe-inline'";

fn text(status: StatusCode, body: &str) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::from(body.to_string())));
    *reply.status_mut() = status;
    reply.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn health_needs_listeners_and_a_writable_spool() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        std::fs::create_dir_all(spool.join("tmp")).unwrap();
        let mut health = Health::new(&spool);
        assert!(health.check().await.unwrap_err().contains("listeners"));
        health.set_listening(true);
        health.check().await.unwrap();
        assert_eq!(std::fs::read_dir(spool.join("tmp")).unwrap().count(), 0);
        // Shutdown turns it 503 at once, with no task in between.
        let shutdown = CancellationToken::new();
        health.stop_with(shutdown.clone());
        health.check().await.unwrap();
        shutdown.cancel();
        assert!(health.check().await.unwrap_err().contains("listeners"));
        health.shutdown.take();
        // A spool folder that is a file now: root cannot write under it either.
        std::fs::remove_dir_all(&spool).unwrap();
        std::fs::write(&spool, b"not a folder").unwrap();
        let why = health.check().await.unwrap_err();
        assert!(why.starts_with("spool is not writable"), "{why}");
    }

    static STARTED: AtomicU64 = AtomicU64::new(0);

    fn hung_disk(_: &Path) -> io::Result<()> {
        STARTED.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(600));
        Ok(())
    }

    /// A spool on a hung disk: each check times out, and no more than one probe thread
    /// waits on the disk, however often /healthz is asked.
    #[tokio::test]
    async fn a_hung_spool_probe_is_not_started_again_beside_itself() {
        let dir = tempfile::tempdir().unwrap();
        let mut health = Health::new(dir.path());
        health.probe = hung_disk;
        health.probe_timeout = Duration::from_millis(20);
        health.set_listening(true);
        for _ in 0..10 {
            let why = health.check().await.unwrap_err();
            assert!(why.contains("spool check"), "{why}");
        }
        assert_eq!(STARTED.load(Ordering::SeqCst), 1, "probes started");
        // Once it has returned, the next check probes again.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let _ = health.check().await;
        assert_eq!(STARTED.load(Ordering::SeqCst), 2);
    }
}
