//! Pure: builds an RFC 3464 delivery status notification (a "bounce") for the failed
//! recipients of a message.

use crate::reply::split_enhanced;
use crate::state::civil_from_days;

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

/// The whole DSN message, CRLF line endings.
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
    let boundary = format!("=_mailgate_{boundary}");
    let mut out = String::new();
    let mut line = |s: &str| {
        out.push_str(s);
        out.push_str("\r\n");
    };
    line(&format!("From: Mail Delivery System <{from}>"));
    line(&format!("To: <{to}>"));
    line("Subject: Undelivered Mail Returned to Sender");
    line(&format!("Date: {}", rfc5322_date(*now_ms)));
    line(&format!(
        "Message-ID: <{original_id}.dsn.{now_ms}@{hostname}>"
    ));
    line("Auto-Submitted: auto-replied");
    line("MIME-Version: 1.0");
    line(&format!(
        "Content-Type: multipart/report; report-type=delivery-status; boundary=\"{boundary}\""
    ));
    line("");
    line("This is a MIME-encapsulated message.");
    line("");
    line(&format!("--{boundary}"));
    line("Content-Type: text/plain; charset=utf-8");
    line("Content-Transfer-Encoding: 8bit");
    line("");
    line(&format!(
        "mailgate at {hostname} could not deliver your message (queue id {original_id})"
    ));
    line("to the following recipients:");
    line("");
    for (rcpt, reply) in failed.iter() {
        line(&format!("  <{rcpt}>: {}", one_line(reply)));
    }
    line("");
    line("The headers of your message are attached.");
    line("");
    line(&format!("--{boundary}"));
    line("Content-Type: message/delivery-status");
    line("");
    line(&format!("Reporting-MTA: dns; {hostname}"));
    line(&format!("X-Mailgate-Queue-ID: {original_id}"));
    line(&format!("Arrival-Date: {}", rfc5322_date(*arrival_ms)));
    for (rcpt, reply) in failed.iter() {
        line("");
        line(&format!("Final-Recipient: rfc822; {rcpt}"));
        line("Action: failed");
        line(&format!("Status: {}", status_of(reply)));
        line(&format!("Diagnostic-Code: smtp; {}", one_line(reply)));
        line(&format!("Last-Attempt-Date: {}", rfc5322_date(*now_ms)));
    }
    line("");
    line(&format!("--{boundary}"));
    line("Content-Type: text/rfc822-headers");
    if headers.iter().any(|b| *b >= 0x80) {
        line("Content-Transfer-Encoding: 8bit");
    }
    line("");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(headers);
    if !headers.ends_with(b"\n") {
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    bytes
}

/// A reply as one header-safe line.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// `"Tue, 03 Nov 2026 14:05:09 +0000"` for a unix-ms time.
pub fn rfc5322_date(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let (y, m, d) = civil_from_days(days);
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let rem = secs % 86_400;
    format!(
        "{}, {d:02} {} {y} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        MONTHS[(m - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
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

    #[test]
    fn report_structure() {
        let failed = vec![(
            "bob@example.org".to_string(),
            "550 5.1.1 User\r\nunknown".to_string(),
        )];
        let dsn = build(&DsnInput {
            hostname: "mx.test",
            original_id: "abc",
            to: "alice@example.com",
            from: "MAILER-DAEMON@example.com",
            arrival_ms: 0,
            now_ms: 1000,
            failed: &failed,
            headers: b"Subject: hi\r\nFrom: alice@example.com\r\n",
            boundary: "42",
        });
        let text = String::from_utf8(dsn).unwrap();
        assert!(text.contains("Content-Type: multipart/report; report-type=delivery-status; boundary=\"=_mailgate_42\"\r\n"));
        assert!(text.contains(
            "\r\nFinal-Recipient: rfc822; bob@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        ));
        assert!(text.contains("Diagnostic-Code: smtp; 550 5.1.1 User  unknown\r\n"));
        assert!(text.contains("Content-Type: text/rfc822-headers\r\n\r\nSubject: hi\r\nFrom: alice@example.com\r\n\r\n--=_mailgate_42--\r\n"));
        assert!(text.lines().all(|l| !l.contains('\n')));
        assert!(
            !text.replace("\r\n", "").contains('\n'),
            "every line ends in CRLF"
        );
    }
}
