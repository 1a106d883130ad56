//! `[[rewrite]]`: legacy senders given a real sender at intake (SPEC §4a).

use serde_spanned::Spanned;

use super::reader::{Expect, Keys, Reader, Section, Strings};
use super::values::{parse_network, parse_sender_pattern};
use super::{Channel, HeaderFrom, Problem, RewriteRule, SenderPattern, User};
use crate::scope;

/// One `[[rewrite]]` entry as written.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRewrite {
    #[serde(rename = "match")]
    pattern: Option<Spanned<String>>,
    sender: Option<Spanned<String>>,
    header_from: Option<Spanned<String>>,
    networks: Option<Strings>,
    user: Option<Spanned<String>>,
}

pub(super) const REWRITE_KEYS: Keys = &[
    ("match", Expect::Str),
    ("sender", Expect::Str),
    ("header_from", Expect::Str),
    ("networks", Expect::Strings),
    ("user", Expect::Str),
];

/// Reads and validates every `[[rewrite]]` entry against the channels and users already
/// read; returns the entries and the warnings about entries that can never match.
pub(super) fn read(
    r: &mut Reader,
    root: &Section,
    channels: &[Channel],
    users: &[User],
) -> (Vec<RewriteRule>, Vec<Problem>) {
    let Some(item) = root.table.get("rewrite") else {
        return (Vec::new(), Vec::new());
    };
    let Some(entries) = item.as_array_of_tables() else {
        let line = r.key_line(root, "rewrite");
        r.problem(line, "rewrite must be written as [[rewrite]] tables");
        return (Vec::new(), Vec::new());
    };
    let mut rules = Vec::new();
    for table in entries.iter() {
        let line = r.line(table.span());
        let s = Section {
            table,
            place: match line {
                Some(l) => format!("in the [[rewrite]] entry at line {l}"),
                None => "in [[rewrite]]".to_owned(),
            },
            line,
        };
        let raw: RawRewrite = r.read(&s, REWRITE_KEYS);
        if let Some(rule) = entry(r, &s, &raw, channels, users) {
            rules.push(rule);
        }
    }
    let warnings = never_matching(&rules);
    (rules, warnings)
}

/// One entry, or `None` when it has a problem (recorded).
fn entry(
    r: &mut Reader,
    s: &Section,
    raw: &RawRewrite,
    channels: &[Channel],
    users: &[User],
) -> Option<RewriteRule> {
    let before = r.problems.len();
    let pattern = r.parsed(s, "match", &raw.pattern, parse_sender_pattern);
    if !s.has("match") {
        r.problem(
            s.line,
            "[[rewrite]] entry needs match = \"...\" (an address, \"*@domain\" or \"*\")",
        );
    }
    let sender = r.parsed(
        s,
        "sender",
        &raw.sender,
        |text| match parse_sender_pattern(text)? {
            SenderPattern::Exact(address) => Ok(address),
            _ => Err(format!(
                "{text:?} is a pattern; the new sender must be one address (\"scans@example.com\")"
            )),
        },
    );
    if !s.has("sender") {
        r.problem(
            s.line,
            "[[rewrite]] entry needs sender = \"...\", the envelope sender to use instead",
        );
    }
    if let (Some(address), Some(at)) = (&sender, &raw.sender) {
        let taken = channels.iter().enumerate().any(|(id, c)| {
            let fallback_only = channels.iter().any(|o| o.fallback == Some(id));
            !fallback_only && scope::channel_allows(c, address)
        });
        if !taken {
            let line = r.at(at);
            r.bad(s, "sender", line, format!("no channel takes {address:?}"));
        }
    }
    let header_from = r
        .choice(
            s,
            "header_from",
            &raw.header_from,
            &[("replace", HeaderFrom::Replace), ("keep", HeaderFrom::Keep)],
        )
        .unwrap_or_default();
    let networks: Vec<ipnet::IpNet> = r
        .list_of(s, "networks", &raw.networks, parse_network)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let user = raw.user.as_ref().and_then(|at| {
        let name = at.get_ref();
        let line = r.at(at);
        match users.iter().find(|u| &u.name == name) {
            None => {
                r.bad(s, "user", line, format!("there is no [[users]] entry {name:?}"));
                None
            }
            Some(u) => {
                if let Some(address) = &sender
                    && !scope::user_allows(u, address)
                {
                    let why = format!(
                        "user {name:?} may not use the sender {address:?} (its senders = [...] must include it)"
                    );
                    r.bad(s, "user", line, why);
                }
                Some(name.clone())
            }
        }
    });
    if r.problems.len() != before {
        return None;
    }
    Some(RewriteRule {
        pattern: pattern?,
        sender: sender?,
        header_from,
        networks,
        user,
        line: s.line,
    })
}

