//! Pure: builds an RFC 3464 delivery status notification (a "bounce") for the failed
//! recipients of a message.

use mail_builder::MessageBuilder;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::date::Date;
use mail_builder::headers::raw::Raw;
use mail_builder::mime::{BodyPart, MimePart};

use crate::reply::split_enhanced;

/// What a DSN reports.
#[derive(Debug, Clone)]
pub struct DsnInput<'a> {
    /// Our host name (Reporting-MTA, Message-ID).
    pub hostname: &'a str,
    /// Queue id of the failed message.
    pub original_id: &'a str,
    /// The failed message's envelope sender: the DSN's recipient.
    pub to: &'a str,
    /// The DSN's `From:` address.
    pub from: &'a str,
    /// When the failed message was accepted (unix ms).
    pub arrival_ms: u64,
    /// Now (unix ms).
    pub now_ms: u64,
    /// Failed recipients with the reply that failed them (`"550 5.1.1 text"`).
    pub failed: &'a [(String, String)],
    /// The failed message's header section.
    pub headers: &'a [u8],
    /// A random MIME boundary tag.
    pub boundary: &'a str,
}

/// The `Status:` for a failure reply: its enhanced code when it is a 5.x.x, else 5.0.0
/// for a 5xx reply and 5.4.7 (delivery time expired) for a temporary one given up on.
pub fn status_of(reply: &str) -> String {
    let (code, rest) = reply.split_once(' ').unwrap_or((reply, ""));
    match split_enhanced(rest).0 {
        Some((5, b, c)) => format!("5.{b}.{c}"),
        _ if code.starts_with('5') => "5.0.0".to_string(),
        _ => "5.4.7".to_string(),
    }
}

/// The whole DSN message, CRLF line endings. mail-builder writes the headers (folding,
/// RFC 2047 for non-ASCII, address quoting) and the MIME structure; the two report parts
/// are written verbatim (7bit or 8bit), because RFC 3464 readers parse them as header
/// fields and the original header section must come back byte for byte.
pub fn build(input: &DsnInput<'_>) -> Vec<u8> {
    let DsnInput {
        hostname,
        original_id,
        to,
        from,
        arrival_ms,
        now_ms,
        failed,
        headers,
        boundary,
    } = input;

    let mut text = format!(
        "mailgate at {hostname} could not deliver your message (queue id {original_id})\r\n\
         to the following recipients:\r\n\r\n"
    );
    for (rcpt, reply) in failed.iter() {
        text.push_str(&format!("  <{rcpt}>: {}\r\n", one_line(reply)));
    }
    text.push_str("\r\nThe headers of your message are attached.\r\n");

    let mut status = format!(
        "Reporting-MTA: dns; {hostname}\r\nX-Mailgate-Queue-ID: {original_id}\r\n\
         Arrival-Date: {}\r\n",
        rfc5322_date(*arrival_ms)
    );
    for (rcpt, reply) in failed.iter() {
        status.push_str(&format!(
            "\r\nFinal-Recipient: rfc822; {rcpt}\r\nAction: failed\r\nStatus: {}\r\n\
             Diagnostic-Code: smtp; {}\r\nLast-Attempt-Date: {}\r\n",
            status_of(reply),
            one_line(reply),
            rfc5322_date(*now_ms)
        ));
    }

    let mut original = headers.to_vec();
    if !original.ends_with(b"\n") {
        original.extend_from_slice(b"\r\n");
    }

    let report = MimePart::new(
        ContentType::new("multipart/report")
            .attribute("report-type", "delivery-status")
            .attribute("boundary", format!("=_mailgate_{boundary}")),
        BodyPart::Multipart(vec![
            MimePart::new("text/plain", text),
            verbatim("message/delivery-status", status.into_bytes()),
            verbatim("text/rfc822-headers", original),
        ]),
    );
    let message = MessageBuilder::new()
        .from(("Mail Delivery System", *from))
        .to(*to)
        .subject("Undelivered Mail Returned to Sender")
        .date(Date::new((*now_ms / 1000) as i64))
        .message_id(format!("{original_id}.dsn.{now_ms}@{hostname}"))
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .body(report);
    let mut out = Vec::new();
    message.serialize(&mut out);
    out
}

