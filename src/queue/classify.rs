//! Pure: what an upstream reply or error means for a queued message and its channel
//! (SPEC §7 table), and the retry backoff.

use std::time::Duration;

use crate::reply::Reply;
use crate::upstream::{Class, Error, Step, classify};

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
    /// The channel refused the sender itself: the message fails, and no DSN goes back
    /// through that channel.
    SenderDenied,
}

impl From<Class> for Verdict {
    fn from(class: Class) -> Self {
        match class {
            Class::Transient => Verdict::Defer,
            Class::Quota => Verdict::Hold,
            Class::CredentialsBroken => Verdict::Broken,
            Class::SenderDenied => Verdict::SenderDenied,
            Class::Permanent => Verdict::Fail,
        }
    }
}

/// Classifies the upstream's reply to a recipient's `RCPT`.
pub fn classify_refusal(reply: &Reply) -> Verdict {
    classify(Step::Rcpt, reply).into()
}

/// Classifies a failed transaction.
pub fn classify_error(error: &Error) -> Verdict {
    error.class().into()
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

    #[test]
    fn rcpt_refusals_concern_the_recipient_only() {
        let r = |code, e, text: &str| Reply::new(code, e, text);
        assert_eq!(
            classify_refusal(&r(550, (5, 1, 1), "no such user")),
            Verdict::Fail
        );
        assert_eq!(classify_refusal(&r(450, (4, 2, 1), "busy")), Verdict::Defer);
    }

    #[test]
    fn errors_map_to_verdicts() {
        let rejected = |step, code, e, text: &str| Error::Rejected {
            step,
            reply: Reply::new(code, e, text),
        };
        let table = [
            (Error::Timeout { step: Step::Mail }, Verdict::Defer),
            (Error::local("disk full"), Verdict::Defer),
            (rejected(Step::Auth, 535, (5, 7, 3), "no"), Verdict::Broken),
            (
                rejected(Step::Auth, 454, (4, 7, 0), "later"),
                Verdict::Defer,
            ),
            (
                rejected(Step::Mail, 451, (4, 3, 0), "later"),
                Verdict::Defer,
            ),
            (
                rejected(Step::Mail, 550, (5, 7, 1), "relay denied"),
                Verdict::Fail,
            ),
            (
                rejected(Step::EndOfData, 550, (5, 4, 5), "quota"),
                Verdict::Hold,
            ),
            (
                rejected(Step::EndOfData, 554, (5, 2, 0), "SendAsDeniedException"),
                Verdict::SenderDenied,
            ),
        ];
        for (error, want) in table {
            assert_eq!(classify_error(&error), want, "{error}");
        }
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
