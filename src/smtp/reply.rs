//! Every reply mailgate gives a client about the conversation itself, from one
//! catalogue (SPEC §5). The type and the delivery replies live in [`crate::reply`].
//!
//! Internal error text never reaches the client: a refusal is one of these
//! constructors, and the detail goes to the log. Call sites name what went wrong
//! ([`Sequence`], [`Syntax`], a routing [`Refusal`]); the words are chosen here.

use std::fmt;

use crate::message::address_headers::Ambiguity;
pub use crate::reply::Reply;
use crate::routing::{HeaderProblem, Refusal};

/// What a `503 5.5.1 Bad sequence of commands` is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sequence {
    /// MAIL before HELO/EHLO.
    NeedHello,
    /// MAIL inside a transaction.
    NestedMail,
    /// RCPT, DATA or BDAT without MAIL.
    NeedMail(Verb),
    /// DATA or BDAT without an accepted RCPT.
    NeedRcpt(Verb),
    /// RCPT once BDAT chunks have started.
    RcptAfterBdat,
    /// DATA once BDAT chunks have started.
    DataAfterBdat,
    /// AUTH without `[[users]]`.
    AuthNotEnabled,
    /// AUTH before EHLO.
    NeedEhlo,
    /// AUTH a second time.
    AlreadyAuthenticated,
    /// AUTH inside a transaction.
    AuthInTransaction,
    /// STARTTLS inside a transaction.
    StartTlsInTransaction,
}

/// A command that needs an earlier one (named in a [`Sequence`] reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// `RCPT`.
    Rcpt,
    /// `DATA`.
    Data,
    /// `BDAT`.
    Bdat,
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verb::Rcpt => "RCPT",
            Verb::Data => "DATA",
            Verb::Bdat => "BDAT",
        })
    }
}

impl fmt::Display for Sequence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sequence::NeedHello => f.write_str("send HELO or EHLO first"),
            Sequence::NestedMail => f.write_str("nested MAIL command"),
            Sequence::NeedMail(verb) => write!(f, "need MAIL before {verb}"),
            Sequence::NeedRcpt(verb) => write!(f, "need RCPT before {verb}"),
            Sequence::RcptAfterBdat => f.write_str("RCPT after BDAT"),
            Sequence::DataAfterBdat => f.write_str("DATA may not follow BDAT"),
            Sequence::AuthNotEnabled => f.write_str("authentication not enabled"),
            Sequence::NeedEhlo => f.write_str("send EHLO first"),
            Sequence::AlreadyAuthenticated => f.write_str("already authenticated"),
            Sequence::AuthInTransaction => {
                f.write_str("AUTH not allowed during a mail transaction")
            }
            Sequence::StartTlsInTransaction => {
                f.write_str("STARTTLS not allowed during a mail transaction")
            }
        }
    }
}

/// What a `501 5.5.4 Syntax error in parameters` is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Syntax {
    /// The MAIL FROM address.
    InvalidSender,
    /// The RCPT TO address.
    InvalidRecipient,
    /// The command's syntax, as smtp-proto words it.
    Use(&'static str),
    /// A parameter's value (smtp-proto's name for it).
    InvalidParameter(&'static str),
    /// A parameter mailgate does not know, as the client wrote it.
    UnsupportedParameter(String),
    /// The line ended early.
    Incomplete,
    /// `BODY=BINARYMIME` (we do not offer BINARYMIME).
    BinaryMime,
    /// An AUTH answer that is not base64.
    AuthBase64,
    /// An AUTH answer that does not decode to UTF-8.
    AuthNotUtf8,
    /// An AUTH PLAIN answer without its three parts.
    AuthPlainMalformed,
}

impl fmt::Display for Syntax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Syntax::InvalidSender => f.write_str("invalid sender address"),
            Syntax::InvalidRecipient => f.write_str("invalid recipient address"),
            Syntax::Use(syntax) => write!(f, "use {syntax}"),
            Syntax::InvalidParameter(param) => write!(f, "invalid {param} parameter"),
            Syntax::UnsupportedParameter(param) => {
                write!(f, "unsupported parameter {}", printable(param))
            }
            Syntax::Incomplete => f.write_str("incomplete command"),
            Syntax::BinaryMime => f.write_str("BODY=BINARYMIME is not supported"),
            Syntax::AuthBase64 => f.write_str("invalid base64 in AUTH response"),
            Syntax::AuthNotUtf8 => f.write_str("AUTH response is not UTF-8"),
            Syntax::AuthPlainMalformed => f.write_str("malformed AUTH PLAIN response"),
        }
    }
}