/// A leaf part whose body is written as it is, labelled 7bit or 8bit.
fn verbatim(content_type: &'static str, body: Vec<u8>) -> MimePart<'static> {
    let encoding = if body.is_ascii() { "7bit" } else { "8bit" };
    MimePart::new(
        ContentType::new(content_type),
        BodyPart::Binary(body.into()),
    )
    .transfer_encoding(encoding)
}

/// A reply as one header-safe line.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// `"Tue, 3 Nov 2026 14:05:09 +0000"` for a unix-ms time.
pub fn rfc5322_date(ms: u64) -> String {
    Date::new((ms / 1000) as i64).to_rfc822()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::MimeHeaders;

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_709_210_096_000),
            "Thu, 29 Feb 2024 12:34:56 +0000"
        );
        assert_eq!(
            rfc5322_date(1_798_761_599_000),
            "Thu, 31 Dec 2026 23:59:59 +0000"
        );
    }

    #[test]
    fn status_codes() {
        assert_eq!(status_of("550 5.1.1 User unknown"), "5.1.1");
        assert_eq!(status_of("554 Transaction failed"), "5.0.0");
        assert_eq!(
            status_of("451 4.4.1 Channel x: upstream unreachable"),
            "5.4.7"
        );
    }

    /// A report to alice for `failed`, one second after arrival.
    fn report(failed: &[(String, String)], headers: &[u8], boundary: &str) -> String {
        let dsn = build(&DsnInput {
            hostname: "mx.test",
            original_id: "abc",
            to: "alice@example.com",
            from: "MAILER-DAEMON@example.com",
            arrival_ms: 0,
            now_ms: 1000,
            failed,
            headers,
            boundary,
        });
        String::from_utf8(dsn).unwrap()
    }

    #[test]
    fn report_structure() {
        let failed = vec![(
            "bob@example.org".to_string(),
            "550 5.1.1 User\r\nunknown".to_string(),
        )];
        let text = report(&failed, b"Subject: hi\r\nFrom: alice@example.com\r\n", "42");
        let parsed = mail_parser::MessageParser::default()
            .parse(text.as_bytes())
            .unwrap();
        let ct = parsed.content_type().unwrap();
        assert_eq!((ct.ctype(), ct.subtype()), ("multipart", Some("report")));
        assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
        assert_eq!(ct.attribute("boundary"), Some("=_mailgate_42"));
        assert_eq!(parsed.parts.len(), 4, "the report and its three parts");
        assert!(text.starts_with("From: \"Mail Delivery System\" <MAILER-DAEMON@example.com>\r\n"));
        assert!(text.contains(
            "\r\nFinal-Recipient: rfc822; bob@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        ));
        assert!(text.contains("Diagnostic-Code: smtp; 550 5.1.1 User  unknown\r\n"));
        assert!(text.contains("Content-Type: text/rfc822-headers\r\nContent-Transfer-Encoding: 7bit\r\n\r\nSubject: hi\r\nFrom: alice@example.com\r\n\r\n--=_mailgate_42--\r\n"));
        assert!(text.lines().all(|l| !l.contains('\n')));
        assert!(
            !text.replace("\r\n", "").contains('\n'),
            "every line ends in CRLF"
        );
    }

    #[test]
    fn eight_bit_parts_are_labelled_and_kept_verbatim() {
        let failed = vec![(
            "bob@example.org".to_string(),
            "550 5.1.1 Benutzer unbekannt: Müller".to_string(),
        )];
        let headers = "Subject: Grüße\r\n".as_bytes();
        let text = report(&failed, headers, "7");
        assert!(text.contains(
            "Content-Type: message/delivery-status\r\nContent-Transfer-Encoding: 8bit\r\n"
        ));
        assert!(text.contains("Diagnostic-Code: smtp; 550 5.1.1 Benutzer unbekannt: Müller\r\n"));
        assert!(text.contains("Content-Transfer-Encoding: 8bit\r\n\r\nSubject: Grüße\r\n"));
        // The plain-text part is re-encoded by the builder (quoted-printable), never raw 8-bit.
        let plain =
            &text[text.find("text/plain").unwrap()..text.find("message/delivery-status").unwrap()];
        assert!(plain.is_ascii(), "{plain}");
    }
}
