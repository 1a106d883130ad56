//! The SMTP reply type every layer may use, and the replies that delivery gives.
//!
//! `Reply` sits below the flow (like `config`): routing, delivery, the queue and the
//! upstream transports produce or carry replies without knowing about the client
//! session. The replies of the client conversation itself (greeting, syntax errors,
//! AUTH, …) are the catalogue in `smtp::reply`; the ones here are what a client hears
//! about its message's delivery (queued, relayed, limited, upstream trouble).

use std::fmt;

/// An SMTP reply: code, enhanced status code (RFC 3463) and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Three-digit reply code.
    pub code: u16,
    /// Enhanced status code `class.subject.detail`, when the reply has one.
    pub enhanced: Option<(u8, u16, u16)>,
    /// Human-readable text (one line; multi-line replies are built by the session).
    pub text: String,
}

impl Reply {
    /// A reply with an enhanced status code.
    pub fn new(code: u16, enhanced: (u8, u16, u16), text: impl Into<String>) -> Self {
        Reply {
            code,
            enhanced: Some(enhanced),
            text: text.into(),
        }
    }

    /// A reply without enhanced status code (greeting, EHLO lines).
    pub fn plain(code: u16, text: impl Into<String>) -> Self {
        Reply {
            code,
            enhanced: None,
            text: text.into(),
        }
    }

    /// 2xx.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// 4xx: the client should try again later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// 5xx.
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// The enhanced code as text, e.g. `"5.7.1"`.
    pub fn enhanced_text(&self) -> Option<String> {
        self.enhanced.map(|(a, b, c)| format!("{a}.{b}.{c}"))
    }

    /// The reply as it goes on the wire, CRLF-terminated.
    pub fn to_wire(&self) -> String {
        format!("{self}\r\n")
    }

