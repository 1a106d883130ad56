//! Client AUTH PLAIN / LOGIN against `[[users]]` (argon2 hashes).
//!
//! The session drives the exchange: [`start`] on the `AUTH` command, then
//! [`Exchange::respond`] for each line the client sends after a `334` challenge,
//! until [`Progress::Done`] hands over the credentials for [`verify`].
//! Nothing here logs: the payloads carry passwords.
//!
//! Guessing is slowed here too: argon2 verifications run at most one per core at a
//! time ([`verify`]), and [`FailedLogins`] counts failures per client address.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::config::{Secret, User};
use crate::smtp::reply::{Reply, Syntax};

/// The SASL mechanisms mailgate offers to its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// RFC 4616: `authzid NUL authcid NUL password`, base64.
    Plain,
    /// The de-facto LOGIN: user name and password in two base64 answers.
    Login,
}

impl Mechanism {
    /// The mechanism for an smtp-proto `AUTH_*` flag, if mailgate supports it.
    pub fn from_flag(flag: u64) -> Option<Self> {
        match flag {
            smtp_proto::AUTH_PLAIN => Some(Mechanism::Plain),
            smtp_proto::AUTH_LOGIN => Some(Mechanism::Login),
            _ => None,
        }
    }
}

/// A user name and password sent by a client.
#[derive(Clone)]
pub struct Credentials {
    /// Login name.
    pub username: String,
    /// The password as sent.
    pub password: Secret,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &self.password)
            .finish()
    }
}

/// An AUTH exchange waiting for the client's next line.
#[derive(Debug)]
pub struct Exchange(Waiting);

#[derive(Debug)]
enum Waiting {
    /// PLAIN without initial response: the whole credentials.
    Plain,
    /// LOGIN: the user name.
    LoginUsername,
    /// LOGIN: the password for this user name.
    LoginPassword(String),
}

/// Where an exchange stands after a step.
#[derive(Debug)]
pub enum Progress {
    /// Send this `334` challenge and feed the client's answer to the exchange.
    Challenge(Exchange, Reply),
    /// The client has sent its credentials.
    Done(Credentials),
}

/// `334 VXNlcm5hbWU6` ("Username:").
const USERNAME_CHALLENGE: &str = "VXNlcm5hbWU6";
/// `334 UGFzc3dvcmQ6` ("Password:").
const PASSWORD_CHALLENGE: &str = "UGFzc3dvcmQ6";

/// Starts an exchange for `AUTH <mechanism> [initial-response]` (empty string: none).
pub fn start(mechanism: Mechanism, initial_response: &str) -> Result<Progress, Reply> {
    let initial = initial_response.trim();
    match (mechanism, initial) {
        (Mechanism::Plain, "") => Ok(Progress::Challenge(
            Exchange(Waiting::Plain),
            Reply::auth_challenge(""),
        )),
        (Mechanism::Plain, _) => Exchange(Waiting::Plain).respond(initial),
        (Mechanism::Login, "") => Ok(Progress::Challenge(
            Exchange(Waiting::LoginUsername),
            Reply::auth_challenge(USERNAME_CHALLENGE),
        )),
        (Mechanism::Login, _) => Exchange(Waiting::LoginUsername).respond(initial),
    }
}

impl Exchange {
    /// Takes the client's answer to the last challenge (one line, without CRLF).
    /// `*` cancels the exchange (`501 5.7.0`).
    pub fn respond(self, line: &str) -> Result<Progress, Reply> {
        let line = line.trim();
        if line == "*" {
            return Err(Reply::auth_cancelled());
        }
        let decoded = decode(line)?;
        match self.0 {
            Waiting::Plain => parse_plain(&decoded).map(Progress::Done),
            Waiting::LoginUsername => {
                let username = utf8(decoded)?;
                Ok(Progress::Challenge(
                    Exchange(Waiting::LoginPassword(username)),
                    Reply::auth_challenge(PASSWORD_CHALLENGE),
                ))
            }
            Waiting::LoginPassword(username) => {
                let password = Secret::new(utf8(decoded)?);
                Ok(Progress::Done(Credentials { username, password }))
            }
        }
    }
}

