//! The command line (SPEC §2): parses arguments, sets up logging, runs one subcommand.
//!
//! Every failure is one clear line on stderr (config problems: one line each) and a
//! non-zero exit.

pub mod check;
pub mod out;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::cli::out::{errln, out, outln};
use crate::config::{self, Config};
use crate::routing;
use crate::smtp::reply::Reply;

/// mailgate: a local SMTP submission proxy that sends each message over the channel its sender is authorized for.
#[derive(Debug, Parser)]
#[command(name = "mailgate", version, about, long_about = None)]
pub struct Cli {
    /// Configuration file [default: $MAILGATE_CONFIG, else ./proxy.toml]
    #[arg(short, long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Log line format
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do (default: run)
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy in the foreground until SIGINT/SIGTERM; SIGHUP reloads the config
    Run,
    /// Load and validate the config; print channels, scopes and the routing table
    Check,
    /// Explain which channel a message from SENDER would take, and why
    Route {
        /// Envelope sender (MAIL FROM)
        sender: String,
        /// Header From: address (default: the envelope sender)
        #[arg(long, value_name = "ADDR")]
        from: Option<String>,
        /// Number of recipients
        #[arg(long, value_name = "N", default_value_t = 1)]
        rcpts: usize,
        /// Client address, for [[rewrite]] entries with networks (default: loopback)
        #[arg(long, value_name = "IP")]
        client: Option<std::net::IpAddr>,
        /// Authenticated [[users]] name, for [[rewrite]] entries with user
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
    },
    /// Connect to a channel's upstream, do TLS and AUTH, send nothing; report each step
    TestChannel {
        /// Channel name ([channels.NAME])
        name: String,
    },
    /// Certificates for the listeners
    Cert {
        /// What to do with certificates
        #[command(subcommand)]
        action: CertAction,
    },
    /// Read a password on stdin, print its argon2id hash for [[users]]
    HashPassword,
    /// The /usr/sbin/sendmail interface: submit one message read on stdin
    #[command(after_help = crate::sendmail::USAGE)]
    Sendmail {
        /// sendmail options, then recipients: [-t] [-i] [-oi] [-f SENDER] [-F NAME] [RCPT...]
        #[arg(allow_hyphen_values = true, trailing_var_arg = true, num_args = 0.., value_name = "ARGS")]
        args: Vec<String>,
    },
    /// Inspect and act on the spool (queue mode); safe while the proxy runs
    Queue {
        /// What to do with the queue
        #[command(subcommand)]
        action: QueueAction,
    },
    /// Counters, channel health and stored tokens of the configured [state] backend
    State {
        /// What to do
        #[command(subcommand)]
        action: StateAction,
    },
    /// OAuth 2.0 for channels that send with XOAUTH2
    Oauth {
        /// What to do
        #[command(subcommand)]
        action: OauthAction,
    },
}

/// `oauth` subcommands.
#[derive(Debug, Subcommand)]
pub enum OauthAction {
    /// Sign in for channel NAME (Microsoft: device code; Google: browser + loopback) and store its refresh token
    Authorize {
        /// Channel name ([channels.NAME])
        name: String,
    },
}

/// `state` subcommands.
#[derive(Debug, Subcommand)]
pub enum StateAction {
    /// Write the state as JSON to FILE (mode 0600) or stdout; it holds refresh tokens
    Export {
        /// Output file (default: stdout)
        file: Option<PathBuf>,
    },
    /// Load the state from FILE (or stdin) into the configured backend (Redis: added to what other hosts counted)
    Import {
        /// Input file (default: stdin)
        file: Option<PathBuf>,
    },
}

/// `queue` subcommands.
#[derive(Debug, Subcommand)]
pub enum QueueAction {
    /// List each channel's state, the queued messages and the failed ones
    List,
    /// Show one message: envelope, recipients and their replies, headers
    Show {
        /// Queue id
        id: String,
    },
    /// Make a message (or every one, --all) due now; broken or held channels resume
    Retry {
        /// Queue id
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every queued message
        #[arg(long)]
        all: bool,
    },
    /// Delete a message from the queue (waits for a delivery in flight) or from failed/
    Delete {
        /// Queue id
        id: String,
    },
}

