//! EHLO and HELO: the greeting of the client, and what the session offers it.

use std::net::IpAddr;

use super::{Session, Stop};
use crate::smtp::reply::{self, Offer};

impl Session {
    /// EHLO (`extended`) or HELO: remembers the name and answers with the offer.
    pub(super) fn hello(&mut self, host: &str, extended: bool) -> Result<(), Stop> {
        // RFC 5321 §4.1.4: EHLO/HELO also resets the transaction.
        self.tx = None;
        self.helo = Some(host.to_string());
        let offer = extended.then(|| Offer {
            max_size: self.config.server.max_message_size,
            starttls: self.ctx.tls.is_some() && !self.is_tls,
            auth: self.auth_offered(),
        });
        // Positive: it costs nothing from the error budget.
        let wire = reply::hello(&self.config.server.hostname, offer);
        self.wbuf.extend_from_slice(wire.as_bytes());
        Ok(())
    }

    /// AUTH is offered when there are users, and only over TLS or loopback (SPEC §9).
    pub(super) fn auth_offered(&self) -> bool {
        !self.config.users.is_empty() && (self.is_tls || is_loopback(self.peer.ip()))
    }
}

/// Whether `ip` is loopback, an IPv4 loopback seen on a dual-stack socket included.
fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}