/// Base64 of an AUTH line; `=` is the empty response (RFC 4954).
fn decode(line: &str) -> Result<Vec<u8>, Reply> {
    if line == "=" {
        return Ok(Vec::new());
    }
    STANDARD
        .decode(line)
        .map_err(|_| Reply::bad_parameters(Syntax::AuthBase64))
}

fn utf8(bytes: Vec<u8>) -> Result<String, Reply> {
    String::from_utf8(bytes).map_err(|_| Reply::bad_parameters(Syntax::AuthNotUtf8))
}

/// `authzid NUL authcid NUL password`; an authzid other than the user's own is refused.
fn parse_plain(decoded: &[u8]) -> Result<Credentials, Reply> {
    let mut parts = decoded.split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Reply::bad_parameters(Syntax::AuthPlainMalformed));
    };
    if !authzid.is_empty() && authzid != authcid {
        return Err(Reply::auth_failed());
    }
    let username = utf8(authcid.to_vec())?;
    let password = Secret::new(utf8(password.to_vec())?);
    Ok(Credentials { username, password })
}

/// Checks credentials against `users`; returns the user's name when they match.
/// The argon2 work runs on the blocking pool, at most one verification per core at a
/// time (each takes 19 MiB and a core: a login flood must not starve spool commits);
/// an unknown user costs as much as a wrong password so that timing does not reveal
/// which names exist.
pub async fn verify(users: &[User], credentials: Credentials) -> Option<String> {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    VERIFIER
        .get_or_init(|| Verifier::new(cores))
        .verify(users, credentials)
        .await
}

/// Runs argon2 verifications, at most `permits` at a time.
struct Verifier {
    permits: tokio::sync::Semaphore,
}

impl Verifier {
    fn new(permits: usize) -> Self {
        Verifier {
            permits: tokio::sync::Semaphore::new(permits.max(1)),
        }
    }

    async fn verify(&self, users: &[User], credentials: Credentials) -> Option<String> {
        let user = users.iter().find(|u| u.name == credentials.username);
        let hash = match user {
            Some(u) => u.password_hash.expose().to_string(),
            None => dummy_hash().to_string(),
        };
        // The semaphore is never closed, so acquiring only waits.
        let _permit = self.permits.acquire().await.ok()?;
        let matches = tokio::task::spawn_blocking(move || {
            password_matches(&hash, credentials.password.expose())
        })
        .await
        .unwrap_or(false);
        match user {
            Some(u) if matches => Some(u.name.clone()),
            _ => None,
        }
    }
}

/// Failed logins that lock an address out of AUTH (SPEC §5).
pub const MAX_FAILURES: u32 = 10;
/// The window those failures are counted in, and how long the lock-out lasts.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(600);
/// Most addresses remembered; beyond, the oldest windows are forgotten first.
const MAX_ADDRESSES: usize = 10_000;

/// Failed AUTH per client address, shared by all sessions: after [`MAX_FAILURES`]
/// within [`FAILURE_WINDOW`] of the first one, the address may not AUTH until that
/// window has passed. IPv6 clients count per /64 (one host usually has a whole /64).
/// Bounded: expired windows are dropped, and at the cap the oldest window goes.
/// Time is passed in, so the logic is tested without waiting.
pub struct FailedLogins {
    windows: Mutex<HashMap<IpAddr, Window>>,
    cap: usize,
}

/// Failures of one address since `start`.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    failures: u32,
}

impl Default for FailedLogins {
    fn default() -> Self {
        Self::with_cap(MAX_ADDRESSES)
    }
}

impl FailedLogins {
    fn with_cap(cap: usize) -> Self {
        FailedLogins {
            windows: Mutex::new(HashMap::new()),
            cap: cap.max(1),
        }
    }

