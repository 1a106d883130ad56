//! Pure sender-scope matching (no I/O): does a scope pattern take an address, and how
//! specific is it (SPEC §4). Routing uses it to pick a channel; the queue uses it to pick
//! the sender of a bounce; both must agree, so the rules live here once.
//!
//! Addresses are compared case-insensitively in **both** parts. RFC 5321 lets the local
//! part be case-sensitive, but no provider we route to treats `Alice@` and `alice@` as
//! different mailboxes, and an administrator who writes `alice@example.com` expects
//! `Alice@Example.com` to match it.

use crate::config::{Channel, SenderPattern, User};

/// How specific a matching scope pattern is; a greater value wins (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Specificity {
    /// `*`.
    CatchAll,
    /// `*@example.com`.
    Pattern,
    /// `domains = ["example.com"]`.
    Domain,
    /// `alice@example.com`.
    Exact,
}

/// Splits an address at its last `@` into local part and domain.
fn split_address(address: &str) -> Option<(&str, &str)> {
    address
        .rsplit_once('@')
        .filter(|(local, domain)| !local.is_empty() && !domain.is_empty())
}

/// Case-insensitive comparison (ASCII fast path, Unicode for SMTPUTF8 addresses).
fn same_text(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b) || a.to_lowercase() == b.to_lowercase()
}

/// The domain of a `*@domain` pattern, accepting it with or without its `*@` prefix.
fn pattern_domain(pattern: &str) -> &str {
    pattern.strip_prefix("*@").unwrap_or(pattern)
}

/// Whether one scope pattern matches `address`; the null sender `""` matches only `*`.
pub fn pattern_matches(pattern: &SenderPattern, address: &str) -> bool {
    if address.is_empty() {
        return *pattern == SenderPattern::Any;
    }
    match pattern {
        SenderPattern::Exact(exact) => same_text(exact, address),
        SenderPattern::Domain(domain) => {
            split_address(address).is_some_and(|(_, d)| same_text(domain, d))
        }
        SenderPattern::AnyAtDomain(pattern) => {
            split_address(address).is_some_and(|(_, d)| same_text(pattern_domain(pattern), d))
        }
        SenderPattern::Any => true,
    }
}

/// How specific a pattern is.
pub fn specificity(pattern: &SenderPattern) -> Specificity {
    match pattern {
        SenderPattern::Exact(_) => Specificity::Exact,
        SenderPattern::Domain(_) => Specificity::Domain,
        SenderPattern::AnyAtDomain(_) => Specificity::Pattern,
        SenderPattern::Any => Specificity::CatchAll,
    }
}

/// The most specific pattern of `scope` that matches `address`, if any.
pub fn best_match<'a>(scope: &'a [SenderPattern], address: &str) -> Option<&'a SenderPattern> {
    scope
        .iter()
        .filter(|p| pattern_matches(p, address))
        .max_by_key(|p| specificity(p))
}

/// Explains a matched pattern, e.g. `domain example.com`.
pub fn describe(pattern: &SenderPattern) -> String {
    match pattern {
        SenderPattern::Exact(a) => format!("exact address {a}"),
        SenderPattern::Domain(d) => format!("domain {d}"),
        SenderPattern::AnyAtDomain(d) => format!("pattern *@{}", pattern_domain(d)),
        SenderPattern::Any => "catch-all *".to_string(),
    }
}

/// Whether `channel` may carry mail whose sender (or header address) is `address`.
pub fn channel_allows(channel: &Channel, address: &str) -> bool {
    channel.scope.iter().any(|p| pattern_matches(p, address))
}

/// Whether the authenticated `user` may use envelope sender `sender`.
pub fn user_allows(user: &User, sender: &str) -> bool {
    user.senders.iter().any(|p| pattern_matches(p, sender))
}