/// Text from the client, safe to echo in a reply (one line, printable ASCII, short).
fn printable(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect()
}

/// What an EHLO reply offers besides the extensions mailgate always has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    /// `SIZE`: `max_message_size`.
    pub max_size: u64,
    /// `STARTTLS`: a certificate is configured and the connection is not TLS yet.
    pub starttls: bool,
    /// `AUTH PLAIN LOGIN`: there are users, and the connection is TLS or loopback.
    pub auth: bool,
}

/// The `250` answer to EHLO (`offer` given) or HELO, on the wire. Its lines are the
/// only multi-line reply mailgate gives, so it is built here as text, not as a [`Reply`].
pub fn hello(hostname: &str, offer: Option<Offer>) -> String {
    let Some(offer) = offer else {
        return Reply::plain(250, hostname).to_wire();
    };
    let mut lines = vec![
        hostname.to_string(),
        "PIPELINING".to_string(),
        format!("SIZE {}", offer.max_size),
        "8BITMIME".to_string(),
        "SMTPUTF8".to_string(),
        "ENHANCEDSTATUSCODES".to_string(),
        "CHUNKING".to_string(),
    ];
    if offer.starttls {
        lines.push("STARTTLS".to_string());
    }
    if offer.auth {
        lines.push("AUTH PLAIN LOGIN".to_string());
    }
    let last = lines.len() - 1;
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| format!("250{}{line}\r\n", if i == last { ' ' } else { '-' }))
        .collect()
}

