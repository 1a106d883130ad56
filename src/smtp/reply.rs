//! Every reply mailgate gives a client about the conversation itself, from one
//! catalogue (SPEC §5). The type and the delivery replies live in [`crate::reply`].
//!
//! Internal error text never reaches the client: a refusal is one of these
//! constructors, and the detail goes to the log.

pub use crate::reply::Reply;

impl Reply {
    /// `220 <hostname> ESMTP mailgate`.
    pub fn greeting(hostname: &str) -> Self {
        Reply::plain(220, format!("{hostname} ESMTP mailgate"))
    }
    /// `221 2.0.0` on QUIT.
    pub fn bye() -> Self {
        Reply::new(221, (2, 0, 0), "Bye")
    }
    /// `250 2.0.0 OK` (NOOP, RSET).
    pub fn ok() -> Self {
        Reply::new(250, (2, 0, 0), "OK")
    }
    /// `250 2.1.0` sender accepted.
    pub fn sender_ok() -> Self {
        Reply::new(250, (2, 1, 0), "Sender OK")
    }
    /// `250 2.1.5` recipient accepted.
    pub fn recipient_ok() -> Self {
        Reply::new(250, (2, 1, 5), "Recipient OK")
    }
    /// `354` go ahead with DATA.
    pub fn start_data() -> Self {
        Reply::plain(354, "Start mail input; end with <CRLF>.<CRLF>")
    }
    /// `250 2.0.0` BDAT chunk taken (not the last).
    pub fn chunk_ok(size: usize) -> Self {
        Reply::new(250, (2, 0, 0), format!("{size} octets received"))
    }
    /// `252 2.5.0` VRFY: mailgate does not verify addresses.
    pub fn cannot_vrfy() -> Self {
        Reply::new(
            252,
            (2, 5, 0),
            "Cannot VRFY user, but will accept message and attempt delivery",
        )
    }
    /// `220 2.0.0` go ahead with TLS.
    pub fn ready_for_tls() -> Self {
        Reply::new(220, (2, 0, 0), "Ready to start TLS")
    }
    /// `235 2.7.0` AUTH succeeded.
    pub fn auth_ok() -> Self {
        Reply::new(235, (2, 7, 0), "Authentication successful")
    }
    /// `334` AUTH challenge (base64 text).
    pub fn auth_challenge(b64: &str) -> Self {
        Reply::plain(334, b64)
    }
    /// `214 2.0.0` HELP.
    pub fn help() -> Self {
        Reply::new(
            214,
            (2, 0, 0),
            "See RFC 5321; mailgate routes by envelope sender",
        )
    }
    /// `502 5.5.1` a command mailgate knows but does not implement (EXPN, ETRN, …).
    pub fn not_implemented() -> Self {
        Reply::new(502, (5, 5, 1), "Command not implemented")
    }
    /// `550 5.7.1` the sender has no authorized channel.
    pub fn sender_not_authorized(sender: &str) -> Self {
        Reply::new(
            550,
            (5, 7, 1),
            format!("Sender <{sender}> is not authorized on any channel"),
        )
    }
    /// `530 5.7.0` `require_auth` and the client has not authenticated.
    pub fn auth_required() -> Self {
        Reply::new(530, (5, 7, 0), "Authentication required")
    }
    /// `550 5.7.1` the authenticated user may not use this sender.
    pub fn sender_not_owned(user: &str, sender: &str) -> Self {
        Reply::new(
            550,
            (5, 7, 1),
            format!("User {user} may not send as <{sender}>"),
        )
    }
    /// `500 5.5.2` unknown command or syntax error.
    pub fn unknown_command() -> Self {
        Reply::new(500, (5, 5, 2), "Syntax error, command unrecognized")
    }
    /// `500 5.5.2` command line over 1000 octets.
    pub fn line_too_long() -> Self {
        Reply::new(500, (5, 5, 2), "Line too long")
    }
    /// `501 5.5.4` bad parameters.
    pub fn bad_parameters(what: &str) -> Self {
        Reply::new(
            501,
            (5, 5, 4),
            format!("Syntax error in parameters: {what}"),
        )
    }
    /// `503 5.5.1` bad sequence of commands.
    pub fn bad_sequence(what: &str) -> Self {
        Reply::new(503, (5, 5, 1), format!("Bad sequence of commands: {what}"))
    }
    /// `504 5.5.4` unsupported AUTH mechanism.
    pub fn auth_mechanism_unsupported() -> Self {
        Reply::new(504, (5, 5, 4), "Unrecognized authentication mechanism")
    }
    /// `535 5.7.8` bad client credentials.
    pub fn auth_failed() -> Self {
        Reply::new(535, (5, 7, 8), "Authentication credentials invalid")
    }
    /// `538 5.7.11` AUTH needs TLS on a non-loopback connection.
    pub fn encryption_required() -> Self {
        Reply::new(
            538,
            (5, 7, 11),
            "Encryption required for requested authentication mechanism",
        )
    }
    /// `501 5.7.0` AUTH exchange cancelled by the client.
    pub fn auth_cancelled() -> Self {
        Reply::new(501, (5, 7, 0), "Authentication cancelled")
    }
    /// `454 4.7.0` TLS not available (no certificate configured, or already on).
    pub fn tls_unavailable() -> Self {
        Reply::new(454, (4, 7, 0), "TLS not available")
    }
    /// `421 4.7.0` too many errors in one session.
    pub fn too_many_errors() -> Self {
        Reply::new(421, (4, 7, 0), "Too many errors, closing connection")
    }
    /// `550 5.7.1` header `From:`/`Sender:` not allowed on the channel.
    pub fn header_from_not_allowed(detail: &str) -> Self {
        Reply::new(550, (5, 7, 1), detail.to_string())
    }
    /// `550 5.7.1` bulk mail would go over a mailbox channel.
    pub fn bulk_not_allowed(channel: &str) -> Self {
        Reply::new(
            550,
            (5, 7, 1),
            format!(
                "Bulk mail may not go over mailbox channel {channel} and no bulk channel takes this sender"
            ),
        )
    }
    /// `550 5.6.11` bare CR or LF in message data (`bare_lf = "reject"`).
    pub fn bare_lf() -> Self {
        Reply::new(
            550,
            (5, 6, 11),
            "Bare CR or LF in message data is not allowed; use CRLF",
        )
    }
    /// `421 4.4.2` idle too long.
    pub fn idle_timeout() -> Self {
        Reply::new(421, (4, 4, 2), "Idle timeout, closing connection")
    }
    /// `421 4.3.0` the server is shutting down.
    pub fn shutting_down() -> Self {
        Reply::new(421, (4, 3, 0), "Server shutting down, try again later")
    }
    /// `421 4.3.2` too many connections.
    pub fn too_many_connections() -> Self {
        Reply::new(421, (4, 3, 2), "Too many connections, try again later")
    }
    /// `554 5.7.1` greeting for a client outside `allow_networks`.
    pub fn network_not_allowed() -> Self {
        Reply::new(554, (5, 7, 1), "Access denied for your network")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_has_enhanced_code() {
        assert_eq!(
            Reply::auth_required().to_wire(),
            "530 5.7.0 Authentication required\r\n"
        );
        assert_eq!(
            Reply::greeting("mx.test").to_wire(),
            "220 mx.test ESMTP mailgate\r\n"
        );
    }

    #[test]
    fn catalogue_codes_match_spec() {
        let table: &[(Reply, &str)] = &[
            (Reply::sender_not_authorized("a@b"), "550 5.7.1"),
            (Reply::auth_required(), "530 5.7.0"),
            (Reply::sender_not_owned("u", "a@b"), "550 5.7.1"),
            (Reply::too_big(10), "552 5.3.4"),
            (Reply::too_many_recipients(5), "452 4.5.3"),
            (Reply::unknown_command(), "500 5.5.2"),
            (Reply::bad_parameters("x"), "501 5.5.4"),
            (Reply::bad_sequence("x"), "503 5.5.1"),
            (Reply::too_many_errors(), "421 4.7.0"),
            (Reply::header_from_not_allowed("x"), "550 5.7.1"),
            (Reply::bare_lf(), "550 5.6.11"),
            (Reply::queued("abc"), "250 2.0.0"),
            (Reply::upstream_unreachable("c"), "451 4.4.1"),
            (Reply::upstream_tls_failed("c"), "454 4.7.0"),
            (Reply::upstream_auth_failed("c"), "454 4.7.0"),
            (Reply::channel_limited("c"), "451 4.7.0"),
            (Reply::idle_timeout(), "421 4.4.2"),
            (Reply::cannot_vrfy(), "252 2.5.0"),
            (Reply::network_not_allowed(), "554 5.7.1"),
        ];
        for (reply, want) in table {
            assert!(
                reply.to_wire().starts_with(want),
                "{reply} should start with {want}"
            );
        }
    }
}
