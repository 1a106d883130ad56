//! Pure routing (no I/O): envelope sender + parsed headers → channel, or a refusal.
//!
//! SPEC §4: the most specific scope wins (exact address > domain > `*@domain` > `*`);
//! bulk mail is diverted to `[routing] bulk_channel`; with `check_header_from`, every
//! `From:`/`Sender:` address must be one the chosen channel may send as.

use crate::config::{Channel, ChannelId, Config, User};
use crate::smtp::reply::Reply;

/// The routing-relevant headers of a message, parsed with mail-parser.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    /// `From:` addresses; `None` for an entry that has no parsable address.
    pub from: Vec<Option<String>>,
    /// `Sender:` addresses, likewise.
    pub sender: Vec<Option<String>>,
    /// The message has a `From:` header at all.
    pub has_from: bool,
    /// `Precedence:` value, lower-cased and trimmed.
    pub precedence: Option<String>,
}

/// Why a channel was chosen (for logs and `mailgate route`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The channel.
    pub channel: ChannelId,
    /// One line of explanation, e.g. "exact address alice@example.com".
    pub reason: String,
}

/// Parses the header section (bytes up to the first empty line; more is ignored).
pub fn parse_headers(raw: &[u8]) -> Headers {
    todo!()
}

/// The channel for an envelope sender (at `MAIL FROM`), or `550 5.7.1`.
pub fn route_sender(config: &Config, sender: &str) -> Result<Decision, Reply> {
    todo!()
}

/// The final channel for a whole message (after DATA): bulk diversion and header check.
pub fn route_message(config: &Config, sender: &str, recipients: usize, headers: &Headers) -> Result<Decision, Reply> {
    todo!()
}

/// Whether `channel` may carry mail whose sender (or header address) is `address`.
pub fn channel_allows(channel: &Channel, address: &str) -> bool {
    todo!()
}

/// Whether the authenticated `user` may use envelope sender `sender`.
pub fn user_allows(user: &User, sender: &str) -> bool {
    todo!()
}