/// A warning for each entry that an earlier one always takes first: the earlier one
/// matches every sender the later one does, for every client and user it applies to.
fn never_matching(rules: &[RewriteRule]) -> Vec<Problem> {
    let mut warnings = Vec::new();
    for (i, later) in rules.iter().enumerate() {
        if let Some(earlier) = rules[..i].iter().find(|e| covers(e, later)) {
            let at = |l: Option<usize>| l.map_or("?".to_owned(), |l| l.to_string());
            warnings.push(Problem {
                line: later.line,
                message: format!(
                    "the [[rewrite]] entry at line {} (match {:?}) can never apply: the entry at line {} (match {:?}) takes all of its senders first",
                    at(later.line),
                    later.pattern.text(),
                    at(earlier.line),
                    earlier.pattern.text()
                ),
            });
        }
    }
    warnings
}

/// `earlier` applies wherever `later` would.
fn covers(earlier: &RewriteRule, later: &RewriteRule) -> bool {
    let senders = match (&earlier.pattern, &later.pattern) {
        (SenderPattern::Any, _) => true,
        (SenderPattern::AnyAtDomain(d), SenderPattern::AnyAtDomain(e)) => d.eq_ignore_ascii_case(e),
        (SenderPattern::AnyAtDomain(_), SenderPattern::Exact(address)) => {
            scope::pattern_matches(&earlier.pattern, address)
        }
        (SenderPattern::Exact(a), SenderPattern::Exact(b)) => {
            scope::pattern_matches(&SenderPattern::Exact(a.clone()), b)
        }
        _ => false,
    };
    let networks = earlier.networks.is_empty()
        || (!later.networks.is_empty()
            && later
                .networks
                .iter()
                .all(|n| earlier.networks.iter().any(|e| e.contains(n))));
    let user = earlier.user.is_none() || earlier.user == later.user;
    senders && networks && user
}

#[cfg(test)]
mod tests {
    use crate::config::{HeaderFrom, SenderPattern, parse};
    use std::path::Path;

    const BASE: &str = r#"
[server]
listen = ["127.0.0.1:2525"]

[[users]]
name = "printer"
password_hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$8wD7ltSnNxMkT9mOY1E2O4O0pUhJi3HmNqk/3SFMqQE"
senders = ["*@example.com", "*@printer.local"]

[channels.team]
kind = "file"
dir = "outbox"
senders = ["*@example.com"]
"#;

    fn problems(extra: &str) -> Vec<String> {
        let text = format!("{BASE}{extra}");
        match parse(&text, Path::new("/tmp/p.toml")) {
            Ok(_) => Vec::new(),
            Err(e) => e
                .problems
                .iter()
                .map(|p| format!("{:?}: {}", p.line, p.message))
                .collect(),
        }
    }

    #[test]
    fn entries_are_read_in_file_order() {
        let text = format!(
            "{BASE}\n[[rewrite]]\nmatch = \"*@printer.local\"\nsender = \"scans@example.com\"\nnetworks = [\"192.168.10.0/24\", \"10.0.0.7\"]\nuser = \"printer\"\n\n[[rewrite]]\nmatch = \"old@legacy.test\"\nsender = \"erp@example.com\"\nheader_from = \"keep\"\n"
        );
        let config = parse(&text, Path::new("/tmp/p.toml")).unwrap();
        assert_eq!(config.rewrites.len(), 2);
        let first = &config.rewrites[0];
        assert_eq!(
            first.pattern,
            SenderPattern::AnyAtDomain("printer.local".into())
        );
        assert_eq!(first.sender, "scans@example.com");
        assert_eq!(first.header_from, HeaderFrom::Replace);
        assert_eq!(first.networks.len(), 2);
        assert_eq!(first.user.as_deref(), Some("printer"));
        assert_eq!(first.line, Some(15));
        assert_eq!(config.rewrites[1].header_from, HeaderFrom::Keep);
        assert!(config.warnings.is_empty());
    }

