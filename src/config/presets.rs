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
    /// The default `scope` of a client-credentials XOAUTH2 token on this preset, when it
    /// differs from the provider's default (SPEC §7).
    pub oauth_app_scope: Option<&'static str>,
    /// A delegated token (`grant = "refresh_token"`) can authenticate here: false where
    /// the service takes an app's own token only.
    pub oauth_delegated: bool,
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
    "acs",
    "hve",
];

/// Azure Communication Services Email's token audience (an Entra app with the
/// "Communication and Email Service Owner" role, or a custom one with its permissions).
pub const ACS_SCOPE: &str = "https://communication.azure.com/.default";

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
        oauth_app_scope: None,
        oauth_delegated: true,
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
        oauth_app_scope: None,
        oauth_delegated: true,
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
            oauth_app_scope: None,
            oauth_delegated: true,
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
            oauth_app_scope: None,
            oauth_delegated: true,
        },
        "sparkpost" => bulk_provider("sparkpost", "smtp.sparkpostmail.com"),
        "sendgrid" => bulk_provider("sendgrid", "smtp.sendgrid.net"),
        "mailgun" => bulk_provider("mailgun", "smtp.mailgun.org"),
        "ses" => bulk_provider("ses", "email-smtp.{region}.amazonaws.com"),
        // Domain-scoped like a bulk provider; its quota is per resource, so the README
        // says to set `rate` to it. Tokens are the Entra app's own, never a user's.
        "acs" => Preset {
            oauth_app_scope: Some(ACS_SCOPE),
            oauth_delegated: false,
            ..bulk_provider("acs", "smtp.azurecomm.net")
        },
        // An HVE account is one mail user: exact addresses only. Its app tokens are
        // Exchange Online's (application permission Mail.Send on "Office 365 Exchange
        // Online", app added with Add-HVEAppAccess), the same audience as office365's.
        "hve" => Preset {
            address_scoped: true,
            oauth_app_scope: Some(super::oauth::defaults::MICROSOFT_SMTP_APP_SCOPE),
            ..bulk_provider("hve", "smtp.hve.mx.microsoft")
        },
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

    #[test]
    fn acs_and_hve_are_microsofts_other_smtp_doors() {
        let acs = find("acs").unwrap();
        assert_eq!(
            (acs.host, acs.port, acs.tls),
            ("smtp.azurecomm.net", 587, TlsMode::Starttls)
        );
        assert!(!acs.address_scoped);
        assert_eq!(acs.limits.rate, None);
        assert_eq!(
            acs.oauth_app_scope,
            Some("https://communication.azure.com/.default")
        );
        assert!(!acs.oauth_delegated);
        let hve = find("hve").unwrap();
        assert_eq!(
            (hve.host, hve.port, hve.tls),
            ("smtp.hve.mx.microsoft", 587, TlsMode::Starttls)
        );
        assert!(hve.address_scoped);
        assert_eq!(hve.limits.rate, None);
        assert_eq!(
            hve.oauth_app_scope,
            Some("https://outlook.office365.com/.default")
        );
    }
}
