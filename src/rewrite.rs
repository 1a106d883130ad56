//! Pure: which `[[rewrite]]` entry (SPEC §4a) gives an envelope sender a new one.
//!
//! The session asks at `MAIL FROM`, before routing: from then on the new sender is the
//! message's sender everywhere (routing, the `[[users]]` check, limits, the upstream
//! `MAIL FROM`, DSNs, the spool). The header side, `header_from = "replace"`, is
//! [`crate::message::rewrite::replace_from`], applied once to the header section before
//! the message is spooled or relayed.

use std::net::IpAddr;

use crate::config::{HeaderFrom, RewriteRule};
use crate::scope;

/// What an entry does to one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    /// Index of the entry in [`crate::config::Config::rewrites`].
    pub entry: usize,
    /// The envelope sender the client gave.
    pub original: String,
    /// The envelope sender from here on.
    pub sender: String,
    /// What happens to `From:`/`Sender:`.
    pub header_from: HeaderFrom,
}

/// The first entry (file order) whose `match` takes `sender` and whose `networks` hold
/// `client` and whose `user` is `user`; `None` for the null sender, or when none does.
/// An entry with `networks` never applies to an unknown client (`None`).
pub fn apply(
    rules: &[RewriteRule],
    sender: &str,
    client: Option<IpAddr>,
    user: Option<&str>,
) -> Option<Rewrite> {
    if sender.is_empty() {
        return None;
    }
    // A v4 client on a dual-stack socket arrives as ::ffff:a.b.c.d.
    let client = client.map(|ip| ip.to_canonical());
    let (entry, rule) = rules.iter().enumerate().find(|(_, rule)| {
        scope::pattern_matches(&rule.pattern, sender)
            && (rule.networks.is_empty()
                || client.is_some_and(|ip| rule.networks.iter().any(|n| n.contains(&ip))))
            && rule.user.as_deref().is_none_or(|u| Some(u) == user)
    })?;
    Some(Rewrite {
        entry,
        original: sender.to_string(),
        sender: rule.sender.clone(),
        header_from: rule.header_from,
    })
}

/// One line explaining an applied entry, for `mailgate route`.
pub fn explain(rule: &RewriteRule, rewrite: &Rewrite) -> String {
    let line = rule
        .line
        .map_or_else(String::new, |l| format!(" at line {l}"));
    let mut conditions = Vec::new();
    if !rule.networks.is_empty() {
        let nets: Vec<String> = rule.networks.iter().map(|n| n.to_string()).collect();
        conditions.push(format!("client in {}", nets.join(", ")));
    }
    if let Some(user) = &rule.user {
        conditions.push(format!("user {user}"));
    }
    let when = if conditions.is_empty() {
        String::new()
    } else {
        format!(", {}", conditions.join(", "))
    };
    let headers = match rule.header_from {
        HeaderFrom::Replace => "From: becomes the new sender, Sender: removed",
        HeaderFrom::Keep => "headers kept as sent",
    };
    format!(
        "MAIL FROM:<{}> is rewritten to <{}> by the [[rewrite]] entry{line} (match {}{when}); {headers}",
        rewrite.original,
        rewrite.sender,
        rule.pattern.text()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SenderPattern;

    fn rule(pattern: SenderPattern, sender: &str) -> RewriteRule {
        RewriteRule {
            pattern,
            sender: sender.into(),
            header_from: HeaderFrom::Replace,
            networks: Vec::new(),
            user: None,
            line: None,
        }
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    fn new_sender(
        rules: &[RewriteRule],
        sender: &str,
        client: &str,
        user: Option<&str>,
    ) -> Option<String> {
        apply(rules, sender, ip(client), user).map(|r| r.sender)
    }

    #[test]
    fn the_first_matching_entry_in_file_order_applies() {
        let rules = [
            rule(
                SenderPattern::Exact("scanner@printer.local".into()),
                "a@example.com",
            ),
            rule(
                SenderPattern::AnyAtDomain("printer.local".into()),
                "b@example.com",
            ),
            rule(SenderPattern::Any, "c@example.com"),
        ];
        let got = apply(&rules, "Scanner@PRINTER.local", ip("127.0.0.1"), None).unwrap();
        assert_eq!(
            got,
            Rewrite {
                entry: 0,
                original: "Scanner@PRINTER.local".into(),
                sender: "a@example.com".into(),
                header_from: HeaderFrom::Replace
            }
        );
        assert_eq!(
            new_sender(&rules, "fax@printer.local", "127.0.0.1", None).as_deref(),
            Some("b@example.com")
        );
        assert_eq!(
            new_sender(&rules, "x@else.org", "127.0.0.1", None).as_deref(),
            Some("c@example.com")
        );
        // File order, not specificity: a catch-all first takes everything.
        let rules = [rule(SenderPattern::Any, "c@example.com"), rules[0].clone()];
        assert_eq!(
            new_sender(&rules, "scanner@printer.local", "127.0.0.1", None).as_deref(),
            Some("c@example.com")
        );
    }

    #[test]
    fn the_null_sender_is_never_rewritten() {
        let rules = [rule(SenderPattern::Any, "c@example.com")];
        assert_eq!(apply(&rules, "", ip("127.0.0.1"), None), None);
        assert_eq!(apply(&[], "a@b", ip("127.0.0.1"), None), None);
    }

    #[test]
    fn networks_must_hold_the_client() {
        let mut r = rule(
            SenderPattern::AnyAtDomain("printer.local".into()),
            "s@example.com",
        );
        r.networks = vec![
            "192.168.10.0/24".parse().unwrap(),
            "127.0.0.1/32".parse().unwrap(),
        ];
        let rules = [r];
        let s = |client| new_sender(&rules, "scanner@printer.local", client, None);
        assert!(s("192.168.10.77").is_some());
        assert!(s("127.0.0.1").is_some());
        assert!(s("::ffff:192.168.10.9").is_some(), "v4-mapped client");
        assert!(s("127.0.0.2").is_none());
        assert!(s("192.168.11.1").is_none());
        assert!(s("::1").is_none());
        assert_eq!(apply(&rules, "scanner@printer.local", None, None), None);
    }

    #[test]
    fn user_must_be_the_authenticated_one() {
        let mut r = rule(SenderPattern::Any, "s@example.com");
        r.user = Some("printer".into());
        let rules = [r, rule(SenderPattern::Any, "other@example.com")];
        let s = |user| new_sender(&rules, "scanner@printer.local", "10.0.0.1", user);
        assert_eq!(s(Some("printer")).as_deref(), Some("s@example.com"));
        assert_eq!(s(Some("Printer")).as_deref(), Some("other@example.com"));
        assert_eq!(s(None).as_deref(), Some("other@example.com"));
    }

    #[test]
    fn explain_names_the_entry_and_its_conditions() {
        let mut r = rule(
            SenderPattern::AnyAtDomain("printer.local".into()),
            "s@example.com",
        );
        r.networks = vec!["10.0.0.0/8".parse().unwrap()];
        r.user = Some("printer".into());
        r.line = Some(40);
        let rw = apply(
            std::slice::from_ref(&r),
            "x@printer.local",
            ip("10.1.1.1"),
            Some("printer"),
        )
        .unwrap();
        let text = explain(&r, &rw);
        assert!(
            text.contains("<x@printer.local> is rewritten to <s@example.com>"),
            "{text}"
        );
        assert!(
            text.contains("line 40") && text.contains("*@printer.local"),
            "{text}"
        );
        assert!(
            text.contains("client in 10.0.0.0/8") && text.contains("user printer"),
            "{text}"
        );
    }
}
