//! MAIL and RCPT: the envelope of a transaction.

use smtp_proto::{MailFrom, RcptTo};
use tracing::{debug, info};

use super::{Session, Transaction};
use crate::config::DeliveryMode;
use crate::message::{Envelope, address};
use crate::metrics::{self, Outcome};
use crate::routing;
use crate::smtp::reply::{Reply, Sequence, Syntax, Verb};

impl Session {
    /// MAIL FROM: checks the sender and routes it; opens the transaction.
    pub(super) fn mail(&mut self, from: MailFrom<String>) -> Reply {
        if self.helo.is_none() {
            return Reply::bad_sequence(Sequence::NeedHello);
        }
        if self.tx.is_some() {
            return Reply::bad_sequence(Sequence::NestedMail);
        }
        let server = &self.config.server;
        if server.require_auth && self.user.is_none() {
            return refused(Reply::auth_required());
        }
        let sender = from.address.as_str();
        if !sender.is_empty() && !valid_address(sender) {
            return Reply::bad_parameters(Syntax::InvalidSender);
        }
        if from.flags & smtp_proto::MAIL_BODY_BINARYMIME != 0 {
            return Reply::bad_parameters(Syntax::BinaryMime);
        }
        // SPEC §4a: a legacy sender takes its entry's sender before anything else reads it.
        let rewrite = crate::rewrite::apply(
            &self.config.rewrites,
            sender,
            Some(self.peer.ip()),
            self.user.as_deref(),
        );
        let sender = rewrite.as_ref().map_or(sender, |r| r.sender.as_str());
        if let Some(user) = &self.user
            && let Err(refusal) = routing::authorize_user(&self.config, user, sender)
        {
            return refused(refusal.into());
        }
        if from.size as u64 > server.max_message_size {
            return refused(Reply::too_big(server.max_message_size));
        }
        match routing::route_sender(&self.config, sender) {
            Err(refusal) => {
                let refusal = Reply::from(refusal);
                let rewritten_from = rewrite
                    .as_ref()
                    .map(|r| crate::text::escape_controls(&r.original).into_owned());
                info!(peer = %self.peer, sender, rewritten_from, reply = %refusal, "sender refused");
                refused(refusal)
            }
            Ok(decision) => {
                debug!(sender, channel = %self.config.channels[decision.channel].name, reason = %decision.reason, "sender routed");
                if let Some(r) = &rewrite {
                    let original = crate::text::escape_controls(&r.original);
                    let line = self.config.rewrites.get(r.entry).and_then(|e| e.line);
                    info!(peer = %self.peer, %original, sender, header_from = r.header_from.name(), entry_line = line, "sender rewritten");
                    metrics::rewrite(sender);
                }
                self.tx = Some(Transaction {
                    envelope: Envelope {
                        sender: sender.to_string(),
                        recipients: Vec::new(),
                        smtputf8: from.flags & smtp_proto::MAIL_SMTPUTF8 != 0,
                        eightbit: from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0,
                    },
                    channel: decision.channel,
                    bdat: None,
                    rewrite,
                });
                Reply::sender_ok()
            }
        }
    }

    /// RCPT TO: adds a recipient within the limit.
    pub(super) fn rcpt(&mut self, to: RcptTo<String>) -> Reply {
        let limit = self.recipient_limit();
        let recipient = recipient(to.address, &self.config.server.hostname);
        let Some(tx) = self.tx.as_mut() else {
            return Reply::bad_sequence(Sequence::NeedMail(Verb::Rcpt));
        };
        if tx.bdat.is_some() {
            return Reply::bad_sequence(Sequence::RcptAfterBdat);
        }
        let Some(recipient) = recipient else {
            return Reply::bad_parameters(Syntax::InvalidRecipient);
        };
        if tx.envelope.recipients.len() >= limit {
            return Reply::too_many_recipients(limit);
        }
        // Said now rather than after DATA: the Graph copy would refuse it anyway.
        if address::has_quoted_local(&recipient)
            && let Some(graph) = self.config.graph_on_path(tx.channel)
        {
            return Reply::quoted_recipient_for_graph(
                &recipient,
                &self.config.channels[graph].name,
            );
        }
        tx.envelope.recipients.push(recipient);
        Reply::recipient_ok()
    }