    #[test]
    fn every_bad_entry_is_listed_with_its_line() {
        let got = problems(
            r#"
[[rewrite]]
match = "*@printer.local"
sender = "*@example.com"

[[rewrite]]
match = "a@printer.local"
sender = "scans@other.org"

[[rewrite]]
match = "b@printer.local"
sender = "scans@example.com"
user = "nobody"

[[rewrite]]
match = "c@printer.local"
sender = "scans@example.com"
networks = ["10.0.0.0/33"]

[[rewrite]]
match = "d@*.local"
sender = "scans@example.com"

[[rewrite]]
match = "e@printer.local"
sender = "scans@example.com"
header_from = "drop"
frm = 1

[[rewrite]]
sender = "scans@example.com"
"#,
        );
        let want = [
            ("Some(17)", "is a pattern"),
            ("Some(21)", "no channel takes \"scans@other.org\""),
            ("Some(26)", "no [[users]] entry \"nobody\""),
            ("Some(31)", "invalid network \"10.0.0.0/33\""),
            ("Some(34)", "invalid sender \"d@*.local\""),
            ("Some(40)", "\"drop\" is not one of"),
            ("Some(41)", "unknown key \"frm\""),
            ("Some(43)", "needs match"),
        ];
        assert_eq!(got.len(), want.len(), "{got:#?}");
        for (line, text) in want {
            assert!(
                got.iter().any(|p| p.starts_with(line) && p.contains(text)),
                "{line} {text}: {got:#?}"
            );
        }
    }

    #[test]
    fn a_user_entry_whose_user_may_not_use_the_sender_is_refused() {
        let got = problems(
            "\n[[users]]\nname = \"narrow\"\npassword_hash = \"$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$8wD7ltSnNxMkT9mOY1E2O4O0pUhJi3HmNqk/3SFMqQE\"\nsenders = [\"x@example.com\"]\n\n[[rewrite]]\nmatch = \"*\"\nsender = \"scans@example.com\"\nuser = \"narrow\"\n",
        );
        assert_eq!(got.len(), 1, "{got:#?}");
        assert!(got[0].contains("may not use the sender"), "{got:#?}");
    }

    fn warnings(extra: &str) -> Vec<String> {
        let text = format!("{BASE}{extra}");
        let config = parse(&text, Path::new("/tmp/p.toml")).unwrap();
        config.warnings.iter().map(|p| p.message.clone()).collect()
    }

    fn entry(pattern: &str, networks: &str, user: &str) -> String {
        let mut e =
            format!("\n[[rewrite]]\nmatch = \"{pattern}\"\nsender = \"scans@example.com\"\n");
        if !networks.is_empty() {
            e.push_str(&format!("networks = [{networks}]\n"));
        }
        if !user.is_empty() {
            e.push_str(&format!("user = \"{user}\"\n"));
        }
        e
    }

    #[test]
    fn an_entry_that_can_never_match_is_a_warning_naming_both() {
        let shadowed = |a: String, b: String| warnings(&format!("{a}{b}"));
        let got = shadowed(
            entry("*@printer.local", "", ""),
            entry("scanner@Printer.local", "", ""),
        );
        assert_eq!(got.len(), 1);
        assert!(
            got[0].contains("line 19") && got[0].contains("line 15"),
            "{got:?}"
        );
        assert!(got[0].contains("scanner@printer.local") && got[0].contains("*@printer.local"));
        assert_eq!(
            shadowed(entry("*", "", ""), entry("*@printer.local", "", "")).len(),
            1
        );
        assert_eq!(
            shadowed(entry("a@x.org", "", ""), entry("A@X.org", "", "")).len(),
            1
        );
        // Narrower networks or a named user behind an unconditional entry: shadowed.
        assert_eq!(
            shadowed(
                entry("*", "\"10.0.0.0/8\"", ""),
                entry("*", "\"10.1.0.0/16\", \"10.2.0.1\"", "printer")
            )
            .len(),
            1
        );
        // Conditions that let the later entry apply: no warning.
        for (a, b) in [
            (entry("*@printer.local", "", ""), entry("*", "", "")),
            (
                entry("a@printer.local", "", ""),
                entry("*@printer.local", "", ""),
            ),
            (entry("*", "\"10.0.0.0/8\"", ""), entry("*", "", "")),
            (
                entry("*", "\"10.0.0.0/8\"", ""),
                entry("*", "\"192.168.0.0/16\"", ""),
            ),
            (entry("*", "", "printer"), entry("*", "", "")),
            (entry("*@a.org", "", ""), entry("*@b.org", "", "")),
        ] {
            assert!(shadowed(a.clone(), b.clone()).is_empty(), "{a}{b}");
        }
    }
}
