//! The OAuth core against the local token endpoint (`testkit::token_endpoint`): grants,
//! the cache, rotation, failures, and both `authorize` flows. Nothing contacts a provider.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncWriteExt, BufReader};

use super::*;
use crate::config::Secret;
use crate::config::oauth::{Grant, OAuth, Provider, TokenSource};
use crate::testkit::token_endpoint::{
    CLIENT_ID, CLIENT_SECRET, Failure, INITIAL_REFRESH_TOKEN, TokenEndpoint,
};

fn settings(ep: &TokenEndpoint, provider: Provider, grant: Grant) -> OAuth {
    let delegated = grant == Grant::RefreshToken;
    OAuth {
        provider,
        grant,
        tenant: if provider == Provider::Microsoft {
            "example.com".into()
        } else {
            String::new()
        },
        client_id: CLIENT_ID.to_string(),
        // Microsoft delegated apps are public clients here; Google and app-only need one.
        client_secret: (provider == Provider::Google || !delegated)
            .then(|| Secret::new(CLIENT_SECRET)),
        refresh_token: delegated.then(|| Secret::new(INITIAL_REFRESH_TOKEN)),
        refresh_token_source: if delegated {
            TokenSource::Literal
        } else {
            TokenSource::None
        },
        scope: "https://outlook.office.com/SMTP.Send offline_access".to_string(),
        token_url: ep.token_url(),
        auth_url: ep.auth_url(),
        device_url: ep.device_url(),
        graph_url: "http://127.0.0.1:9".to_string(),
    }
}

fn http() -> Http {
    Http::with_timeout(None, Duration::from_secs(5)).unwrap()
}