    /// Whether `ip` is locked out of AUTH at `now`.
    pub fn locked(&self, ip: IpAddr, now: Instant) -> bool {
        let windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        windows
            .get(&key(ip))
            .is_some_and(|w| w.failures >= MAX_FAILURES && now < w.start + FAILURE_WINDOW)
    }

    /// Counts a failed AUTH from `ip` at `now`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let key = key(ip);
        if let Some(w) = windows.get_mut(&key) {
            if now < w.start + FAILURE_WINDOW {
                w.failures = w.failures.saturating_add(1);
            } else {
                *w = Window {
                    start: now,
                    failures: 1,
                };
            }
            return;
        }
        if windows.len() >= self.cap {
            windows.retain(|_, w| now < w.start + FAILURE_WINDOW);
        }
        if windows.len() >= self.cap
            && let Some(oldest) = windows.iter().min_by_key(|(_, w)| w.start).map(|(k, _)| *k)
        {
            windows.remove(&oldest);
        }
        windows.insert(
            key,
            Window {
                start: now,
                failures: 1,
            },
        );
    }

    /// How many addresses are remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.windows.lock().unwrap().len()
    }
}

/// The address failures are counted under: IPv4 as is (also when mapped into IPv6),
/// IPv6 by its /64.
fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// How long to hold the answer to a session's `failures`-th failed AUTH: 1 s,
/// doubling, at most 8 s (SPEC §5).
pub fn failure_delay(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(3);
    Duration::from_secs(1 << exponent)
}

/// Whether `password` matches the PHC string `hash` (false for an unreadable hash).
fn password_matches(hash: &str, password: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => {
            tracing::warn!("a [[users]] password_hash is not a valid argon2 PHC string");
            false
        }
    }
}

fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| hash_password("mailgate: no such user"))
}

/// Hashes a password for `[[users]] password_hash` (argon2id, default cost, random salt).
pub fn hash_password(password: &str) -> String {
    hash_with(&Argon2::default(), password)
}

/// A low-cost hash for tests (verification reads the cost from the PHC string).
#[cfg(test)]
pub(crate) fn cheap_hash(password: &str) -> String {
    use argon2::{Algorithm, Params, Version};
    let params = Params::new(64, 1, 1, None).expect("valid argon2 test parameters");
    hash_with(
        &Argon2::new(Algorithm::Argon2id, Version::V0x13, params),
        password,
    )
}

