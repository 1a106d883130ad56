//! Configuration fixtures: a default `[server]`, channels, envelopes.

use std::path::PathBuf;

use crate::config::{
    Channel, ChannelKind, Config, DeliveryMode, Limits, Routing, Server, SmtpTarget, TlsMode,
};
use crate::message::Envelope;

/// A `[server]` as a test wants it by default: relay mode, no listeners, host name
/// `mailgate.test`, spool `spool`, retries 1m → 1h, giving up after 5 days.
pub fn server() -> Server {
    Server {
        listen: Vec::new(),
        hostname: "mailgate.test".into(),
        max_message_size: 35_000_000,
        max_recipients: 1000,
        max_connections: 100,
        delivery: DeliveryMode::Relay,
        check_header_from: false,
        ..Server::default()
    }
}

/// A config with the default [`server`], no users and these channels.
pub fn config(channels: Vec<Channel>) -> Config {
    Config {
        path: PathBuf::from("test.toml"),
        server: server(),
        users: Vec::new(),
        channels,
        routing: Routing::default(),
        metrics: None,
        has_literal_secrets: false,
        state: Default::default(),
        index: Default::default(),
        rewrites: Vec::new(),
        warnings: Vec::new(),
    }
}

/// An SMTP target at `port` on this host (`localhost` with TLS, for the test certificate).
pub fn smtp_target(port: u16, tls: TlsMode) -> SmtpTarget {
    SmtpTarget {
        host: if tls == TlsMode::None {
            "127.0.0.1".into()
        } else {
            "localhost".into()
        },
        port,
        tls,
        ca_file: None,
        username: None,
        password: None,
        oauth: None,
    }
}

/// A channel without scope or limits but `connections`.
pub fn channel(name: &str, kind: ChannelKind, connections: usize) -> Channel {
    Channel {
        name: name.into(),
        scope: Vec::new(),
        address_scoped: false,
        fallback: None,
        preset: None,
        kind,
        limits: Limits {
            connections,
            ..Limits::default()
        },
    }
}

/// An envelope from `sender` to `recipients`.
pub fn envelope(sender: &str, recipients: &[&str]) -> Envelope {
    Envelope {
        sender: sender.into(),
        recipients: recipients.iter().map(|r| r.to_string()).collect(),
        ..Envelope::default()
    }
}

/// A graph channel sending as `mailbox` through the stand-in at `graph_url`, with an
/// app-only (client-credentials) token from the local endpoint at `token_url`, and the
/// graph preset's limits (scope: the mailbox).
pub fn graph_channel(name: &str, mailbox: &str, graph_url: &str, token_url: &str) -> Channel {
    use crate::config::oauth::{Grant, OAuth, Provider, TokenSource, defaults};
    use crate::testkit::token_endpoint::{CLIENT_ID, CLIENT_SECRET};
    let oauth = OAuth {
        provider: Provider::Microsoft,
        grant: Grant::ClientCredentials,
        tenant: "example.com".into(),
        client_id: CLIENT_ID.into(),
        client_secret: Some(crate::config::Secret::new(CLIENT_SECRET)),
        refresh_token: None,
        refresh_token_source: TokenSource::None,
        scope: defaults::GRAPH_APP_SCOPE.into(),
        token_url: token_url.into(),
        auth_url: token_url.into(),
        device_url: token_url.into(),
        graph_url: graph_url.into(),
    };
    Channel {
        name: name.into(),
        scope: vec![crate::config::SenderPattern::Exact(mailbox.into())],
        address_scoped: true,
        fallback: None,
        preset: None,
        kind: ChannelKind::Graph(crate::config::GraphTarget {
            mailbox: mailbox.into(),
            oauth,
        }),
        limits: crate::config::presets::graph().limits,
    }
}
