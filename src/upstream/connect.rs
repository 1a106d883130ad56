//! Opening an upstream SMTP connection: TCP, implicit TLS or STARTTLS, EHLO, AUTH.

use std::fs;
use std::io;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use lettre::transport::smtp::Error as SmtpError;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::commands::{Ehlo, Quit};
use lettre::transport::smtp::extension::{ClientId, Extension};
use lettre::transport::smtp::response::Response;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsConnector;

use super::error::Fail;
use super::pool::{Conn, SmtpChannel};
use super::starttls;
use super::stream::{GuardedStream, Inner};
use super::{Error, Step, Upstreams};
use crate::config::{SmtpTarget, TlsMode};

/// AUTH mechanisms we use with passwords, in order of preference.
const MECHANISMS: [Mechanism; 2] = [Mechanism::Plain, Mechanism::Login];

impl SmtpChannel {
    /// Reads the channel's `ca_file` and builds its TLS settings; connects lazily.
    pub(super) fn new(
        name: &str,
        target: &SmtpTarget,
        hostname: &str,
        connections: usize,
    ) -> Result<Self, String> {
        let extra_roots = match &target.ca_file {
            Some(path) => {
                let pem = fs::read(path)
                    .map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?;
                use rustls::pki_types::pem::PemObject;
                let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                if certs.is_empty() {
                    return Err(format!("ca_file {} holds no certificate", path.display()));
                }
                certs
            }
            None => Vec::new(),
        };
        let tls = match target.tls {
            TlsMode::None => None,
            TlsMode::Starttls | TlsMode::Implicit => Some(rustls_tls(&extra_roots)?),
        };
        Ok(SmtpChannel::with_pool(
            name,
            target,
            ClientId::Domain(hostname.to_string()),
            tls,
            connections,
        ))
    }

    fn address(&self) -> String {
        format!("{}:{}", self.target.host, self.target.port)
    }
}

impl Upstreams {
    /// `test-channel` for an SMTP channel: a fresh connection through AUTH, then QUIT.
    pub(super) async fn test_smtp(
        &self,
        ch: &SmtpChannel,
        step: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), Error> {
        step(&format!(
            "connecting to {} (tls = {})",
            ch.address(),
            tls_name(ch.target.tls)
        ));
        // A fresh connection is the point; idle ones would also hold every slot.
        ch.close_idle();
        let permit = tokio::time::timeout(self.timeout, ch.slots.clone().acquire_owned())
            .await
            .map_err(|_| Error::Timeout {
                step: Step::Connect,
            })?
            .map_err(|_| Error::local("connection pool closed"))?;
        let mut conn = self.connect(ch, permit, step).await?;
        if ch.target.username.is_none() {
            step("no AUTH configured");
        }
        match tokio::time::timeout(self.timeout, conn.smtp.command(Quit)).await {
            Ok(Ok(_)) => step("QUIT ok; no mail was sent"),
            _ => step("QUIT not answered; no mail was sent"),
        }
        Ok(())
    }

    /// Opens a connection in `permit`'s slot: TCP, TLS, EHLO, AUTH.
    pub(super) async fn connect(
        &self,
        ch: &SmtpChannel,
        permit: OwnedSemaphorePermit,
        step: &mut (dyn FnMut(&str) + Send),
    ) -> Result<Conn, Error> {
        let target = ch.address();
        let (host, port) = (&ch.target.host, ch.target.port);
        let tcp = match tokio::time::timeout(self.timeout, open_tcp(host, port)).await {
            // No answer to the connect is an unreachable host (4.4.1), not a slow one.
            Err(_) => {
                return Err(Error::Connect {
                    target,
                    source: io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
                });
            }
            Ok(Err(source)) => return Err(Error::Connect { target, source }),
            Ok(Ok(tcp)) => tcp,
        };
        let peer = tcp.peer_addr().map_err(|source| Error::Connect {
            target: target.clone(),
            source,
        })?;
        step(&format!("connected to {target} ({peer})"));
        let poison = Arc::new(AtomicBool::new(false));
        let stream = match ch.target.tls {
            TlsMode::None => GuardedStream::new(Inner::Plain(tcp), peer, poison.clone()),
            TlsMode::Implicit => {
                let tls = self.handshake(ch, &target, tcp).await?;
                step(&format!(
                    "TLS established (implicit TLS, {})",
                    tls_version(&tls)
                ));
                GuardedStream::new(Inner::Tls(Box::new(tls)), peer, poison.clone())
            }
            TlsMode::Starttls => {
                // Ours, not lettre's: see `starttls.rs` for why.
                let (tcp, ehlo) =
                    starttls::negotiate(tcp, &ch.hello, self.timeout, &ch.name, &target).await?;
                step(&format!("EHLO ok: {}", plain_features(&ehlo)));
                let tls = self.handshake(ch, &target, tcp).await?;
                step(&format!(
                    "TLS established (STARTTLS, {})",
                    tls_version(&tls)
                ));
                GuardedStream::new(Inner::Tls(Box::new(tls)), peer, poison.clone()).after_starttls()
            }
        };
        let outbox = stream.outbox();
        let connecting = AsyncSmtpConnection::connect_with_transport(Box::new(stream), &ch.hello);
        // A negative greeting or EHLO reply (`554`, `421` busy) is the upstream refusing us.
        let mut smtp = self
            .call(ch, self.timeout, connecting)
            .await
            .map_err(|f| f.at(Step::Connect))?;
        step(&format!(
            "EHLO {}ok: {}",
            if ch.target.tls == TlsMode::Starttls {
                "over TLS "
            } else {
                ""
            },
            features(&smtp)
        ));

        // lettre keeps no trace of PIPELINING, so ask once more, after TLS (what the
        // server said before STARTTLS no longer counts) and before AUTH: one round
        // trip per connection, which the pool amortizes.
        let ehlo = self
            .call(ch, self.timeout, smtp.command(Ehlo::new(ch.hello.clone())))
            .await
            .map_err(|f| f.at(Step::Connect))?;
        let pipelining = offers_pipelining(&ehlo);
        step(if pipelining {
            "PIPELINING offered: commands of a transaction go out together"
        } else {
            "no PIPELINING: one command at a time"
        });

        self.authenticate(ch, &mut smtp, &ch.target, step).await?;
        Ok(Conn {
            smtp,
            poison,
            outbox,
            since: Instant::now(),
            unchecked: false,
            stale: false,
            pipelining,
            _permit: permit,
        })
    }