fn hash_with(argon2: &Argon2<'_>, password: &str) -> String {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    argon2
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 hashing with a valid salt and default output length cannot fail")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    fn users() -> Vec<User> {
        vec![User {
            name: "app".into(),
            password_hash: Secret::new(cheap_hash("s3cret pass")),
            senders: Vec::new(),
        }]
    }

    fn b64(bytes: &[u8]) -> String {
        STANDARD.encode(bytes)
    }

    fn done(progress: Result<Progress, Reply>) -> Credentials {
        match progress {
            Ok(Progress::Done(c)) => c,
            other => panic!("expected credentials, got {other:?}"),
        }
    }

    fn challenge(progress: Result<Progress, Reply>) -> (Exchange, String) {
        match progress {
            Ok(Progress::Challenge(exchange, reply)) => {
                assert_eq!(reply.code, 334);
                (exchange, reply.text)
            }
            other => panic!("expected a challenge, got {other:?}"),
        }
    }

    fn refusal(progress: Result<Progress, Reply>) -> String {
        match progress {
            Err(reply) => reply.to_string(),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn plain_with_initial_response() {
        let c = done(start(Mechanism::Plain, &b64(b"\0app\0s3cret pass")));
        assert_eq!(c.username, "app");
        assert_eq!(c.password.expose(), "s3cret pass");
    }

    #[test]
    fn plain_with_matching_authzid() {
        let c = done(start(Mechanism::Plain, &b64(b"app\0app\0pw")));
        assert_eq!(c.username, "app");
    }

    #[test]
    fn plain_with_foreign_authzid_is_refused() {
        assert!(refusal(start(Mechanism::Plain, &b64(b"root\0app\0pw"))).starts_with("535 5.7.8"));
    }

    #[test]
    fn plain_without_initial_response_asks_for_it() {
        let (exchange, text) = challenge(start(Mechanism::Plain, ""));
        assert_eq!(text, "");
        let c = done(exchange.respond(&b64(b"\0app\0pw")));
        assert_eq!((c.username.as_str(), c.password.expose()), ("app", "pw"));
    }

    #[test]
    fn plain_malformed_is_a_syntax_error() {
        assert!(refusal(start(Mechanism::Plain, &b64(b"app\0pw"))).starts_with("501 5.5.4"));
        assert!(refusal(start(Mechanism::Plain, &b64(b"\0a\0b\0c"))).starts_with("501 5.5.4"));
        assert!(refusal(start(Mechanism::Plain, "not base64!")).starts_with("501 5.5.4"));
        assert!(refusal(start(Mechanism::Plain, "=")).starts_with("501 5.5.4"));
    }

    #[test]
    fn login_asks_for_user_then_password() {
        let (exchange, text) = challenge(start(Mechanism::Login, ""));
        assert_eq!(STANDARD.decode(text).unwrap(), b"Username:");
        let (exchange, text) = challenge(exchange.respond(&b64(b"app")));
        assert_eq!(STANDARD.decode(text).unwrap(), b"Password:");
        let c = done(exchange.respond(&b64(b"pw")));
        assert_eq!((c.username.as_str(), c.password.expose()), ("app", "pw"));
    }

    #[test]
    fn login_with_initial_user_name() {
        let (exchange, text) = challenge(start(Mechanism::Login, &b64(b"app")));
        assert_eq!(text, PASSWORD_CHALLENGE);
        assert_eq!(done(exchange.respond(&b64(b"pw"))).username, "app");
    }

    #[test]
    fn star_cancels() {
        let (exchange, _) = challenge(start(Mechanism::Login, ""));
        assert!(refusal(exchange.respond("*")).starts_with("501 5.7.0"));
        let (exchange, _) = challenge(start(Mechanism::Plain, ""));
        assert!(refusal(exchange.respond(" *\r")).starts_with("501 5.7.0"));
    }

    #[test]
    fn debug_hides_the_password() {
        let c = done(start(Mechanism::Plain, &b64(b"\0app\0hunter2")));
        let shown = format!("{c:?}");
        assert!(
            shown.contains("app") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn mechanism_flags() {
        assert_eq!(
            Mechanism::from_flag(smtp_proto::AUTH_PLAIN),
            Some(Mechanism::Plain)
        );
        assert_eq!(
            Mechanism::from_flag(smtp_proto::AUTH_LOGIN),
            Some(Mechanism::Login)
        );
        assert_eq!(Mechanism::from_flag(smtp_proto::AUTH_CRAM_MD5), None);
    }

    #[tokio::test]
    async fn verify_accepts_the_right_password_only() {
        let users = users();
        let creds = |u: &str, p: &str| Credentials {
            username: u.into(),
            password: Secret::new(p),
        };
        assert_eq!(
            verify(&users, creds("app", "s3cret pass")).await.as_deref(),
            Some("app")
        );
        assert_eq!(verify(&users, creds("app", "s3cret pas")).await, None);
        assert_eq!(verify(&users, creds("App", "s3cret pass")).await, None);
        assert_eq!(verify(&users, creds("nobody", "s3cret pass")).await, None);
    }

    #[tokio::test]
    async fn verify_refuses_an_unreadable_hash() {
        let users = vec![User {
            name: "x".into(),
            password_hash: Secret::new("plain text"),
            senders: Vec::new(),
        }];
        let creds = Credentials {
            username: "x".into(),
            password: Secret::new("plain text"),
        };
        assert_eq!(verify(&users, creds).await, None);
    }

    #[tokio::test]
    async fn verifications_wait_for_a_free_core() {
        let verifier = Verifier::new(1);
        let creds = || Credentials {
            username: "app".into(),
            password: Secret::new("s3cret pass"),
        };
        let users = users();
        let busy = verifier.permits.acquire().await.unwrap();
        let waiting =
            tokio::time::timeout(Duration::from_millis(300), verifier.verify(&users, creds()));
        assert!(waiting.await.is_err(), "ran without a free permit");
        drop(busy);
        assert_eq!(
            verifier.verify(&users, creds()).await.as_deref(),
            Some("app")
        );
    }

    #[test]
    fn ten_failures_lock_an_address_out_for_the_window() {
        let logins = FailedLogins::default();
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for i in 0..9 {
            logins.failed(a, t0 + Duration::from_secs(i * 60));
            assert!(!logins.locked(a, t0 + Duration::from_secs(i * 60)));
        }
        let tenth = t0 + Duration::from_secs(590);
        logins.failed(a, tenth);
        assert!(logins.locked(a, tenth));
        assert!(logins.locked(a, t0 + Duration::from_secs(599)));
        assert!(!logins.locked(b, tenth), "other addresses are not affected");
        // Mapped IPv4 is the same client.
        assert!(logins.locked("::ffff:192.0.2.1".parse().unwrap(), tenth));
        // The window passes: free again, and counting starts over.
        let later = t0 + FAILURE_WINDOW;
        assert!(!logins.locked(a, later));
        logins.failed(a, later);
        assert!(!logins.locked(a, later));
    }

    #[test]
    fn failures_spread_over_more_than_the_window_do_not_lock() {
        let logins = FailedLogins::default();
        let t0 = Instant::now();
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        for i in 0..20 {
            let t = t0 + Duration::from_secs(i * 120);
            logins.failed(a, t);
            assert!(!logins.locked(a, t), "failure {i}");
        }
        // One IPv6 /64 is one client.
        for _ in 0..10 {
            logins.failed(
                "2001:db8::2".parse().unwrap(),
                t0 + Duration::from_secs(2400),
            );
        }
        assert!(logins.locked(a, t0 + Duration::from_secs(2400)));
        assert!(!logins.locked("2001:db8:0:1::1".parse().unwrap(), t0));
    }

    #[test]
    fn the_table_is_bounded() {
        let logins = FailedLogins::with_cap(3);
        let t0 = Instant::now();
        let ip = |n: u8| IpAddr::from([192, 0, 2, n]);
        for n in 0..3 {
            logins.failed(ip(n), t0 + Duration::from_secs(u64::from(n)));
        }
        logins.failed(ip(9), t0 + Duration::from_secs(10));
        assert_eq!(logins.len(), 3, "the oldest window made room");
        // Expired windows go first, all of them.
        logins.failed(ip(10), t0 + FAILURE_WINDOW + Duration::from_secs(5));
        assert_eq!(logins.len(), 2);
        for _ in 0..10 {
            logins.failed(ip(9), t0 + Duration::from_secs(20));
        }
        assert!(logins.locked(ip(9), t0 + Duration::from_secs(20)));
    }

    #[test]
    fn failure_delays_double_up_to_eight_seconds() {
        let secs: Vec<u64> = (1..=6).map(|n| failure_delay(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 8, 8]);
        assert_eq!(failure_delay(u32::MAX).as_secs(), 8);
    }

    #[test]
    fn hash_password_is_salted_argon2id() {
        let a = hash_password("pw");
        let b = hash_password("pw");
        assert!(a.starts_with("$argon2id$"), "{a}");
        assert_ne!(a, b, "random salt");
        assert!(password_matches(&a, "pw"));
        assert!(!password_matches(&a, "pW"));
    }
}
