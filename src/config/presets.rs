//! Provider presets (SPEC §3 table): defaults that a channel's explicit keys override.

use std::time::Duration;

use super::{Limits, Rate, TlsMode};

/// Connections per channel when neither the preset nor the channel says otherwise.
pub const DEFAULT_CONNECTIONS: usize = 4;

/// One provider's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preset {
    /// The name used in `preset = "..."`.
    pub name: &'static str,
    /// Upstream host; `{region}` is replaced by the channel's `region` (SES).
    pub host: &'static str,
    /// Upstream port.
    pub port: u16,
    /// Transport security.
    pub tls: TlsMode,
    /// Credentials belong to one mailbox: exact addresses only.
    pub address_scoped: bool,
    /// Provider limits.
    pub limits: Limits,
}

impl Preset {
    /// The preset needs a `region` key to name its host.
    pub fn needs_region(&self) -> bool {
        self.host.contains("{region}")
    }

    /// The host name, with `region` filled in where the preset needs one.
    pub fn host_for(&self, region: &str) -> String {
        self.host.replace("{region}", region)
    }
}

/// Every preset name, for error messages.
pub const NAMES: &[&str] = &[
    "office365",
    "gmail",
    "sparkpost",
    "sendgrid",
    "mailgun",
    "ses",
];

/// The limits of a `kind = "graph"` channel (SPEC §3): Exchange Online's sending limits
/// and its 35 MB; over 3,000,000 bytes a message goes the upload way (SPEC §7).
pub fn graph() -> Preset {
    Preset {
        name: "graph",
        host: "graph.microsoft.com",
        port: 443,
        tls: TlsMode::Implicit,
        address_scoped: true,
        limits: Limits {
            rate: Some(Rate {
                count: 30,
                per: Duration::from_secs(60),
            }),
            recipients_per_day: Some(10_000),
            max_recipients: Some(500),
            connections: 4,
            max_message_size: Some(35 * 1024 * 1024),
        },
    }
}

/// The preset called `name`, if there is one.
pub fn find(name: &str) -> Option<Preset> {
    const MB: u64 = 1024 * 1024;
    let bulk_provider = |name, host| Preset {
        name,
        host,
        port: 587,
        tls: TlsMode::Starttls,
        address_scoped: false,
        limits: Limits {
            connections: DEFAULT_CONNECTIONS,
            ..Limits::default()
        },
    };
    let preset = match name {
        "office365" => Preset {
            name: "office365",
            host: "smtp.office365.com",
            port: 587,
            tls: TlsMode::Starttls,
            address_scoped: true,
            limits: Limits {
                rate: Some(Rate {
                    count: 30,
                    per: Duration::from_secs(60),
                }),
                recipients_per_day: Some(10_000),
                max_recipients: Some(500),
                connections: 3,
                max_message_size: Some(35 * MB),
            },
        },
        "gmail" => Preset {
            name: "gmail",
            host: "smtp.gmail.com",
            port: 465,
            tls: TlsMode::Implicit,
            address_scoped: true,
            limits: Limits {
                rate: Some(Rate {
                    count: 2000,
                    per: Duration::from_secs(24 * 3600),
                }),
                recipients_per_day: Some(10_000),
                max_recipients: Some(100),
                connections: DEFAULT_CONNECTIONS,
                max_message_size: None,
            },
        },
        "sparkpost" => bulk_provider("sparkpost", "smtp.sparkpostmail.com"),
        "sendgrid" => bulk_provider("sendgrid", "smtp.sendgrid.net"),
        "mailgun" => bulk_provider("mailgun", "smtp.mailgun.org"),
        "ses" => bulk_provider("ses", "email-smtp.{region}.amazonaws.com"),
        _ => return None,
    };
    Some(preset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_name_is_found_under_its_own_name() {
        for name in NAMES {
            assert_eq!(find(name).map(|p| p.name), Some(*name));
        }
        assert!(find("hotmail").is_none());
    }

    #[test]
    fn ses_host_takes_the_region() {
        let ses = find("ses").unwrap();
        assert!(ses.needs_region());
        assert_eq!(
            ses.host_for("eu-west-1"),
            "email-smtp.eu-west-1.amazonaws.com"
        );
        assert!(!find("sendgrid").unwrap().needs_region());
    }
}
