//! STARTTLS (RFC 3207): the plain connection becomes TLS and the session starts over.

use std::io;

use tokio::time::timeout;

use super::{Session, Stop};
use crate::smtp::reply::{Reply, Sequence};

impl Session {
    /// STARTTLS: the handshake, then a session that knows nothing from before it.
    pub(super) async fn starttls(&mut self) -> Result<(), Stop> {
        let acceptor = match &self.ctx.tls {
            Some(acceptor) if !self.is_tls => acceptor.clone(),
            _ => return self.reply(&Reply::tls_unavailable()),
        };
        if self.tx.is_some() {
            return self.reply(&Reply::bad_sequence(Sequence::StartTlsInTransaction));
        }
        self.reply(&Reply::ready_for_tls())?;
        self.flush().await?;
        // RFC 3207 / SPEC §5: whatever the client pipelined after STARTTLS is dropped,
        // never executed after the handshake.
        self.rbuf = Vec::new();
        self.rpos = 0;
        self.skipping = false;
        let plain = std::mem::replace(&mut self.io, Box::new(tokio::io::empty()));
        match timeout(self.config.server.idle_timeout, acceptor.accept(plain)).await {
            Ok(Ok(tls)) => self.io = Box::new(tls),
            Ok(Err(e)) => return Err(Stop::Tls(e)),
            Err(_) => {
                return Err(Stop::Tls(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TLS handshake timed out",
                )));
            }
        }
        // RFC 3207 §4.2: forget everything learnt before the handshake.
        self.is_tls = true;
        self.helo = None;
        self.user = None;
        self.auth = None;
        self.tx = None;
        Ok(())
    }
}