impl From<Refusal> for Reply {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::SenderNotAuthorized { sender } => Reply::sender_not_authorized(&sender),
            Refusal::SenderNotOwned { user, sender } => Reply::sender_not_owned(&user, &sender),
            Refusal::BulkNotAllowed { channel } => Reply::bulk_not_allowed(&channel),
            Refusal::HeaderFromNotAllowed(problem) => Reply::header_from_not_allowed(&problem),
            Refusal::AmbiguousHeaders(ambiguity) => Reply::ambiguous_headers(&ambiguity),
            Refusal::HeaderRecipientNotInEnvelope {
                field,
                address,
                channel,
            } => Reply::header_recipient_not_in_envelope(field, &address, &channel),
            Refusal::HeaderRecipientUnwritable { address, channel } => {
                Reply::header_recipient_unwritable(&address, &channel)
            }
            Refusal::QuotedRecipientForGraph { address, channel } => {
                Reply::quoted_recipient_for_graph(&address, &channel)
            }
        }
    }
}

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
    /// `553 5.1.7` / `553 5.1.3` a quoted local part with `<` or `>`: legal, but an
    /// upstream reading the path naively would end it early, so it is not relayed.
    pub fn local_part_not_relayed(sender: bool) -> Self {
        let (detail, whose) = if sender {
            (7, "sender")
        } else {
            (3, "recipient")
        };
        Reply::new(
            553,
            (5, 1, detail),
            format!("{whose} address with < or > in its local part is not relayed"),
        )
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
    pub fn bad_parameters(what: Syntax) -> Self {
        Reply::new(
            501,
            (5, 5, 4),
            format!("Syntax error in parameters: {what}"),
        )
    }
    /// `503 5.5.1` bad sequence of commands.
    pub fn bad_sequence(what: Sequence) -> Self {
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
    pub fn header_from_not_allowed(problem: &HeaderProblem) -> Self {
        let text = match problem {
            HeaderProblem::NoFrom => "message has no From: header".to_string(),
            HeaderProblem::NoAddress { field } => {
                format!("{}: header has no valid address", field.name())
            }
            HeaderProblem::NotAllowed {
                field,
                address,
                channel,
            } => format!(
                "{}: address <{address}> is not allowed on channel {channel}",
                field.name()
            ),
            HeaderProblem::NotOwned {
                field,
                address,
                user,
            } => format!(
                "{}: address <{address}> may not be used by user {user}",
                field.name()
            ),
        };
        Reply::new(550, (5, 7, 1), text)
    }
    /// `550 5.7.1` readers may disagree on the message's address headers (SPEC §4).
    pub fn ambiguous_headers(ambiguity: &Ambiguity) -> Self {
        // Client text, cut short so that the reply stays one short line.
        let quote = |text: &str| {
            let mut cut: String = text.chars().take(100).collect();
            if cut.len() < text.len() {
                cut.push('…');
            }
            crate::text::escape_controls(&cut).into_owned()
        };
        let text = match ambiguity {
            Ambiguity::Line { line, problem } => format!(
                "header line {line} is neither a header field nor a continuation line ({})",
                problem.describe()
            ),
            Ambiguity::DisplayName { field, address } => format!(
                "{field}: display name holds another address ({})",
                quote(address)
            ),
            Ambiguity::GroupName { field, address } => {
                format!("{field}: group name holds an address ({})", quote(address))
            }
            Ambiguity::Unreadable { field, why } => {
                format!("{field}: header can be read more than one way ({why})")
            }
            Ambiguity::Unseen { field, address } => format!(
                "{field}: mail readers disagree on address <{}>",
                quote(address)
            ),
        };
        Reply::new(550, (5, 7, 1), text)
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
    /// `552 5.3.4` the header section is over `max_header_size` (refused, never cut).
    pub fn header_too_big(max: u64) -> Self {
        Reply::new(
            552,
            (5, 3, 4),
            format!("Message header section exceeds {max} bytes"),
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
    /// `421 4.7.0` this client address has `max_connections_per_client` open already.
    pub fn too_many_from_client() -> Self {
        Reply::new(
            421,
            (4, 7, 0),
            "Too many connections from your address, try again later",
        )
    }
    /// `454 4.7.0` AUTH locked out for this address after too many failures.
    pub fn auth_locked_out() -> Self {
        Reply::new(
            454,
            (4, 7, 0),
            "Too many failed logins from your address, try again later",
        )
    }
    /// `421 4.4.2` a message arrives slower than the minimum data rate.
    pub fn too_slow() -> Self {
        Reply::new(421, (4, 4, 2), "Message data too slow, closing connection")
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
            (Reply::bad_parameters(Syntax::Incomplete), "501 5.5.4"),
            (Reply::bad_sequence(Sequence::NestedMail), "503 5.5.1"),
            (Reply::too_many_errors(), "421 4.7.0"),
            (
                Reply::header_from_not_allowed(&HeaderProblem::NoFrom),
                "550 5.7.1",
            ),
            (Reply::bare_lf(), "550 5.6.11"),
            (Reply::header_too_big(10), "552 5.3.4"),
            (Reply::queued("abc"), "250 2.0.0"),
            (Reply::upstream_unreachable("c"), "451 4.4.1"),
            (Reply::upstream_tls_failed("c"), "454 4.7.0"),
            (Reply::upstream_auth_failed("c"), "454 4.7.0"),
            (Reply::channel_limited("c"), "451 4.7.0"),
            (Reply::never_fits_graph(3, 2, "c"), "550 5.5.3"),
            (Reply::idle_timeout(), "421 4.4.2"),
            (Reply::cannot_vrfy(), "252 2.5.0"),
            (Reply::network_not_allowed(), "554 5.7.1"),
            (Reply::too_many_from_client(), "421 4.7.0"),
            (Reply::auth_locked_out(), "454 4.7.0"),
            (Reply::too_slow(), "421 4.4.2"),
        ];
        for (reply, want) in table {
            assert!(
                reply.to_wire().starts_with(want),
                "{reply} should start with {want}"
            );
        }
    }

    #[test]
    fn named_refusals_keep_their_wire_text() {
        use crate::message::address_headers::LineProblem;
        use crate::routing::HeaderField;
        // Client text is cut at 100 characters and its controls escaped.
        let long_address = format!(
            "550 5.7.1 To: group name holds an address (eve\\x0d\\x0a250 ok{}…)",
            "x".repeat(89)
        );
        let table: Vec<(Reply, &str)> = vec![
            (
                Reply::bad_sequence(Sequence::NeedHello),
                "503 5.5.1 Bad sequence of commands: send HELO or EHLO first",
            ),
            (
                Reply::bad_sequence(Sequence::NestedMail),
                "503 5.5.1 Bad sequence of commands: nested MAIL command",
            ),
            (
                Reply::bad_sequence(Sequence::NeedMail(Verb::Rcpt)),
                "503 5.5.1 Bad sequence of commands: need MAIL before RCPT",
            ),
            (
                Reply::bad_sequence(Sequence::NeedMail(Verb::Data)),
                "503 5.5.1 Bad sequence of commands: need MAIL before DATA",
            ),
            (
                Reply::bad_sequence(Sequence::NeedRcpt(Verb::Bdat)),
                "503 5.5.1 Bad sequence of commands: need RCPT before BDAT",
            ),
            (
                Reply::bad_sequence(Sequence::RcptAfterBdat),
                "503 5.5.1 Bad sequence of commands: RCPT after BDAT",
            ),
            (
                Reply::bad_sequence(Sequence::DataAfterBdat),
                "503 5.5.1 Bad sequence of commands: DATA may not follow BDAT",
            ),
            (
                Reply::bad_sequence(Sequence::AuthNotEnabled),
                "503 5.5.1 Bad sequence of commands: authentication not enabled",
            ),
            (
                Reply::bad_sequence(Sequence::NeedEhlo),
                "503 5.5.1 Bad sequence of commands: send EHLO first",
            ),
            (
                Reply::bad_sequence(Sequence::AlreadyAuthenticated),
                "503 5.5.1 Bad sequence of commands: already authenticated",
            ),
            (
                Reply::bad_sequence(Sequence::AuthInTransaction),
                "503 5.5.1 Bad sequence of commands: AUTH not allowed during a mail transaction",
            ),
            (
                Reply::bad_sequence(Sequence::StartTlsInTransaction),
                "503 5.5.1 Bad sequence of commands: STARTTLS not allowed during a mail transaction",
            ),
            (
                Reply::local_part_not_relayed(true),
                "553 5.1.7 sender address with < or > in its local part is not relayed",
            ),
            (
                Reply::local_part_not_relayed(false),
                "553 5.1.3 recipient address with < or > in its local part is not relayed",
            ),
            (
                Refusal::QuotedRecipientForGraph {
                    address: "\"john doe\"@x.org".into(),
                    channel: "dave".into(),
                }
                .into(),
                "553 5.1.3 recipient <\"john doe\"@x.org> has a quoted local part; channel dave (Microsoft Graph) cannot send to it",
            ),
            (
                Reply::bad_parameters(Syntax::InvalidSender),
                "501 5.5.4 Syntax error in parameters: invalid sender address",
            ),
            (
                Reply::bad_parameters(Syntax::InvalidRecipient),
                "501 5.5.4 Syntax error in parameters: invalid recipient address",
            ),
            (
                Reply::bad_parameters(Syntax::Use("MAIL FROM:<address>")),
                "501 5.5.4 Syntax error in parameters: use MAIL FROM:<address>",
            ),
            (
                Reply::bad_parameters(Syntax::InvalidParameter("SIZE")),
                "501 5.5.4 Syntax error in parameters: invalid SIZE parameter",
            ),
            (
                Reply::bad_parameters(Syntax::UnsupportedParameter("X=\r\n\u{7f}é1".into())),
                "501 5.5.4 Syntax error in parameters: unsupported parameter X=1",
            ),
            (
                Reply::bad_parameters(Syntax::Incomplete),
                "501 5.5.4 Syntax error in parameters: incomplete command",
            ),
            (
                Reply::bad_parameters(Syntax::BinaryMime),
                "501 5.5.4 Syntax error in parameters: BODY=BINARYMIME is not supported",
            ),
            (
                Reply::bad_parameters(Syntax::AuthBase64),
                "501 5.5.4 Syntax error in parameters: invalid base64 in AUTH response",
            ),
            (
                Reply::bad_parameters(Syntax::AuthNotUtf8),
                "501 5.5.4 Syntax error in parameters: AUTH response is not UTF-8",
            ),
            (
                Reply::bad_parameters(Syntax::AuthPlainMalformed),
                "501 5.5.4 Syntax error in parameters: malformed AUTH PLAIN response",
            ),
            (
                Refusal::SenderNotAuthorized {
                    sender: "a@b.c".into(),
                }
                .into(),
                "550 5.7.1 Sender <a@b.c> is not authorized on any channel",
            ),
            (
                Refusal::SenderNotOwned {
                    user: "app".into(),
                    sender: "a@b.c".into(),
                }
                .into(),
                "550 5.7.1 User app may not send as <a@b.c>",
            ),
            (
                Refusal::BulkNotAllowed {
                    channel: "alice".into(),
                }
                .into(),
                "550 5.7.1 Bulk mail may not go over mailbox channel alice and no bulk channel takes this sender",
            ),
            (
                Refusal::HeaderRecipientNotInEnvelope {
                    field: "Cc",
                    address: "carol@x.org".into(),
                    channel: "dave".into(),
                }
                .into(),
                "550 5.7.1 Cc: address <carol@x.org> is not a recipient of this message (RCPT TO); channel dave would send to it",
            ),
            (
                Refusal::HeaderRecipientUnwritable {
                    address: "carol@x.org".into(),
                    channel: "dave".into(),
                }
                .into(),
                "554 5.6.0 recipient <carol@x.org> cannot be added to this message's Bcc: header; channel dave would not send to it",
            ),
            (
                Refusal::HeaderRecipientNotInEnvelope {
                    field: "To",
                    address: "eve\r\n250 ok".into(),
                    channel: "dave".into(),
                }
                .into(),
                "550 5.7.1 To: address <eve\\x0d\\x0a250 ok> is not a recipient of this message (RCPT TO); channel dave would send to it",
            ),
            (
                Refusal::HeaderFromNotAllowed(HeaderProblem::NoFrom).into(),
                "550 5.7.1 message has no From: header",
            ),
            (
                Refusal::HeaderFromNotAllowed(HeaderProblem::NoAddress {
                    field: HeaderField::Sender,
                })
                .into(),
                "550 5.7.1 Sender: header has no valid address",
            ),
            (
                Refusal::HeaderFromNotAllowed(HeaderProblem::NotAllowed {
                    field: HeaderField::From,
                    address: "m@evil.net".into(),
                    channel: "alice".into(),
                })
                .into(),
                "550 5.7.1 From: address <m@evil.net> is not allowed on channel alice",
            ),
            (
                Refusal::HeaderFromNotAllowed(HeaderProblem::NotOwned {
                    field: HeaderField::Sender,
                    address: "ceo@example.com".into(),
                    user: "billing-app".into(),
                })
                .into(),
                "550 5.7.1 Sender: address <ceo@example.com> may not be used by user billing-app",
            ),
            (
                Refusal::AmbiguousHeaders(Ambiguity::DisplayName {
                    field: "From",
                    address: "ceo@othercorp.com".into(),
                })
                .into(),
                "550 5.7.1 From: display name holds another address (ceo@othercorp.com)",
            ),
            (
                Refusal::AmbiguousHeaders(Ambiguity::GroupName {
                    field: "To",
                    address: format!("eve\r\n250 ok{}@evil.org", "x".repeat(200)),
                })
                .into(),
                &long_address,
            ),
            (
                Refusal::AmbiguousHeaders(Ambiguity::Line {
                    line: 2,
                    problem: LineProblem::NotAField,
                })
                .into(),
                "550 5.7.1 header line 2 is neither a header field nor a continuation line (no field name and colon)",
            ),
            (
                Refusal::AmbiguousHeaders(Ambiguity::Unreadable {
                    field: "Cc",
                    why: "unclosed quoted string",
                })
                .into(),
                "550 5.7.1 Cc: header can be read more than one way (unclosed quoted string)",
            ),
            (
                Refusal::AmbiguousHeaders(Ambiguity::Unseen {
                    field: "From",
                    address: "ceo@othercorp.com".into(),
                })
                .into(),
                "550 5.7.1 From: mail readers disagree on address <ceo@othercorp.com>",
            ),
            (
                Reply::header_too_big(1_048_576),
                "552 5.3.4 Message header section exceeds 1048576 bytes",
            ),
        ];
        for (reply, want) in table {
            assert_eq!(reply.to_wire(), format!("{want}\r\n"));
        }
    }

    #[test]
    fn hello_replies() {
        assert_eq!(hello("mx.test", None), "250 mx.test\r\n");
        let mut offer = Offer {
            max_size: 1000,
            starttls: false,
            auth: false,
        };
        let fixed = "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n\
                     250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n";
        assert_eq!(
            hello("mx.test", Some(offer)),
            format!("{fixed}250 CHUNKING\r\n")
        );
        offer.starttls = true;
        offer.auth = true;
        assert_eq!(
            hello("mx.test", Some(offer)),
            format!("{fixed}250-CHUNKING\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n")
        );
    }
}