    /// Appends [`Reply::to_wire`] to `out` without the formatting machinery, which cost a
    /// session more than parsing its commands (a reply per command).
    pub fn write_wire(&self, out: &mut Vec<u8>) {
        push_decimal(out, u64::from(self.code));
        out.push(b' ');
        if let Some((a, b, c)) = self.enhanced {
            push_decimal(out, u64::from(a));
            out.push(b'.');
            push_decimal(out, u64::from(b));
            out.push(b'.');
            push_decimal(out, u64::from(c));
            out.push(b' ');
        }
        out.extend_from_slice(self.text.as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    // ---- delivery replies (the client's answer about its message) ----------

    /// `250 2.0.0 queued as <id>`: the message is on disk (queue mode).
    pub fn queued(id: &str) -> Self {
        Reply::new(250, (2, 0, 0), format!("queued as {id}"))
    }
    /// `552 5.3.4` message (or announced SIZE) over the limit.
    pub fn too_big(max: u64) -> Self {
        Reply::new(
            552,
            (5, 3, 4),
            format!("Message size exceeds fixed maximum of {max} bytes"),
        )
    }
    /// `452 4.5.3` too many recipients.
    pub fn too_many_recipients(max: usize) -> Self {
        Reply::new(
            452,
            (4, 5, 3),
            format!("Too many recipients (at most {max} per message)"),
        )
    }
    /// `550 5.5.3`: a queued message with more recipients than its graph channel can
    /// ever send at once (its limits were lowered by a reload): Graph never splits a
    /// message, so it would wait for ever. The recipients' reply in the DSN.
    pub fn never_fits_graph(rcpts: usize, max: usize, channel: &str) -> Self {
        Reply::new(
            550,
            (5, 5, 3),
            format!(
                "Too many recipients for channel {channel}: Microsoft Graph sends a message to all its recipients at once, never split, and the channel takes at most {max} (max_recipients, recipients_per_day); this message has {rcpts}"
            ),
        )
    }
    /// `451 4.4.1` upstream unreachable (relay mode).
    pub fn upstream_unreachable(channel: &str) -> Self {
        Reply::new(
            451,
            (4, 4, 1),
            format!("Channel {channel}: upstream unreachable, try again later"),
        )
    }
    /// `454 4.7.0` upstream TLS failed (relay mode).
    pub fn upstream_tls_failed(channel: &str) -> Self {
        Reply::new(
            454,
            (4, 7, 0),
            format!("Channel {channel}: upstream TLS failed, try again later"),
        )
    }
    /// `454 4.7.0` upstream refused our credentials (relay mode).
    pub fn upstream_auth_failed(channel: &str) -> Self {
        Reply::new(
            454,
            (4, 7, 0),
            format!("Channel {channel}: upstream authentication failed, try again later"),
        )
    }
    /// `451 4.4.2` upstream stopped answering.
    pub fn upstream_timeout(channel: &str) -> Self {
        Reply::new(
            451,
            (4, 4, 2),
            format!("Channel {channel}: upstream timed out, try again later"),
        )
    }
    /// `451 4.7.0` channel rate or quota reached (relay mode).
    pub fn channel_limited(channel: &str) -> Self {
        Reply::new(
            451,
            (4, 7, 0),
            format!("Channel {channel}: rate or quota reached, try again later"),
        )
    }
    /// `451 4.7.0` the shared limits cannot be counted (Redis unreachable; relay mode):
    /// never sent past a limit, so the client tries again later.
    pub fn limits_unavailable(channel: &str) -> Self {
        Reply::new(
            451,
            (4, 7, 0),
            format!("Channel {channel}: limits cannot be checked right now, try again later"),
        )
    }
    /// `451 4.3.0` local failure (disk, internal error); detail goes to the log.
    pub fn local_error() -> Self {
        Reply::new(451, (4, 3, 0), "Local error in processing, try again later")
    }
    /// The upstream's own reply, passed on with text naming the channel. An upstream
    /// reply without an enhanced code gets its class's generic one (`X.0.0`), as Postfix
    /// does: we advertise ENHANCEDSTATUSCODES, so every reply must carry one (RFC 2034).
    pub fn from_upstream(
        code: u16,
        enhanced: Option<(u8, u16, u16)>,
        text: &str,
        channel: &str,
    ) -> Self {
        let class = u8::try_from(code / 100)
            .ok()
            .filter(|c| (2..=5).contains(c));
        Reply {
            code,
            enhanced: enhanced.or(class.map(|c| (c, 0, 0))),
            text: format!("Channel {channel}: upstream said: {text}"),
        }
    }
    /// `553 5.6.7` the message needs SMTPUTF8 and the channel's upstream lacks it.
    pub fn upstream_no_smtputf8(channel: &str) -> Self {
        Reply::new(
            553,
            (5, 6, 7),
            format!("Channel {channel}: upstream does not support SMTPUTF8"),
        )
    }
    /// `454 4.7.0` the upstream offers none of the AUTH mechanisms we can use.
    pub fn upstream_no_auth_mechanism(channel: &str) -> Self {
        Reply::new(
            454,
            (4, 7, 0),
            format!("Channel {channel}: upstream offers no usable AUTH mechanism"),
        )
    }
    /// `553 5.1.7` the sender address cannot be put in an upstream `MAIL FROM`.
    pub fn bad_sender_syntax(sender: &str) -> Self {
        Reply::new(
            553,
            (5, 1, 7),
            format!("Sender address <{sender}> has invalid syntax"),
        )
    }
    /// `553 5.1.3` a recipient address cannot be put in an upstream `RCPT TO`.
    pub fn bad_recipient_syntax(recipient: &str) -> Self {
        Reply::new(
            553,
            (5, 1, 3),
            format!("Recipient address <{recipient}> has invalid syntax"),
        )
    }
    /// `503 5.5.1` the upstream refused every recipient without saying why (no reply to pass on).
    pub fn no_valid_recipients() -> Self {
        Reply::new(
            503,
            (5, 5, 1),
            "Bad sequence of commands: no valid recipients",
        )
    }
    /// `550 5.7.1` a `To:`/`Cc:`/`Bcc:` address is no envelope recipient, and the message
    /// may go through Microsoft Graph, which sends to the header addresses (SPEC §5).
    /// The address comes from the client's headers: control characters are escaped.
    pub fn header_recipient_not_in_envelope(field: &str, address: &str, channel: &str) -> Self {
        let address = crate::text::escape_controls(address);
        Reply::new(
            550,
            (5, 7, 1),
            format!(
                "{field}: address <{address}> is not a recipient of this message (RCPT TO); channel {channel} would send to it"
            ),
        )
    }
    /// `554 5.6.0` an envelope recipient cannot be named in the `Bcc:` of the copy sent
    /// through Microsoft Graph (the message's own `Bcc:` field would swallow it).
    pub fn header_recipient_unwritable(address: &str, channel: &str) -> Self {
        let address = crate::text::escape_controls(address);
        Reply::new(
            554,
            (5, 6, 0),
            format!(
                "recipient <{address}> cannot be added to this message's Bcc: header; channel {channel} would not send to it"
            ),
        )
    }

    /// `553 5.1.3` an envelope recipient with a quoted local part, and the message may go
    /// through Microsoft Graph: Graph takes its recipients from the headers, and how
    /// Exchange reads a quoted local part there (one mailbox, or several) cannot be checked.
    pub fn quoted_recipient_for_graph(address: &str, channel: &str) -> Self {
        let address = crate::text::escape_controls(address);
        Reply::new(
            553,
            (5, 1, 3),
            format!(
                "recipient <{address}> has a quoted local part; channel {channel} (Microsoft Graph) cannot send to it"
            ),
        )
    }

    /// `552 5.3.4` a signed or encrypted message over Graph's `sendMail` size: the upload
    /// way rebuilds the MIME, which would break its signature or lose its encryption.
    pub fn signed_too_large_for_graph(channel: &str, content_type: &str, limit: u64) -> Self {
        Reply::new(
            552,
            (5, 3, 4),
            format!(
                "Channel {channel}: message too large for Microsoft Graph's sendMail (over {limit} bytes), and a signed or encrypted message ({content_type}) cannot go the upload way without being altered"
            ),
        )
    }

    /// `552 5.3.4` a message over Graph's `sendMail` size whose text body alone is too
    /// large for a Graph draft request.
    pub fn graph_body_too_large(channel: &str, limit: usize) -> Self {
        Reply::new(
            552,
            (5, 3, 4),
            format!(
                "Channel {channel}: the message's text body is larger than a Microsoft Graph draft takes ({limit} bytes)"
            ),
        )
    }

    /// `250 2.0.0` the `file` channel stored the message.
    pub fn stored_in_file(channel: &str, file: &str) -> Self {
        Reply::new(
            250,
            (2, 0, 0),
            format!("Channel {channel}: stored as {file}"),
        )
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.enhanced {
            Some((a, b, c)) => write!(f, "{} {a}.{b}.{c} {}", self.code, self.text),
            None => write!(f, "{} {}", self.code, self.text),
        }
    }
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

/// Splits `"5.7.1 Relaying denied"` into the enhanced code and the rest.
pub fn split_enhanced(text: &str) -> (Option<(u8, u16, u16)>, &str) {
    let text = text.trim_start();
    let (first, rest) = text.split_once(' ').unwrap_or((text, ""));
    let mut parts = first.split('.');
    let parsed = (|| {
        let a: u8 = parts.next()?.parse().ok()?;
        let b: u16 = parts.next()?.parse().ok()?;
        let c: u16 = parts.next()?.parse().ok()?;
        if parts.next().is_some() || !(2..=5).contains(&a) {
            return None;
        }
        Some((a, b, c))
    })();
    match parsed {
        Some(code) => (Some(code), rest.trim_start()),
        None => (None, text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_wire_is_to_wire() {
        for reply in [
            Reply::new(250, (2, 1, 0), "Ok"),
            Reply::new(451, (4, 4, 1), "upstream said: x"),
            Reply::plain(220, "mx ESMTP"),
            Reply::plain(0, ""),
            Reply::new(65535, (255, 65535, 0), "wide"),
            Reply::from_upstream(250, None, "2.0.0 queued as 1", "up"),
        ] {
            let mut out = b"before ".to_vec();
            reply.write_wire(&mut out);
            assert_eq!(out, format!("before {}", reply.to_wire()).into_bytes());
        }
    }

    #[test]
    fn upstream_replies_always_carry_an_enhanced_code() {
        let kept = Reply::from_upstream(550, Some((5, 1, 1)), "no such user", "up");
        assert_eq!(
            kept.to_wire(),
            "550 5.1.1 Channel up: upstream said: no such user\r\n"
        );
        for (code, want) in [
            (250, "250 2.0.0 "),
            (451, "451 4.0.0 "),
            (554, "554 5.0.0 "),
        ] {
            let reply = Reply::from_upstream(code, None, "text", "up");
            assert!(reply.to_wire().starts_with(want), "{reply}");
        }
    }

    #[test]
    fn split_enhanced_parses_and_rejects() {
        assert_eq!(
            split_enhanced("5.7.1 Relaying denied"),
            (Some((5, 7, 1)), "Relaying denied")
        );
        assert_eq!(split_enhanced("4.3.2"), (Some((4, 3, 2)), ""));
        assert_eq!(split_enhanced("OK queued"), (None, "OK queued"));
        assert_eq!(split_enhanced("1.2.3 no"), (None, "1.2.3 no"));
        assert_eq!(split_enhanced("5.7 x"), (None, "5.7 x"));
    }
}