    /// The TLS handshake on `tcp` with the channel's roots, under the timeout.
    async fn handshake(
        &self,
        ch: &SmtpChannel,
        target: &str,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, Error> {
        let tls_error = |source: Box<dyn std::error::Error + Send + Sync>| Error::Tls {
            target: target.to_string(),
            source,
        };
        let connector = ch
            .tls
            .as_ref()
            .ok_or_else(|| tls_error("no TLS settings".into()))?;
        let name = rustls::pki_types::ServerName::try_from(ch.target.host.clone())
            .map_err(|e| tls_error(e.into()))?;
        match tokio::time::timeout(self.timeout, connector.connect(name, tcp)).await {
            Err(_) => Err(tls_error("TLS handshake timed out".into())),
            Ok(Err(e)) => Err(tls_error(e.into())),
            Ok(Ok(tls)) => Ok(tls),
        }
    }

    /// The AUTH step, everything about logging in to `target`: which mechanism, with
    /// which credentials. Nothing to do for a channel without a username.
    async fn authenticate(
        &self,
        ch: &SmtpChannel,
        smtp: &mut AsyncSmtpConnection,
        target: &SmtpTarget,
        step: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), Error> {
        let Some(username) = &target.username else {
            return Ok(());
        };
        if target.oauth.is_some() {
            return self.authenticate_xoauth2(ch, smtp, username, step).await;
        }
        let password = target
            .password
            .as_ref()
            .map(|p| p.expose().to_string())
            .unwrap_or_default();
        let credentials = Credentials::new(username.clone(), password);
        let Some(mechanism) = smtp.server_info().get_auth_mechanism(&MECHANISMS) else {
            return Err(Error::NoAuthMechanism {
                channel: ch.name.clone(),
            });
        };
        self.call(ch, self.timeout, smtp.auth(&[mechanism], &credentials))
            .await
            .map_err(|f| f.at(Step::Auth))?;
        step(&format!("AUTH {mechanism} ok as {username}"));
        Ok(())
    }

    /// AUTH XOAUTH2 with the channel's cached access token. A `535` to that token forces
    /// one refresh and one retry (SPEC §7): a token revoked or expired early is replaced
    /// at once, and a second refusal is a refused login, never a loop.
    async fn authenticate_xoauth2(
        &self,
        ch: &SmtpChannel,
        smtp: &mut AsyncSmtpConnection,
        username: &str,
        step: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), Error> {
        let cache = ch
            .token
            .as_ref()
            .ok_or_else(|| Error::local("XOAUTH2 channel without a token cache"))?;
        if !smtp
            .server_info()
            .supports_auth_mechanism(Mechanism::Xoauth2)
        {
            return Err(Error::NoAuthMechanism {
                channel: ch.name.clone(),
            });
        }
        let token = cache.access_token().await?;
        if let Some(left) = cache.expires_in().await {
            step(&format!(
                "OAuth access token obtained ({} grant; expires in {} min)",
                cache.settings().grant.name(),
                left.as_secs() / 60
            ));
        }
        match self.xoauth2(ch, smtp, username, &token).await {
            Ok(()) => {}
            Err(Fail::Reply(reply)) if reply.code == 535 => {
                tracing::info!(
                    channel = %ch.name,
                    reply = %reply,
                    "upstream refused the cached access token; refreshing it once"
                );
                step("AUTH XOAUTH2 refused (535): refreshing the token and trying once more");
                let fresh = cache.force_refresh(&token).await?;
                self.xoauth2(ch, smtp, username, &fresh)
                    .await
                    .map_err(|f| f.at(Step::Auth))?;
            }
            Err(f) => return Err(f.at(Step::Auth)),
        }
        step(&format!("AUTH XOAUTH2 ok as {username}"));
        Ok(())
    }

    /// One `AUTH XOAUTH2` exchange. A refusal may come as a `334` carrying an error
    /// document (Google, Exchange), which wants an empty line before the final `535`;
    /// lettre's own XOAUTH2 gives up at that `334` and never reads the `535`.
    async fn xoauth2(
        &self,
        ch: &SmtpChannel,
        smtp: &mut AsyncSmtpConnection,
        username: &str,
        token: &crate::oauth::AccessToken,
    ) -> Result<(), Fail> {
        let command = crate::oauth::xoauth2_command(username, token);
        let reply = self
            .call(ch, self.timeout, smtp.command(Wire(command.expose())))
            .await?;
        if reply.has_code(334) {
            self.call(ch, self.timeout, smtp.command(Wire("\r\n")))
                .await?;
        }
        Ok(())
    }

    /// Runs one lettre call with a timeout and sorts its failure.
    pub(super) async fn call<T>(
        &self,
        ch: &SmtpChannel,
        limit: Duration,
        call: impl Future<Output = Result<T, SmtpError>>,
    ) -> Result<T, Fail> {
        match tokio::time::timeout(limit, call).await {
            Err(_) => Err(Fail::Timeout),
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(Fail::from_lettre(e, &ch.name)),
        }
    }
}

/// A command line that goes on the wire as it is. lettre writes a command's `Display`;
/// the XOAUTH2 line is a [`crate::config::Secret`], whose `Display` is `***`.
struct Wire<'a>(&'a str);