fn cache(settings: OAuth, state_dir: &Path) -> ChannelToken {
    ChannelToken::new(
        "alice",
        settings,
        http(),
        Arc::new(LocalTokenStore::new(state_dir)),
    )
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A `Write` (and tracing writer) whose bytes the test reads while a flow runs.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// `authorize` with nothing on stdin, its output captured.
async fn authorize_headless(
    channel: &str,
    oauth: &OAuth,
    store: &LocalTokenStore,
) -> (Result<Authorized, String>, Captured) {
    let mut output = Captured::default();
    let done = authorize(
        channel,
        oauth,
        &http(),
        store,
        tokio::io::empty(),
        &mut output,
    )
    .await;
    (done, output)
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line of this thread, at every level, goes to the returned buffer.
fn capture_logs() -> (Captured, tracing::subscriber::DefaultGuard) {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (logs, tracing::subscriber::set_default(subscriber))
}

fn assert_no_secret(text: &str, secrets: &[String]) {
    for secret in secrets {
        assert!(
            !text.contains(secret.as_str()),
            "secret {secret:?} leaked into:\n{text}"
        );
    }
}

#[tokio::test]
async fn refresh_grant_microsoft_issues_a_valid_token() {
    let ep = TokenEndpoint::start().await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = cache(
        settings(&ep, Provider::Microsoft, Grant::RefreshToken),
        dir.path(),
    );
    let token = tokens.access_token().await.unwrap();
    assert!(ep.is_valid(token.expose()));
    assert_eq!(ep.requests("refresh_token"), 1);
    assert_eq!(tokens.refresh_counts(), (1, 0));
}

#[tokio::test]
async fn refresh_grant_google_issues_a_valid_token() {
    let ep = TokenEndpoint::start().await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = cache(
        settings(&ep, Provider::Google, Grant::RefreshToken),
        dir.path(),
    );
    let token = tokens.access_token().await.unwrap();
    assert!(ep.is_valid(token.expose()));
    assert_eq!(ep.requests("refresh_token"), 1);
}

#[tokio::test]
async fn client_credentials_grant_issues_a_valid_token_and_a_wrong_secret_breaks() {
    let ep = TokenEndpoint::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut app = settings(&ep, Provider::Microsoft, Grant::ClientCredentials);
    let tokens = cache(app.clone(), dir.path());
    let token = tokens.access_token().await.unwrap();
    assert!(ep.is_valid(token.expose()));
    assert_eq!(ep.requests("client_credentials"), 1);
    assert_eq!(ep.requests("refresh_token"), 0);

    app.client_secret = Some(Secret::new("wrong-secret-value"));
    let err = cache(app, dir.path()).access_token().await.unwrap_err();
    assert_eq!(err.code(), Some("invalid_client"), "{err}");
    assert!(
        err.to_string().contains("mailgate oauth authorize alice"),
        "{err}"
    );
}

#[tokio::test]
async fn ten_sequential_requests_make_one_endpoint_call() {
    let ep = TokenEndpoint::start().await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = cache(
        settings(&ep, Provider::Microsoft, Grant::RefreshToken),
        dir.path(),
    );
    let first = tokens.access_token().await.unwrap();
    for _ in 0..9 {
        assert_eq!(tokens.access_token().await.unwrap(), first);
    }
    assert_eq!(ep.requests("refresh_token"), 1);
}

#[tokio::test]
async fn a_token_expiring_within_ten_minutes_is_refreshed() {
    let ep = TokenEndpoint::start().await;
    ep.set_lifetime(Duration::from_secs(599));
    let dir = tempfile::tempdir().unwrap();
    let tokens = cache(
        settings(&ep, Provider::Microsoft, Grant::RefreshToken),
        dir.path(),
    );
    let a = tokens.access_token().await.unwrap();
    let b = tokens.access_token().await.unwrap();
    assert_ne!(a, b);
    assert_eq!(ep.requests("refresh_token"), 2);

    ep.set_lifetime(Duration::from_secs(700));
    tokens.access_token().await.unwrap();
    tokens.access_token().await.unwrap();
    assert_eq!(ep.requests("refresh_token"), 3);
}

#[tokio::test]
async fn a_cached_token_is_refreshed_once_it_nears_expiry() {
    let ep = TokenEndpoint::start().await;
    ep.set_lifetime(Duration::from_secs(2));
    let dir = tempfile::tempdir().unwrap();
    let tokens = ChannelToken::with_margin(
        "alice",
        settings(&ep, Provider::Microsoft, Grant::RefreshToken),
        http(),
        Arc::new(LocalTokenStore::new(dir.path())),
        Duration::from_secs(1),
    );
    let a = tokens.access_token().await.unwrap();
    assert_eq!(tokens.access_token().await.unwrap(), a);
    assert_eq!(ep.requests("refresh_token"), 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let b = tokens.access_token().await.unwrap();
    assert_ne!(a, b);
    assert_eq!(ep.requests("refresh_token"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_callers_share_one_refresh() {
    let ep = TokenEndpoint::start().await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = cache(
        settings(&ep, Provider::Microsoft, Grant::RefreshToken),
        dir.path(),
    );
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let tokens = tokens.clone();
            tokio::spawn(async move { tokens.access_token().await.unwrap() })
        })
        .collect();
    let mut got = Vec::new();
    for task in tasks {
        got.push(task.await.unwrap());
    }
    assert!(got.iter().all(|t| *t == got[0]));
    assert_eq!(ep.requests("refresh_token"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_one_failed_refresh_too() {
    let ep = TokenEndpoint::start().await;
    // The failure takes a while, so that the other callers surely ask while it is in
    // flight: on a loaded machine a task may first run long after it was spawned.
    ep.set_failure(Some(Failure::SlowStatus(503, Duration::from_millis(800))));
    let dir = tempfile::tempdir().unwrap();
    let tokens = cache(
        settings(&ep, Provider::Microsoft, Grant::RefreshToken),
        dir.path(),
    );
    let spawn = || {
        let tokens = tokens.clone();
        tokio::spawn(async move { tokens.access_token().await })
    };
    let mut tasks = vec![spawn()];
    let deadline = Instant::now() + Duration::from_secs(10);
    while ep.requests("refresh_token") == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tasks.extend((0..9).map(|_| spawn()));
    for task in tasks {
        assert!(task.await.unwrap().unwrap_err().is_transient());
    }
    // Callers already waiting take the answer of the refresh they waited for.
    assert_eq!(ep.requests("refresh_token"), 1);
}

#[tokio::test]
async fn a_rotated_refresh_token_is_written_to_the_refresh_token_file_with_mode_0600() {
    let ep = TokenEndpoint::start().await;
    ep.set_rotate(true);
    ep.set_lifetime(Duration::from_secs(60)); // within the margin: every call refreshes
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secrets/alice.token");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, format!("{INITIAL_REFRESH_TOKEN}\n")).unwrap();
    let mut oauth = settings(&ep, Provider::Microsoft, Grant::RefreshToken);
    oauth.refresh_token_source = TokenSource::File(file.clone());
    let tokens = cache(oauth, &dir.path().join("state"));

    tokens.access_token().await.unwrap();
    let stored = std::fs::read_to_string(&file).unwrap();
    let stored = stored.trim_end();
    assert_ne!(stored, INITIAL_REFRESH_TOKEN);
    assert!(ep.refresh_token_is_valid(stored));
    assert!(!ep.refresh_token_is_valid(INITIAL_REFRESH_TOKEN));
    assert_eq!(mode(&file), 0o600);
    assert!(
        !dir.path().join("state").exists(),
        "the state store is not used"
    );

    // The next refresh reads the file afresh and works with the rotated token.
    tokens.access_token().await.unwrap();
    let again = std::fs::read_to_string(&file).unwrap();
    assert_ne!(again.trim_end(), stored);
    assert!(ep.refresh_token_is_valid(again.trim_end()));

    // `authorize` (or the operator) rewriting the file is picked up too.
    ep.add_refresh_token("rt-written-by-hand-77");
    std::fs::write(&file, "rt-written-by-hand-77\n").unwrap();
    tokens.access_token().await.unwrap();
    assert!(
        !ep.refresh_token_is_valid("rt-written-by-hand-77"),
        "it was used (and rotated)"
    );
}

#[tokio::test]
async fn a_rotated_refresh_token_goes_to_the_state_store_which_then_wins() {
    let ep = TokenEndpoint::start().await;
    ep.set_rotate(true);
    ep.set_lifetime(Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("spool/state");
    let tokens = cache(
        settings(&ep, Provider::Microsoft, Grant::RefreshToken),
        &state,
    );

    tokens.access_token().await.unwrap();
    let path = state.join("alice.oauth.json");
    assert_eq!(mode(&path), 0o600);
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let stored = json["refresh_token"].as_str().unwrap().to_string();
    assert!(ep.refresh_token_is_valid(&stored));
    // The literal from the config is revoked now: only the stored token can work.
    tokens.access_token().await.unwrap();
    assert_eq!(ep.requests("refresh_token"), 2);
    // A new process (fresh cache, same config) starts from the stored token too.
    cache(
        settings(&ep, Provider::Microsoft, Grant::RefreshToken),
        &state,
    )
    .access_token()
    .await
    .unwrap();
}

#[tokio::test]
async fn force_refresh_refreshes_exactly_once_per_stale_token() {
    let ep = TokenEndpoint::start().await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = cache(
        settings(&ep, Provider::Microsoft, Grant::RefreshToken),
        dir.path(),
    );
    let t1 = tokens.access_token().await.unwrap();
    let t2 = tokens.force_refresh(&t1).await.unwrap();
    assert_ne!(t1, t2);
    assert_eq!(ep.requests("refresh_token"), 2);
    // A second connection that was refused with t1 gets t2 without another call.
    assert_eq!(tokens.force_refresh(&t1).await.unwrap(), t2);
    assert_eq!(ep.requests("refresh_token"), 2);
    assert_eq!(tokens.access_token().await.unwrap(), t2);
    let t3 = tokens.force_refresh(&t2).await.unwrap();
    assert_ne!(t2, t3);
    assert_eq!(ep.requests("refresh_token"), 3);
}

#[tokio::test]
async fn invalid_grant_breaks_the_channel_with_the_authorize_hint() {
    let ep = TokenEndpoint::start().await;
    ep.set_failure(Some(Failure::InvalidGrant));
    let dir = tempfile::tempdir().unwrap();
    let err = cache(
        settings(&ep, Provider::Microsoft, Grant::RefreshToken),
        dir.path(),
    )
    .access_token()
    .await
    .unwrap_err();
    assert!(!err.is_transient());
    assert_eq!(err.code(), Some("invalid_grant"));
    let text = err.to_string();
    assert!(
        text.contains("re-run `mailgate oauth authorize alice`"),
        "{text}"
    );
    assert!(!text.contains("Testing"), "{text}");
    assert!(
        text.contains("AADSTS70000"),
        "the provider's description is kept: {text}"
    );
    assert!(!text.contains("Trace ID"), "first line only: {text}");
    assert_no_secret(&text, &ep.secrets());
    assert_no_secret(&format!("{err:?}"), &ep.secrets());
}

#[tokio::test]
async fn google_invalid_grant_explains_the_seven_day_testing_status() {
    let ep = TokenEndpoint::start().await;
    ep.set_failure(Some(Failure::InvalidGrant));
    let dir = tempfile::tempdir().unwrap();
    let err = cache(
        settings(&ep, Provider::Google, Grant::RefreshToken),
        dir.path(),
    )
    .access_token()
    .await
    .unwrap_err();
    assert_eq!(err.code(), Some("invalid_grant"));
    let text = err.to_string();
    for needle in [
        "\"Testing\"",
        "7 days",
        "\"In production\"",
        "mailgate oauth authorize alice",
    ] {
        assert!(text.contains(needle), "{needle} missing in {text}");
    }
}

#[tokio::test]
async fn a_channel_without_a_refresh_token_is_broken_until_authorized() {
    let ep = TokenEndpoint::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut oauth = settings(&ep, Provider::Microsoft, Grant::RefreshToken);
    oauth.refresh_token = None;
    oauth.refresh_token_source = TokenSource::File(dir.path().join("missing.token"));
    let err = cache(oauth, dir.path()).access_token().await.unwrap_err();
    assert_eq!(err.code(), Some("no_refresh_token"));
    assert!(
        err.to_string().contains("mailgate oauth authorize alice"),
        "{err}"
    );
    assert_eq!(ep.requests("refresh_token"), 0);
}

#[tokio::test]
async fn endpoint_down_5xx_429_and_timeouts_are_transient() {
    let ep = TokenEndpoint::start().await;
    let dir = tempfile::tempdir().unwrap();
    let oauth = settings(&ep, Provider::Microsoft, Grant::RefreshToken);
    // 407: a proxy between us and the endpoint refused its credentials; the grant is fine.
    for status in [503, 500, 429, 407] {
        ep.set_failure(Some(Failure::Status(status)));
        let err = cache(oauth.clone(), dir.path())
            .access_token()
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{status}: {err}");
        assert!(err.to_string().contains(&status.to_string()), "{err}");
    }

    ep.set_failure(Some(Failure::Hang));
    let impatient = ChannelToken::new(
        "alice",
        oauth.clone(),
        Http::with_timeout(None, Duration::from_millis(500)).unwrap(),
        Arc::new(LocalTokenStore::new(dir.path())),
    );
    let err = impatient.access_token().await.unwrap_err();
    assert!(
        err.is_transient() && err.to_string().contains("timed out"),
        "{err}"
    );

    ep.set_failure(None);
    ep.down();
    let err = cache(oauth, dir.path()).access_token().await.unwrap_err();
    assert!(err.is_transient(), "{err}");
}

#[tokio::test]
async fn a_failed_early_refresh_keeps_the_still_valid_token() {
    let ep = TokenEndpoint::start().await;
    ep.set_lifetime(Duration::from_secs(300)); // refresh due, but valid for minutes
    let dir = tempfile::tempdir().unwrap();
    let tokens = cache(
        settings(&ep, Provider::Microsoft, Grant::RefreshToken),
        dir.path(),
    );
    let a = tokens.access_token().await.unwrap();
    ep.set_failure(Some(Failure::Status(503)));
    assert_eq!(tokens.access_token().await.unwrap(), a);
    assert_eq!(tokens.refresh_counts(), (1, 1));
    // Refused upstream: a stale token is no fall-back.
    assert!(tokens.force_refresh(&a).await.unwrap_err().is_transient());
}

#[test]
fn xoauth2_matches_lettre_and_the_sasl_format() {
    use lettre::transport::smtp::authentication::{Credentials, Mechanism};
    let token = AccessToken::new("ya29.token");
    let ours = xoauth2_initial_response("alice@example.com", &token);
    assert_eq!(
        ours.expose(),
        "user=alice@example.com\x01auth=Bearer ya29.token\x01\x01"
    );
    let credentials = Credentials::new("alice@example.com".into(), "ya29.token".into());
    let lettre = Mechanism::Xoauth2.response(&credentials, None).unwrap();
    assert_eq!(ours.expose(), lettre);
    let command = xoauth2_command("alice@example.com", &token);
    assert_eq!(
        command.expose(),
        "AUTH XOAUTH2 dXNlcj1hbGljZUBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnRva2VuAQE=\r\n"
    );
    assert_eq!(
        format!("{ours} {ours:?} {token} {token:?}"),
        "*** *** *** ***"
    );
}

/// Waits until `output` shows the authorization URL; returns it.
async fn printed_url(output: &Captured) -> String {
    for _ in 0..500 {
        if let Some(line) = output
            .text()
            .lines()
            .find(|l| l.trim_start().starts_with("http://"))
        {
            return line.trim().to_string();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no URL printed: {}", output.text());
}

#[tokio::test]
async fn device_flow_end_to_end_honours_the_interval_and_slow_down() {
    let ep = TokenEndpoint::start().await;
    ep.set_device(0, 2); // pending, pending, slow_down, success
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secrets/alice.token");
    let mut oauth = settings(&ep, Provider::Microsoft, Grant::RefreshToken);
    oauth.refresh_token = None;
    oauth.refresh_token_source = TokenSource::File(file.clone());
    let store = LocalTokenStore::new(dir.path().join("state"));
    let (logs, _guard) = capture_logs();
    let (done, output) = authorize_headless("alice", &oauth, &store).await;
    let done = done.unwrap();
    assert_eq!(
        done,
        Authorized::Stored {
            location: file.display().to_string()
        }
    );
    let text = output.text();
    assert!(
        text.contains("https://microsoft.example/devicelogin"),
        "{text}"
    );
    assert!(text.contains("WDJB-MJHT"), "{text}");

    let polls = ep.device_polls();
    assert_eq!(polls.len(), 4);
    assert!(
        polls[2] - polls[1] >= Duration::from_millis(950),
        "interval 0 is taken as 1 s, never a tight loop"
    );
    assert!(
        polls[3] - polls[2] >= Duration::from_secs(5),
        "slow_down adds 5 s"
    );

    let stored = std::fs::read_to_string(&file).unwrap();
    assert!(ep.refresh_token_is_valid(stored.trim_end()));
    assert_eq!(mode(&file), 0o600);
    // The channel now works from the stored token.
    cache(oauth, dir.path()).access_token().await.unwrap();
    assert_no_secret(&format!("{text}{}", logs.text()), &ep.secrets());
}

#[tokio::test]
async fn device_flow_stops_on_expired_token() {
    // The local endpoint answers expired_token to an unknown device code: a second
    // endpoint's device code makes the first one's polls unknown.
    let ep = TokenEndpoint::start().await;
    let other = TokenEndpoint::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut oauth = settings(&ep, Provider::Microsoft, Grant::RefreshToken);
    oauth.device_url = other.device_url();
    let store = LocalTokenStore::new(dir.path());
    let mut output = Vec::new();
    let err = authorize(
        "alice",
        &oauth,
        &http(),
        &store,
        tokio::io::empty(),
        &mut output,
    )
    .await
    .unwrap_err();
    assert!(err.contains("expired"), "{err}");
    assert_eq!(ep.device_polls().len(), 1, "no polling after expired_token");
    assert_eq!(store.load("alice").await.unwrap(), None);
}

#[tokio::test]
async fn google_loopback_flow_with_the_browser_redirect() {
    let ep = TokenEndpoint::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut oauth = settings(&ep, Provider::Google, Grant::RefreshToken);
    oauth.refresh_token = None;
    oauth.refresh_token_source = TokenSource::None;
    oauth.scope = "https://mail.google.com/".into();
    let store = LocalTokenStore::new(dir.path().join("state"));
    let (_keep_open, input) = tokio::io::duplex(64);
    let mut output = Captured::default();
    let watch = output.clone();
    let http_client = http();
    let flow = authorize(
        "alice",
        &oauth,
        &http_client,
        &store,
        BufReader::new(input),
        &mut output,
    );
    let browser = async {
        let url = printed_url(&watch).await;
        let parsed = reqwest::Url::parse(&url).unwrap();
        let query: std::collections::HashMap<_, _> = parsed.query_pairs().into_owned().collect();
        assert_eq!(query["access_type"], "offline");
        assert_eq!(query["prompt"], "consent");
        assert_eq!(query["code_challenge_method"], "S256");
        assert_eq!(query["scope"], "https://mail.google.com/");
        assert!(query["state"].len() >= 32);
        assert!(query["redirect_uri"].starts_with("http://127.0.0.1:"));
        // A real HTTP client follows the sign-in's 302 to the loopback listener.
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let favicon = format!("{}favicon.ico", query["redirect_uri"]);
        assert_eq!(client.get(favicon).send().await.unwrap().status(), 404);
        let page = client.get(&url).send().await.unwrap();
        assert_eq!(page.status(), 200);
        assert!(
            page.text()
                .await
                .unwrap()
                .contains("authorization received")
        );
    };
    let (done, ()) = tokio::join!(flow, browser);
    let location = store.path("alice").display().to_string();
    assert_eq!(done.unwrap(), Authorized::Stored { location });
    let stored = store.load("alice").await.unwrap().unwrap();
    assert!(ep.refresh_token_is_valid(stored.expose()));
    assert_eq!(mode(&store.path("alice")), 0o600);
    assert_eq!(ep.requests("authorization_code"), 1);
    cache(oauth, &dir.path().join("state"))
        .access_token()
        .await
        .unwrap();
}

#[tokio::test]
async fn google_loopback_flow_with_a_pasted_redirect_url_and_no_secret_leaks() {
    let ep = TokenEndpoint::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut oauth = settings(&ep, Provider::Google, Grant::RefreshToken);
    oauth.refresh_token = None;
    oauth.refresh_token_source = TokenSource::File(dir.path().join("google.token"));
    let store = LocalTokenStore::new(dir.path().join("state"));
    let (mut keyboard, input) = tokio::io::duplex(4096);
    let (logs, _guard) = capture_logs();
    let mut output = Captured::default();
    let watch = output.clone();
    let http_client = http();
    let flow = authorize(
        "alice",
        &oauth,
        &http_client,
        &store,
        BufReader::new(input),
        &mut output,
    );
    let user = async {
        let url = printed_url(&watch).await;
        let redirect = ep.sign_in(&url).unwrap();
        keyboard.write_all(b"not a url\n").await.unwrap();
        keyboard
            .write_all(format!("  {redirect}  \n").as_bytes())
            .await
            .unwrap();
    };
    let (done, ()) = tokio::join!(flow, user);
    done.unwrap();
    assert!(
        output.text().contains("that is not the redirect address"),
        "{}",
        output.text()
    );
    let stored = std::fs::read_to_string(dir.path().join("google.token")).unwrap();
    assert!(ep.refresh_token_is_valid(stored.trim_end()));

    // Use the channel, rotate, break it: nothing secret may reach a log line or an error.
    ep.set_rotate(true);
    let tokens = cache(oauth.clone(), &dir.path().join("state"));
    let token = tokens.access_token().await.unwrap();
    tokens.force_refresh(&token).await.unwrap();
    ep.set_failure(Some(Failure::InvalidGrant));
    let err = tokens
        .force_refresh(&tokens.access_token().await.unwrap())
        .await
        .unwrap_err();
    let everything = format!(
        "{}{}{err}{err:?}{tokens:?}{oauth:?}",
        output.text(),
        logs.text()
    );
    assert!(
        logs.text().contains("OAuth access token refreshed"),
        "logs were captured"
    );
    assert_no_secret(&everything, &ep.secrets());
}

#[tokio::test]
async fn google_loopback_flow_refuses_a_wrong_state() {
    let ep = TokenEndpoint::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut oauth = settings(&ep, Provider::Google, Grant::RefreshToken);
    oauth.refresh_token = None;
    oauth.refresh_token_source = TokenSource::None;
    let store = LocalTokenStore::new(dir.path());
    let (mut keyboard, input) = tokio::io::duplex(4096);
    let mut output = Captured::default();
    let watch = output.clone();
    let http_client = http();
    let flow = authorize(
        "alice",
        &oauth,
        &http_client,
        &store,
        BufReader::new(input),
        &mut output,
    );
    let attacker = async {
        let url = printed_url(&watch).await;
        let redirect = ep.sign_in(&url).unwrap();
        let mut forged = reqwest::Url::parse(&redirect).unwrap();
        let pairs: Vec<(String, String)> = forged
            .query_pairs()
            .into_owned()
            .map(|(k, v)| {
                if k == "state" {
                    (k, "forged".to_string())
                } else {
                    (k, v)
                }
            })
            .collect();
        forged.query_pairs_mut().clear().extend_pairs(pairs);
        keyboard
            .write_all(format!("{forged}\n").as_bytes())
            .await
            .unwrap();
    };
    let (done, ()) = tokio::join!(flow, attacker);
    let err = done.unwrap_err();
    assert!(err.contains("state does not match"), "{err}");
    assert_eq!(
        ep.requests("authorization_code"),
        0,
        "the code was not exchanged"
    );
    assert_eq!(store.load("alice").await.unwrap(), None);
}

#[tokio::test]
async fn authorize_a_client_credentials_channel_only_proves_the_credentials() {
    let ep = TokenEndpoint::start().await;
    let dir = tempfile::tempdir().unwrap();
    let oauth = settings(&ep, Provider::Microsoft, Grant::ClientCredentials);
    let store = LocalTokenStore::new(dir.path());
    let (done, output) = authorize_headless("carol", &oauth, &store).await;
    let done = done.unwrap();
    assert_eq!(
        done,
        Authorized::CredentialsWork {
            expires_in: Duration::from_secs(3600)
        }
    );
    assert!(
        output.text().contains("nothing to authorize"),
        "{}",
        output.text()
    );
    assert_eq!(ep.requests("client_credentials"), 1);
    assert_no_secret(&output.text(), &ep.secrets());
}

#[tokio::test]
async fn https_endpoints_go_through_rustls_on_ring_and_verify_the_certificate() {
    // A local TLS server with a self-signed certificate: the handshake runs (no missing
    // crypto provider, no panic) and the unknown issuer is refused, which is transient.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = crate::tls::generate(dir.path()).unwrap();
    let acceptor = crate::tls::acceptor(&cert, &key).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        acceptor.accept(stream).await.is_err()
    });
    let ep = TokenEndpoint::start().await;
    let mut oauth = settings(&ep, Provider::Microsoft, Grant::RefreshToken);
    oauth.token_url = format!("https://localhost:{port}/token");
    let err = cache(oauth, dir.path()).access_token().await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(server.await.unwrap(), "the client refused the certificate");
    assert_eq!(ep.requests("refresh_token"), 0);
}

#[tokio::test]
async fn a_huge_expires_in_is_clamped_to_a_day_and_the_token_works() {
    let ep = TokenEndpoint::start().await;
    ep.set_expires_in(Some(u64::MAX));
    let dir = tempfile::tempdir().unwrap();
    let tokens = cache(
        settings(&ep, Provider::Microsoft, Grant::RefreshToken),
        dir.path(),
    );
    let token = tokens.access_token().await.unwrap();
    assert!(ep.is_valid(token.expose()));
    let left = tokens.expires_in().await.unwrap();
    assert!(left <= Duration::from_secs(86_400), "{left:?}");
    assert!(left > Duration::from_secs(86_000), "{left:?}");
    // The same one again: cached, not refreshed.
    assert_eq!(tokens.access_token().await.unwrap(), token);
    assert_eq!(ep.requests("refresh_token"), 1);

    // `expires_in: 0`: a second, refreshed at the next use (not in a loop).
    ep.set_expires_in(Some(0));
    let fresh = tokens.force_refresh(&token).await.unwrap();
    assert_ne!(fresh, token);
    assert!(tokens.expires_in().await.unwrap() <= Duration::from_secs(1));
    assert_eq!(ep.requests("refresh_token"), 2);
    tokens.access_token().await.unwrap();
    assert_eq!(ep.requests("refresh_token"), 3);
}

#[tokio::test]
async fn an_oversized_token_answer_is_a_transient_error_read_no_further_than_the_limit() {
    let ep = TokenEndpoint::start().await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = cache(
        settings(&ep, Provider::Microsoft, Grant::RefreshToken),
        dir.path(),
    );
    // A valid token document, just 64 KiB + 1 long, sent chunked (no Content-Length).
    ep.set_failure(Some(Failure::Oversized(64 * 1024 + 1)));
    let err = tokens.access_token().await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("more than 64 KiB"), "{err}");
    // 256 MiB: refused as fast (the read stops at the limit), the endpoint not drained.
    ep.set_failure(Some(Failure::Oversized(256 << 20)));
    let started = Instant::now();
    let err = tokens.access_token().await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // Exactly the limit is still an answer.
    ep.set_failure(Some(Failure::Oversized(64 * 1024)));
    tokens.access_token().await.unwrap();
}

#[tokio::test]
async fn device_flow_with_a_huge_expires_in_waits_at_most_an_hour_and_works() {
    let ep = TokenEndpoint::start().await;
    ep.set_device(0, 0); // slow_down, then success
    ep.set_device_expires_in(u64::MAX);
    let dir = tempfile::tempdir().unwrap();
    let mut oauth = settings(&ep, Provider::Microsoft, Grant::RefreshToken);
    oauth.refresh_token = None;
    oauth.refresh_token_source = TokenSource::None;
    let store = LocalTokenStore::new(dir.path());
    let (done, output) = authorize_headless("alice", &oauth, &store).await;
    done.unwrap();
    let text = output.text();
    assert!(text.contains("valid for 60 minutes"), "{text}");
    let polls = ep.device_polls();
    assert_eq!(polls.len(), 2, "slow_down, then the token");
    assert!(
        polls[1] - polls[0] >= Duration::from_secs(6),
        "slow_down adds 5 s to the 1 s floor"
    );
    assert!(store.load("alice").await.unwrap().is_some());
}

#[tokio::test]
async fn google_loopback_flow_ignores_a_request_with_a_wrong_state_and_keeps_waiting() {
    let ep = TokenEndpoint::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut oauth = settings(&ep, Provider::Google, Grant::RefreshToken);
    oauth.refresh_token = None;
    oauth.refresh_token_source = TokenSource::None;
    let store = LocalTokenStore::new(dir.path().join("state"));
    let (_keep_open, input) = tokio::io::duplex(64);
    let mut output = Captured::default();
    let watch = output.clone();
    let http_client = http();
    let flow = authorize(
        "alice",
        &oauth,
        &http_client,
        &store,
        BufReader::new(input),
        &mut output,
    );
    let browsers = async {
        let url = printed_url(&watch).await;
        let redirect = ep.sign_in(&url).unwrap();
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        // Another local program (or a stale tab) hits the listener first.
        let forged = redirect.replace("state=", "state=forged");
        let page = client.get(&forged).send().await.unwrap();
        assert_eq!(page.status(), 400);
        let no_state = redirect.split('?').next().unwrap().to_string() + "?code=stolen";
        assert_eq!(client.get(&no_state).send().await.unwrap().status(), 400);
        // The real redirect still completes the flow.
        let page = client.get(&redirect).send().await.unwrap();
        assert_eq!(page.status(), 200);
    };
    let (done, ()) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(flow, browsers)
    })
    .await
    .expect("the flow ends");
    let location = store.path("alice").display().to_string();
    assert_eq!(done.unwrap(), Authorized::Stored { location });
    assert!(
        watch.text().contains("wrong or missing state"),
        "{}",
        watch.text()
    );
    assert_eq!(ep.requests("authorization_code"), 1);
}