/// `cert` subcommands.
#[derive(Debug, Subcommand)]
pub enum CertAction {
    /// Write a self-signed certificate and key for localhost
    Generate {
        /// Output folder
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
}

/// Parses the command line, runs the subcommand, returns the exit code.
pub fn main() -> ExitCode {
    let mut argv = std::env::args_os();
    if argv
        .next()
        .is_some_and(|argv0| crate::sendmail::invoked_as_sendmail(&argv0))
    {
        // A symlink named sendmail: every argument is a sendmail argument.
        let args: Vec<String> = argv.map(|a| a.to_string_lossy().into_owned()).collect();
        return crate::sendmail::main_as_sendmail(&args);
    }
    let cli = Cli::parse();
    init_logging(cli.log_format);
    if let Some(Command::Sendmail { args }) = &cli.command {
        let program = "mailgate sendmail";
        return crate::sendmail::main(args, config_path(cli.config), program);
    }
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            errln!("mailgate: {message}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<(), String> {
    let path = config_path(cli.config);
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(&path),
        Command::Check => check(&path),
        Command::Route {
            sender,
            from,
            rcpts,
            client,
            user,
        } => {
            let who = Client {
                ip: client.unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
                user,
            };
            route(&path, &sender, from.as_deref(), rcpts, &who)
        }
        Command::TestChannel { name } => test_channel(&path, &name),
        Command::Cert {
            action: CertAction::Generate { dir },
        } => {
            let (cert, key) = crate::tls::generate(&dir)?;
            outln!("wrote {} and {}", cert.display(), key.display())?;
            Ok(())
        }
        Command::HashPassword => hash_password(),
        Command::Queue { action } => queue_command(&path, action),
        Command::State { action } => state_command(&path, action),
        Command::Sendmail { .. } => unreachable!("handled in main: it has its own exit codes"),
        Command::Oauth {
            action: OauthAction::Authorize { name },
        } => oauth_authorize(&path, &name),
    }
}

fn queue_command(path: &Path, action: QueueAction) -> Result<(), String> {
    use crate::queue::admin;
    let config = load(path)?;
    let out = match action {
        QueueAction::List => admin::list(&config)?,
        QueueAction::Show { id } => admin::show(&config, &id)?,
        QueueAction::Retry { id, .. } => admin::retry(&config, id.as_deref())?,
        QueueAction::Delete { id } => admin::delete(&config, &id)?,
    };
    out!("{out}")?;
    if !out.ends_with('\n') {
        outln!()?;
    }
    Ok(())
}

fn state_command(path: &Path, action: StateAction) -> Result<(), String> {
    use crate::state::transfer;
    let config = load(path)?;
    let now = crate::queue::spool::now_ms();
    match action {
        StateAction::Export { file } => {
            let doc = crate::state::block_on(transfer::export(&config, now))??;
            let mut json = serde_json::to_vec_pretty(&doc).map_err(|e| e.to_string())?;
            json.push(b'\n');
            match file {
                // Refresh tokens inside: private like every token file.
                Some(file) => crate::fsutil::write_private(&file, &json)
                    .map_err(|e| format!("cannot write {}: {e}", file.display()))?,
                None => out::bytes(&json)?,
            }
            errln!("exported the state of {} channel(s)", doc.channels.len());
        }
        StateAction::Import { file } => {
            let text = match &file {
                Some(file) => std::fs::read_to_string(file)
                    .map_err(|e| format!("cannot read {}: {e}", file.display()))?,
                None => std::io::read_to_string(std::io::stdin()).map_err(|e| e.to_string())?,
            };
            let doc: transfer::Document = serde_json::from_str(&text)
                .map_err(|e| format!("not a mailgate state document: {e}"))?;
            let summary = crate::state::block_on(transfer::import(&config, &doc, now))??;
            outln!("{summary}")?;
        }
    }
    Ok(())
}

/// `-c`, else `$MAILGATE_CONFIG`, else `./proxy.toml`.
fn config_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("MAILGATE_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("proxy.toml"))
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("MAILGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Loads the config; on problems, prints every one (one line each) and fails. A file
/// that cannot be read at all is one line (SPEC §2), not a problem and a count.
fn load(path: &Path) -> Result<Config, String> {
    let text = std::fs::read_to_string(path).map_err(|e| unreadable(path, &e))?;
    config::parse(&text, path).map_err(|errors| {
        for line in errors.to_string().lines() {
            errln!("{line}");
        }
        let n = errors.problems.len();
        format!(
            "{}: {n} problem{} found",
            path.display(),
            if n == 1 { "" } else { "s" }
        )
    })
}

/// The one line for a config file that cannot be read.
fn unreadable(path: &Path, e: &std::io::Error) -> String {
    format!(
        "{}: cannot read the configuration file: {e}",
        path.display()
    )
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

fn run(path: &Path) -> Result<(), String> {
    let config = load(path)?;
    warn_if_secrets_readable(&config);
    for warning in &config.warnings {
        tracing::warn!(line = warning.line, "{}", warning.message);
    }
    raise_fd_limit(config.server.max_connections);
    let config = Arc::new(config);
    runtime()?.block_on(async move {
        let shutdown = CancellationToken::new();
        // Installed before anything listens, so a signal right after start-up is ours.
        tokio::spawn(watch_signals(install_signals()?, shutdown.clone()));
        crate::run(config, shutdown).await
    })
}

/// SIGTERM, SIGINT and SIGHUP handlers (must run inside the runtime).
fn install_signals() -> Result<[tokio::signal::unix::Signal; 3], String> {
    use tokio::signal::unix::{SignalKind, signal};
    let install = |kind| signal(kind).map_err(|e| format!("cannot install signal handlers: {e}"));
    Ok([
        install(SignalKind::terminate())?,
        install(SignalKind::interrupt())?,
        install(SignalKind::hangup())?,
    ])
}

/// SIGINT/SIGTERM: graceful stop. SIGHUP is the reload ([`crate::reload`], which has its
/// own handler); it is installed here too so that one arriving during start-up is
/// ignored rather than fatal (its default action).
async fn watch_signals(signals: [tokio::signal::unix::Signal; 3], shutdown: CancellationToken) {
    let [mut term, mut int, _hup] = signals;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("signal received, stopping");
    shutdown.cancel();
}

/// Each client connection may take two descriptors (client and upstream), so the
/// usual soft limit of 1024 is too low for `max_connections = 1000`.
fn raise_fd_limit(max_connections: usize) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < 2 * max_connections as u64 + 64 => tracing::warn!(
            "open-file limit is {limit}: too low for max_connections = {max_connections}; raise it (ulimit -n)"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
    }
}

/// SPEC §9: warn when a file holding literal secrets is readable by others.
fn warn_if_secrets_readable(config: &Config) {
    use std::os::unix::fs::PermissionsExt;
    if !config.has_literal_secrets {
        return;
    }
    if let Ok(meta) = std::fs::metadata(&config.path)
        && meta.permissions().mode() & 0o004 != 0
    {
        tracing::warn!(
            "{} holds literal secrets and is readable by others; chmod o-r it or use *_env / *_file",
            config.path.display()
        );
    }
}

fn check(path: &Path) -> Result<(), String> {
    let config = load(path)?;
    let problems = file_problems(&config);
    for problem in &problems {
        errln!("{}: {problem}", path.display());
    }
    if !problems.is_empty() {
        let n = problems.len();
        let s = if n == 1 { "" } else { "s" };
        return Err(format!("{}: {n} problem{s} found", path.display()));
    }
    for warning in &config.warnings {
        match warning.line {
            Some(line) => errln!("{}:{line}: warning: {}", path.display(), warning.message),
            None => errln!("{}: warning: {}", path.display(), warning.message),
        }
    }
    out!("{}", check::summary(&config))?;
    let uses_http = config
        .channels
        .iter()
        .any(|c| matches!(c.kind, config::ChannelKind::Graph(_)) || c.kind.oauth().is_some());
    if uses_http {
        let proxies = crate::http::Proxies::from_process(config.server.https_proxy.as_ref());
        outln!(
            "outbound HTTP (OAuth tokens, Graph): {}",
            proxies.describe()
        )?;
        // Not an error: the environment is the machine's, and the mail waits in the queue
        // until it is fixed.
        for warning in check::proxy_warnings(&config, &proxies) {
            errln!("{}: warning: {warning}", path.display());
        }
    }
    if let crate::config::StateBackend::Redis(redis) = &config.state {
        let state = crate::state::shared::RedisState::new(redis)?;
        match crate::state::block_on(state.ping())? {
            Ok(()) => outln!("state: shared in Redis {} (reachable)", redis.display)?,
            Err(e) => outln!(
                "state: shared in Redis {} — UNREACHABLE ({}): limited channels wait until it is back",
                redis.display,
                e.0
            )?,
        }
        outln!("channel health (shared):")?;
        for (name, state) in crate::queue::admin::channel_health(&config) {
            outln!("  {name}: {state}")?;
        }
    } else if config.server.spool_dir.join("state").is_dir() {
        outln!("channel health (from the spool):")?;
        for (name, state) in crate::queue::admin::channel_health(&config) {
            outln!("  {name}: {state}")?;
        }
    }
    let unconfigured = crate::queue::admin::unconfigured(&config);
    if !unconfigured.is_empty() {
        outln!("queued mail for channels missing from this config:")?;
        for (name, count) in unconfigured {
            let line = crate::queue::admin::unconfigured_line(count);
            outln!("  {name}: {line}")?;
        }
    }
    outln!("{}: OK", path.display())?;
    Ok(())
}

/// What `run` would still trip over in a config that parsed: the listeners' certificate
/// and key, and the channels' `ca_file`s, must hold usable PEM, not merely exist.
fn file_problems(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(files) = &config.server.tls
        && let Err(e) = crate::tls::acceptor(&files.cert, &files.key)
    {
        problems.push(e);
    }
    crate::tls::install_crypto_provider();
    if let Err(e) = crate::upstream::Upstreams::new(config) {
        problems.push(e);
    }
    problems
}

/// Who `route` pretends to be.
struct Client {
    ip: std::net::IpAddr,
    user: Option<String>,
}

fn route(
    path: &Path,
    sender: &str,
    from: Option<&str>,
    rcpts: usize,
    client: &Client,
) -> Result<(), String> {
    let config = load(path)?;
    let given = sender.trim().trim_start_matches('<').trim_end_matches('>');
    let user = client.user.as_deref();
    if let Some(user) = user
        && !config.users.iter().any(|u| u.name == user)
    {
        return Err(format!("no [[users]] entry named {user:?}"));
    }
    // SPEC §4a: the rewrite comes first; everything after it sees the new sender.
    let rewrite = crate::rewrite::apply(&config.rewrites, given, Some(client.ip), user);
    let sender = match &rewrite {
        Some(r) => {
            outln!("{}", crate::rewrite::explain(&config.rewrites[r.entry], r))?;
            r.sender.as_str()
        }
        None => given,
    };
    if let Some(user) = user
        && let Err(refusal) = routing::authorize_user(&config, user, sender)
    {
        outln!("MAIL FROM:<{sender}> is refused: {}", Reply::from(refusal))?;
        return Err(format!("user {user:?} may not use <{sender}>"));
    }
    let first = match routing::route_sender(&config, sender).map_err(Reply::from) {
        Ok(decision) => decision,
        Err(reply) => {
            outln!("MAIL FROM:<{sender}> is refused: {reply}")?;
            return Err(format!("sender <{sender}> has no channel"));
        }
    };
    outln!(
        "MAIL FROM:<{sender}> → channel {} ({})",
        config.channels[first.channel].name,
        first.reason
    )?;
    let replaced = rewrite
        .as_ref()
        .is_some_and(|r| r.header_from == crate::config::HeaderFrom::Replace);
    let header_from = if replaced {
        sender
    } else {
        from.unwrap_or(given)
    }
    .to_string();
    let headers = routing::Headers {
        from: vec![Some(header_from.clone())],
        has_from: true,
        ..Default::default()
    };
    match routing::route_message(&config, sender, user, rcpts, &headers).map_err(Reply::from) {
        Ok(decision) => {
            outln!(
                "message with From: {header_from} and {rcpts} recipient(s) → channel {} ({})",
                config.channels[decision.channel].name,
                decision.reason
            )?;
            Ok(())
        }
        Err(reply) => {
            outln!(
                "message with From: {header_from} and {rcpts} recipient(s) is refused: {reply}"
            )?;
            Err("the message would be refused".to_string())
        }
    }
}

fn test_channel(path: &Path, name: &str) -> Result<(), String> {
    let config = load(path)?;
    let id = config
        .channel_id(name)
        .ok_or_else(|| format!("no channel named {name:?} in {}", path.display()))?;
    crate::tls::install_crypto_provider();
    let upstreams = crate::upstream::Upstreams::new(&config)?;
    runtime()?.block_on(async move {
        let mut unwritten = Ok(());
        let mut step = |line: &str| {
            if unwritten.is_ok() {
                unwritten = outln!("{name}: {line}");
            }
        };
        let tested = upstreams.test(id, &mut step).await;
        unwritten?;
        match tested {
            Ok(()) => {
                outln!("{name}: OK (nothing was sent)")?;
                Ok(())
            }
            Err(e) => Err(format!("channel {name}: {e}")),
        }
    })
}

/// `oauth authorize NAME`: the flow talks to the terminal (stdin, stdout).
fn oauth_authorize(path: &Path, name: &str) -> Result<(), String> {
    let config = load(path)?;
    let id = config
        .channel_id(name)
        .ok_or_else(|| format!("no channel named {name:?} in {}", path.display()))?;
    let settings = config.channels[id]
        .kind
        .oauth()
        .cloned()
        .ok_or_else(|| format!("channel {name} has no oauth settings: nothing to authorize"))?;
    let http = crate::oauth::Http::new(config.server.https_proxy.as_ref())?;
    let store = crate::state::Backend::of(&config)?.token_store();
    let runtime = runtime()?;
    let done = runtime.block_on(async {
        let input = tokio::io::BufReader::new(tokio::io::stdin());
        let mut output = std::io::stdout();
        crate::oauth::authorize(name, &settings, &http, &*store, input, &mut output).await
    });
    // A read of stdin may still be pending (the browser's redirect won): do not wait for it.
    runtime.shutdown_background();
    done.map(|_| ())
}

fn hash_password() -> Result<(), String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the password from stdin: {e}"))?;
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        return Err("empty password on stdin".to_string());
    }
    outln!("{}", crate::smtp::auth::hash_password(password))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_reads_the_tls_files_and_ca_files_not_only_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = crate::tls::generate(dir.path()).unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not PEM\n").unwrap();
        let text = |cert: &Path, ca: &Path| {
            format!(
                "[server]\ntls_cert = {cert:?}\ntls_key = {key:?}\n\
                 [channels.up]\nhost = \"127.0.0.1\"\ntls = \"none\"\nca_file = {ca:?}\nsenders = [\"*\"]\n"
            )
        };
        let good = config::parse(&text(&cert, &cert), &dir.path().join("p.toml")).unwrap();
        assert_eq!(file_problems(&good), Vec::<String>::new());

        let bad = config::parse(&text(&junk, &junk), &dir.path().join("p.toml")).unwrap();
        let problems = file_problems(&bad);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems.iter().all(|p| p.contains("junk.pem")),
            "{problems:?}"
        );
    }
}
