//! The connection pool of an SMTP channel: idle connections for reuse, and a
//! semaphore so that never more than the channel's `connections` are open at once
//! (lettre's own pool caps idle connections only).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::commands::Quit;
use lettre::transport::smtp::extension::ClientId;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsConnector;

use super::{Error, Step, Upstreams};
use crate::config::SmtpTarget;

/// One SMTP channel: where to connect, how to secure and log in, and its pool.
pub(super) struct SmtpChannel {
    pub(super) name: String,
    /// Host, port, TLS mode and credentials, as configured.
    pub(super) target: SmtpTarget,
    pub(super) hello: ClientId,
    /// For STARTTLS and implicit TLS alike: we do the handshake (never lettre, see
    /// `starttls.rs`), so a TLS failure is told apart from a refused TCP connection
    /// and the negotiated version can be reported.
    pub(super) tls: Option<TlsConnector>,
    /// One permit per open connection, idle or busy; shared with the channel's next
    /// transport when a reload changes the channel but not its `connections`, so the
    /// old transport's connections in flight count against the same limit.
    pub(super) slots: Arc<Semaphore>,
    /// The channel's `connections`: the size of `slots`.
    pub(super) connections: usize,
    /// A reload replaced this transport: a connection coming back is closed, not pooled
    /// (idle here, it would hold a slot the next transport needs).
    pub(super) retired: AtomicBool,
    /// The access-token cache of an XOAUTH2 channel (shared with nothing else: one
    /// [`Upstreams`](super::Upstreams) per process serves both delivery modes).
    pub(super) token: Option<crate::oauth::ChannelToken>,
    idle: Mutex<Vec<Conn>>,
    /// Signalled when a connection goes back to `idle`, for tasks waiting for a slot.
    returned: Notify,
}

/// An open, logged-in upstream connection.
pub(super) struct Conn {
    pub(super) smtp: AsyncSmtpConnection,
    /// Kill switch of the underlying stream (see `stream.rs`).
    pub(super) poison: Arc<AtomicBool>,
    /// Writes to the underlying stream that bypass lettre (see `stream.rs`).
    pub(super) outbox: super::stream::Outbox,
    /// When it went idle (or was opened).
    pub(super) since: Instant,
    /// Taken from the pool without a NOOP check (see [`super::TRUSTED_IDLE`]).
    pub(super) unchecked: bool,
    /// Unchecked, and found closed at MAIL: nothing reached the upstream.
    pub(super) stale: bool,
    /// The upstream offers PIPELINING (in its EHLO reply after TLS).
    pub(super) pipelining: bool,
    /// Held for the life of the connection: frees the slot when dropped.
    pub(super) _permit: OwnedSemaphorePermit,
}

impl SmtpChannel {
    /// A channel with an empty pool of `connections` slots.
    pub(super) fn with_pool(
        name: &str,
        target: &SmtpTarget,
        hello: ClientId,
        tls: Option<TlsConnector>,
        connections: usize,
    ) -> Self {
        SmtpChannel {
            name: name.to_string(),
            target: target.clone(),
            hello,
            tls,
            slots: Arc::new(Semaphore::new(connections.max(1))),
            connections,
            retired: AtomicBool::new(false),
            token: None,
            idle: Mutex::new(Vec::new()),
            returned: Notify::new(),
        }
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Conn>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used idle connection, after closing those idle too long.
    fn pop_idle(&self, max_idle: Duration) -> Option<Conn> {
        let mut idle = self.idle();
        idle.retain(|conn| conn.since.elapsed() < max_idle);
        idle.pop()
    }

    /// Closes every idle connection, freeing their slots.
    pub(super) fn close_idle(&self) {
        self.idle().clear();
    }

    /// Says QUIT on every idle connection and closes it.
    pub(super) async fn quit_idle(&self) {
        let idle = std::mem::take(&mut *self.idle());
        for mut conn in idle {
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.smtp.command(Quit)).await;
        }
    }

    /// Puts a connection back for reuse.
    pub(super) fn checkin(&self, mut conn: Conn) {
        conn.since = Instant::now();
        conn.unchecked = false;
        {
            // Under the lock `retire` sets the flag with: no connection slips in after it.
            let mut idle = self.idle();
            if !self.retired.load(Ordering::SeqCst) {
                idle.push(conn);
                drop(idle);
                self.returned.notify_one();
                return;
            }
        }
        // Its slot goes back once QUIT is said (or the connection is found gone).
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.smtp.command(Quit)).await;
        });
    }

    /// A reload replaced this transport: from now on connections are not pooled here.
    pub(super) fn retire(&self) {
        let _idle = self.idle();
        self.retired.store(true, Ordering::SeqCst);
    }
}

impl Upstreams {
    /// A healthy idle connection, or a new one once a slot is free. With `trust`, one
    /// idle for less than `trusted_idle` is taken without a NOOP check.
    pub(super) async fn checkout(&self, ch: &SmtpChannel, trust: bool) -> Result<Conn, Error> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        // Bounded by the deadline: each turn either returns or waits for a slot or a
        // returned connection.
        loop {
            while let Some(mut conn) = ch.pop_idle(self.idle_timeout) {
                if trust && conn.since.elapsed() < self.trusted_idle {
                    conn.unchecked = true;
                    return Ok(conn);
                }
                let probe = self.timeout.min(Duration::from_secs(10));
                if let Ok(true) = tokio::time::timeout(probe, conn.smtp.test_connected()).await {
                    return Ok(conn);
                }
                tracing::debug!(channel = %ch.name, "dropping a broken pooled connection");
            }
            tokio::select! {
                permit = ch.slots.clone().acquire_owned() => {
                    let permit = permit.map_err(|_| Error::local("connection pool closed"))?;
                    return self.connect(ch, permit, &mut |s| tracing::debug!(channel = %ch.name, "{s}")).await;
                }
                _ = ch.returned.notified() => continue,
                _ = tokio::time::sleep_until(deadline) => return Err(Error::Timeout { step: Step::Connect }),
            }
        }
    }
}