    /// `max_recipients`, in relay mode also the channel's own limits, and in both modes
    /// those of a graph channel on the way (its fallback included). A message that goes
    /// out whole (relay mode; Graph, which never splits one) must fit one transaction and
    /// a day's `recipients_per_day`, or it could never go; a `452` here lets the client
    /// send the rest in another transaction.
    fn recipient_limit(&self) -> usize {
        let server = self.config.server.max_recipients;
        let Some(tx) = &self.tx else {
            return server;
        };
        let own = match self.config.server.delivery {
            DeliveryMode::Relay => self.config.channels[tx.channel]
                .limits
                .whole_message_recipients(),
            DeliveryMode::Queue => None,
        };
        let graph = self.config.graph_recipient_cap(tx.channel).map(|g| g.0);
        [own, graph].into_iter().flatten().fold(server, usize::min)
    }
}

/// A message refused at MAIL FROM, before any channel is chosen: counted with
/// `channel=""`. (Syntax and sequence errors are no message and are not counted.)
fn refused(reply: Reply) -> Reply {
    metrics::message("", Outcome::Refused);
    reply
}

/// The recipient to keep for `RCPT TO:<address>`, or `None` if it is no mailbox.
///
/// `<Postmaster>` without a domain must be accepted (RFC 5321 §4.5.1). It is a recipient
/// like any other on the sender's channel; as lettre (and most upstreams) want a domain,
/// it becomes `Postmaster@<hostname>`, the local part kept as written.
fn recipient(address: String, hostname: &str) -> Option<String> {
    if address.eq_ignore_ascii_case("postmaster") {
        Some(format!("{address}@{hostname}"))
    } else {
        valid_address(&address).then_some(address)
    }
}

/// A mailbox `local@domain` with both parts present, no control characters, and no
/// blanks but inside a quoted local part (which [`address::canonical_mailbox`] checked).
fn valid_address(address: &str) -> bool {
    // The domain holds no `@`, a quoted local part may.
    let Some((local, domain)) = address.rsplit_once('@') else {
        return false;
    };
    let quoted = address::has_quoted_local(local) && local.len() >= 2 && local.ends_with('"');
    !local.is_empty()
        && !domain.is_empty()
        && !address.chars().any(char::is_control)
        && (quoted || !local.chars().any(char::is_whitespace))
        && !domain.chars().any(char::is_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_validity() {
        assert!(valid_address("a@b"));
        assert!(valid_address("jörg@exämple.org"));
        assert!(valid_address("\"a b\"@c"));
        for bad in [
            "",
            "a",
            "@b",
            "a@",
            "a b@c",
            "a@b\tc",
            "\"a b@c",
            "\"a\"@b c",
        ] {
            assert!(!valid_address(bad), "{bad:?}");
        }
    }

    #[test]
    fn postmaster_gets_the_hostname() {
        let r = |a: &str| recipient(a.to_string(), "mx.test");
        assert_eq!(r("Postmaster").as_deref(), Some("Postmaster@mx.test"));
        assert_eq!(r("postMASTER").as_deref(), Some("postMASTER@mx.test"));
        assert_eq!(r("bob@example.org").as_deref(), Some("bob@example.org"));
        assert_eq!(
            r("postmaster@example.org").as_deref(),
            Some("postmaster@example.org")
        );
        for bad in ["webmaster", "postmaster ", "post master", ""] {
            assert_eq!(r(bad), None, "{bad:?}");
        }
        // What the upstream code parses the envelope with takes it.
        let kept = r("Postmaster").unwrap();
        assert!(kept.parse::<lettre::Address>().is_ok());
        assert!("Postmaster".parse::<lettre::Address>().is_err());
    }
}