impl std::fmt::Display for Wire<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// A TCP connection to the upstream, with Nagle's algorithm off: lettre writes the
/// final `.CRLF` of DATA (and each command) as its own small segment, which Nagle
/// would hold back until the upstream's delayed ACK (~40 ms a message on Linux).
pub(super) async fn open_tcp(host: &str, port: u16) -> io::Result<TcpStream> {
    let tcp = TcpStream::connect((host, port)).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// The EHLO reply has a `PIPELINING` line (RFC 2920).
pub(super) fn offers_pipelining(ehlo: &Response) -> bool {
    // The first line is the server's name.
    ehlo.message().skip(1).any(|line| {
        line.split_whitespace()
            .next()
            .is_some_and(|keyword| keyword.eq_ignore_ascii_case("PIPELINING"))
    })
}

/// The negotiated TLS version, for `test-channel`.
fn tls_version(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> String {
    let version = tls.get_ref().1.protocol_version();
    version.map_or_else(|| "?".to_string(), |v| format!("{v:?}"))
}

/// What the plaintext EHLO reply offers, for `test-channel` and debug logs (only the
/// reply after TLS counts for AUTH and the rest).
fn plain_features(ehlo: &starttls::PlainReply) -> String {
    let name = ehlo.lines.first().map(String::as_str).unwrap_or("");
    let name = name.split_whitespace().next().unwrap_or("?");
    format!("{name} offers STARTTLS")
}

/// The extensions we care about, for `test-channel` and debug logs.
fn features(smtp: &AsyncSmtpConnection) -> String {
    let info = smtp.server_info();
    let mut list: Vec<String> = [
        Extension::StartTls,
        Extension::EightBitMime,
        Extension::SmtpUtfEight,
    ]
    .into_iter()
    .filter(|e| info.supports_feature(*e))
    .map(|e| e.to_string())
    .collect();
    let mechanisms: Vec<String> = [Mechanism::Plain, Mechanism::Login, Mechanism::Xoauth2]
        .into_iter()
        .filter(|m| info.supports_auth_mechanism(*m))
        .map(|m| m.to_string())
        .collect();
    if !mechanisms.is_empty() {
        list.push(format!("AUTH {}", mechanisms.join(" ")));
    }
    format!(
        "{} offers {}",
        info.name(),
        if list.is_empty() {
            "no extensions we use".into()
        } else {
            list.join(", ")
        }
    )
}

fn tls_name(mode: TlsMode) -> &'static str {
    match mode {
        TlsMode::Starttls => "starttls",
        TlsMode::Implicit => "implicit",
        TlsMode::None => "none",
    }
}

/// Our own rustls client (STARTTLS and implicit TLS): webpki roots plus `ca_file`, ring
/// provider.
fn rustls_tls(
    extra_roots: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<TlsConnector, String> {
    let mut roots =
        rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra_roots {
        roots
            .add(cert.clone())
            .map_err(|e| format!("ca_file: {e}"))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}