/// Parses a scope entry the way a config file writes it (for tests here and in routing).
#[cfg(test)]
pub(crate) fn pattern(s: &str) -> SenderPattern {
    match s {
        "*" => SenderPattern::Any,
        _ if s.starts_with("*@") => SenderPattern::AnyAtDomain(s[2..].to_string()),
        _ if s.contains('@') => SenderPattern::Exact(s.to_string()),
        _ => SenderPattern::Domain(s.to_string()),
    }
}

/// A `file` channel with this scope (for tests here and in routing).
#[cfg(test)]
pub(crate) fn channel(name: &str, address_scoped: bool, scope: &[&str]) -> Channel {
    Channel {
        name: name.to_string(),
        scope: scope.iter().map(|s| pattern(s)).collect(),
        address_scoped,
        fallback: None,
        preset: None,
        kind: crate::config::ChannelKind::File {
            dir: std::path::PathBuf::from("outbox"),
        },
        limits: crate::config::Limits::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn null_sender_matches_only_catch_all() {
        for p in ["alice@example.com", "example.com", "*@example.com"] {
            assert!(!pattern_matches(&pattern(p), ""), "{p}");
        }
        assert!(pattern_matches(&SenderPattern::Any, ""));
    }

    #[test]
    fn any_at_domain_accepts_stored_prefix() {
        let p = SenderPattern::AnyAtDomain("*@example.com".into());
        assert!(pattern_matches(&p, "a@EXAMPLE.com"));
        assert_eq!(describe(&p), "pattern *@example.com");
    }

    #[test]
    fn unicode_addresses_compare_case_insensitively() {
        assert!(pattern_matches(
            &pattern("jörg@bücher.de"),
            "JÖRG@BÜCHER.DE"
        ));
        assert!(pattern_matches(&pattern("bücher.de"), "x@Bücher.de"));
    }

    #[test]
    fn best_match_prefers_the_most_specific() {
        let scope: Vec<_> = ["*", "*@example.com", "example.com", "a@example.com"]
            .iter()
            .map(|s| pattern(s))
            .collect();
        let best = |address| best_match(&scope, address).map(describe);
        assert_eq!(
            best("a@example.com").unwrap(),
            "exact address a@example.com"
        );
        assert_eq!(best("b@example.com").unwrap(), "domain example.com");
        assert_eq!(best("b@other.org").unwrap(), "catch-all *");
        assert_eq!(best_match(&scope[1..2], "b@other.org"), None);
        assert!(Specificity::Exact > Specificity::Domain);
        assert!(Specificity::Domain > Specificity::Pattern);
        assert!(Specificity::Pattern > Specificity::CatchAll);
    }

    #[test]
    fn user_allows_matches_patterns() {
        let user = User {
            name: "billing-app".into(),
            password_hash: Secret::new("$argon2id$x"),
            senders: vec![
                pattern("billing@example.com"),
                pattern("*@invoices.example.com"),
            ],
        };
        assert!(user_allows(&user, "billing@example.com"));
        assert!(user_allows(&user, "Billing@EXAMPLE.com"));
        assert!(user_allows(&user, "anyone@invoices.example.com"));
        assert!(!user_allows(&user, "alice@example.com"));
        assert!(!user_allows(&user, ""));
        let open = User {
            senders: vec![SenderPattern::Any],
            ..user.clone()
        };
        assert!(user_allows(&open, ""));
        assert!(user_allows(&open, "x@y.z"));
        let none = User {
            senders: vec![],
            ..user
        };
        assert!(!user_allows(&none, "billing@example.com"));
    }

    #[test]
    fn channel_allows_any_pattern() {
        let c = channel("mixed", false, &["a@x.org", "y.org", "*@z.org"]);
        assert!(channel_allows(&c, "A@X.org"));
        assert!(channel_allows(&c, "b@y.org"));
        assert!(channel_allows(&c, "b@Z.ORG"));
        assert!(!channel_allows(&c, "b@x.org"));
        assert!(!channel_allows(&c, ""));
    }
}
