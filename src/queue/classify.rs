//! Pure: what an upstream reply or error means for a queued message and its channel
//! (SPEC §7 table), and the retry backoff.

use std::time::Duration;

use crate::reply::Reply;
use crate::upstream::UpstreamError;

/// What to do after an upstream answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted: done.
    Delivered,
    /// Busy, throttled, unreachable: try again later with backoff.
    Defer,
    /// The provider's quota is reached: hold the whole channel until its window rolls over.
    Hold,
    /// The channel's credentials are broken: stop the channel, keep its mail.
    Broken,
    /// Permanent failure of this message (or recipient) only.
    Fail,
}

/// Classifies an upstream reply.
pub fn classify_reply(reply: &Reply) -> Verdict {
    let text = reply.text.to_ascii_lowercase();
    let enhanced = reply.enhanced;
    let detail = |subject: u16, detail: u16| matches!(enhanced, Some((_, s, d)) if s == subject && d == detail);
    if reply.is_positive() {
        Verdict::Delivered
    } else if text.contains("submissionquotaexceeded") || (reply.code == 550 && detail(4, 5)) {
        Verdict::Hold
    } else if text.contains("sendasdenied") || detail(7, 60) {
        Verdict::Fail
    } else if reply.code == 535
        || (reply.is_permanent()
            && (detail(7, 3) || detail(7, 8) || detail(7, 139) || detail(7, 30)))
        || detail(7, 57)
    {
        Verdict::Broken
    } else if reply.is_transient() {
        Verdict::Defer
    } else if reply.is_permanent() {
        Verdict::Fail
    } else {
        // 1xx/3xx where a final answer was due: a protocol hiccup, try again.
        Verdict::Defer
    }
}

/// Classifies a failed transaction.
pub fn classify_error(error: &UpstreamError) -> Verdict {
    match error {
        UpstreamError::Connect(_)
        | UpstreamError::Tls(_)
        | UpstreamError::Timeout
        | UpstreamError::Local(_) => Verdict::Defer,
        // A temporary AUTH failure (454 4.7.0) is not a broken credential.
        UpstreamError::Auth(reply) if reply.is_transient() => Verdict::Defer,
        UpstreamError::Auth(_) => Verdict::Broken,
        UpstreamError::Refused(reply) => match classify_reply(reply) {
            Verdict::Delivered => Verdict::Defer,
            verdict => verdict,
        },
    }
}

/// Delay before the next try after `deferrals` temporary failures (1 = the first):
/// `first`, doubling, capped at `max`.
pub fn backoff(first: Duration, max: Duration, deferrals: u32) -> Duration {
    let shift = deferrals.saturating_sub(1).min(31);
    first.saturating_mul(1u32 << shift).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(code: u16, enhanced: Option<(u8, u16, u16)>, text: &str) -> Reply {
        Reply {
            code,
            enhanced,
            text: text.to_string(),
        }
    }

    #[test]
    fn spec_table() {
        use Verdict::*;
        let table = [
            (r(250, Some((2, 0, 0)), "OK queued"), Delivered),
            (r(421, Some((4, 3, 2)), "Service not available"), Defer),
            (
                r(
                    432,
                    Some((4, 3, 2)),
                    "STOREDRV.ClientSubmit; sender thread limit exceeded",
                ),
                Defer,
            ),
            (r(451, Some((4, 7, 0)), "Temporary server error"), Defer),
            (r(452, Some((4, 5, 3)), "Too many recipients"), Defer),
            (r(421, None, "too many connections"), Defer),
            (
                r(
                    554,
                    Some((5, 2, 0)),
                    "STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed",
                ),
                Hold,
            ),
            (
                r(550, Some((5, 4, 5)), "Daily user sending limit exceeded"),
                Hold,
            ),
            (
                r(535, Some((5, 7, 3)), "Authentication unsuccessful"),
                Broken,
            ),
            (
                r(535, Some((5, 7, 8)), "Username and Password not accepted"),
                Broken,
            ),
            (
                r(
                    535,
                    Some((5, 7, 139)),
                    "Authentication unsuccessful, SmtpClientAuthentication is disabled",
                ),
                Broken,
            ),
            (r(535, None, "auth failed"), Broken),
            (
                r(
                    550,
                    Some((5, 7, 30)),
                    "Basic authentication is not supported",
                ),
                Broken,
            ),
            (
                r(
                    530,
                    Some((5, 7, 57)),
                    "Client not authenticated to send mail",
                ),
                Broken,
            ),
            (
                r(
                    554,
                    Some((5, 2, 0)),
                    "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied",
                ),
                Fail,
            ),
            (
                r(
                    550,
                    Some((5, 7, 60)),
                    "Client does not have permissions to send as this sender",
                ),
                Fail,
            ),
            (r(550, Some((5, 1, 1)), "User unknown"), Fail),
            (r(552, Some((5, 3, 4)), "Message too big"), Fail),
            (r(554, None, "Transaction failed"), Fail),
        ];
        for (reply, want) in table {
            assert_eq!(classify_reply(&reply), want, "{reply}");
        }
    }

    #[test]
    fn errors() {
        use Verdict::*;
        assert_eq!(
            classify_error(&UpstreamError::Connect("refused".into())),
            Defer
        );
        assert_eq!(
            classify_error(&UpstreamError::Tls("bad cert".into())),
            Defer
        );
        assert_eq!(classify_error(&UpstreamError::Timeout), Defer);
        assert_eq!(
            classify_error(&UpstreamError::Local("disk full".into())),
            Defer
        );
        assert_eq!(
            classify_error(&UpstreamError::Auth(r(535, Some((5, 7, 3)), "no"))),
            Broken
        );
        assert_eq!(
            classify_error(&UpstreamError::Auth(r(454, Some((4, 7, 0)), "temporary"))),
            Defer
        );
        assert_eq!(
            classify_error(&UpstreamError::Refused(r(451, Some((4, 3, 0)), "later"))),
            Defer
        );
        assert_eq!(
            classify_error(&UpstreamError::Refused(r(
                550,
                Some((5, 7, 1)),
                "relay denied"
            ))),
            Fail
        );
        assert_eq!(
            classify_error(&UpstreamError::Refused(r(550, Some((5, 4, 5)), "quota"))),
            Hold
        );
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let s = Duration::from_secs;
        assert_eq!(backoff(s(60), s(3600), 1), s(60));
        assert_eq!(backoff(s(60), s(3600), 2), s(120));
        assert_eq!(backoff(s(60), s(3600), 3), s(240));
        assert_eq!(backoff(s(60), s(3600), 7), s(3600));
        assert_eq!(backoff(s(60), s(3600), 1000), s(3600));
        assert_eq!(backoff(s(1), s(3600), 0), s(1));
    }
}
