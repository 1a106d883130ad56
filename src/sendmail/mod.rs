//! `mailgate sendmail` (SPEC §2): the `/usr/sbin/sendmail` interface. Reads one message
//! on stdin and submits it over SMTP to this config's first plain listener, so cron,
//! PHP `mail()`, logwatch and mailx reach mailgate without an SMTP client of their own.
//!
//! It is a client of the running proxy, not part of it: it reads only `[server] listen`
//! and `hostname` from the config, so callers that may not read the channels' secret
//! files (www-data, cron users) and lack the daemon's environment can still submit.
//! The exit status follows sysexits.h; every failure is one line on stderr.

mod args;
mod client;
mod message;

use std::ffi::OsStr;
use std::io::Read;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub use args::{Args, USAGE};

/// Bad arguments, or no recipients.
pub const EX_USAGE: u8 = 64;
/// The message was refused (a 5xx reply).
pub const EX_UNAVAILABLE: u8 = 69;
/// Anything unexpected: a garbled or out-of-sequence reply.
pub const EX_SOFTWARE: u8 = 70;
/// The user running sendmail cannot be found.
pub const EX_NOUSER: u8 = 67;
/// stdin could not be read.
pub const EX_IOERR: u8 = 74;
/// Try again later: a 4xx reply, no connection, a lost connection or a timeout.
pub const EX_TEMPFAIL: u8 = 75;
/// The config file is missing or cannot be used.
pub const EX_CONFIG: u8 = 78;

/// Where the config is when mailgate runs as `sendmail` (a symlink) and neither `-C`
/// nor `$MAILGATE_CONFIG` says: callers such as cron run in any directory.
pub const SYSTEM_CONFIG: &str = "/etc/mailgate/proxy.toml";

/// Why a submission failed: the exit status and the one line for stderr.
#[derive(Debug, PartialEq, Eq)]
pub struct Failure {
    /// sysexits.h status.
    pub code: u8,
    /// What went wrong (a server reply's text where there is one; never the message).
    pub reason: String,
}

impl Failure {
    fn new(code: u8, reason: impl Into<String>) -> Self {
        Failure {
            code,
            reason: reason.into(),
        }
    }
}

/// True when the program was started under the name `sendmail` (a symlink such as
/// `/usr/sbin/sendmail` → mailgate).
pub fn invoked_as_sendmail(argv0: &OsStr) -> bool {
    Path::new(argv0).file_name() == Some(OsStr::new("sendmail"))
}

/// Runs `mailgate sendmail ARGS`; `default_config` is the path from `-c`,
/// `$MAILGATE_CONFIG` or `./proxy.toml`, used unless `-C FILE` is given.
pub fn main(args: &[String], default_config: PathBuf, program: &str) -> ExitCode {
    let code = match run(args, default_config) {
        Ok(()) => 0,
        Err(failure) => {
            crate::cli::out::errln!("{program}: {}", failure.reason);
            if failure.code == EX_USAGE {
                crate::cli::out::errln!("{}", USAGE.lines().next().unwrap_or_default());
            }
            failure.code
        }
    };
    ExitCode::from(code)
}

/// Runs as `sendmail ARGS` (argv[0] dispatch): the config is `-C FILE`, else
/// `$MAILGATE_CONFIG`, else [`SYSTEM_CONFIG`].
pub fn main_as_sendmail(args: &[String]) -> ExitCode {
    let config = std::env::var_os("MAILGATE_CONFIG")
        .map_or_else(|| PathBuf::from(SYSTEM_CONFIG), PathBuf::from);
    main(args, config, "sendmail")
}

fn run(argv: &[String], default_config: PathBuf) -> Result<(), Failure> {
    let args = args::parse(argv).map_err(|e| Failure::new(EX_USAGE, e))?;
    if args.help {
        crate::cli::out::outln!("{USAGE}").map_err(|e| Failure::new(EX_IOERR, e))?;
        return Ok(());
    }
    let config_path = args.config.clone().unwrap_or(default_config);
    let server = read_server(&config_path).map_err(|e| Failure::new(EX_CONFIG, e))?;

    let mut input = Vec::new();
    std::io::stdin()
        .lock()
        .read_to_end(&mut input)
        .map_err(|e| Failure::new(EX_IOERR, format!("cannot read the message on stdin: {e}")))?;

    let user = if args.sender.is_none() || args.full_name.is_none() {
        invoking_user()
    } else {
        None
    };
    let prepared = prepare(&args, &input, &server.hostname, user.as_ref())?;
    let submission = client::Submission {
        sender: &prepared.sender,
        recipients: &prepared.recipients,
        data: &prepared.data,
        eightbit: args.eightbit,
    };
    client::submit(&server.listen, &server.hostname, &submission)
}

/// The user running sendmail: login name and the full name from the GECOS field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Login name.
    pub name: String,
    /// Full name (GECOS up to the first comma), if any.
    pub full_name: Option<String>,
}

/// The owner of `/proc/self` (our effective uid) looked up in `/etc/passwd`; else
/// `$USER` or `$LOGNAME`.
fn invoking_user() -> Option<User> {
    use std::os::unix::fs::MetadataExt;
    let from_passwd = std::fs::metadata("/proc/self").ok().and_then(|meta| {
        let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
        passwd_entry(&passwd, meta.uid())
    });
    from_passwd.or_else(|| {
        ["USER", "LOGNAME"]
            .iter()
            .filter_map(|var| std::env::var(var).ok())
            .find(|name| !name.is_empty())
            .map(|name| User {
                name,
                full_name: None,
            })
    })
}

/// The `/etc/passwd` line for `uid`.
fn passwd_entry(passwd: &str, uid: u32) -> Option<User> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 5 || fields[2].parse::<u32>().ok()? != uid {
            return None;
        }
        let full_name = fields[4].split(',').next().unwrap_or("").trim();
        Some(User {
            name: fields[0].to_string(),
            full_name: (!full_name.is_empty()).then(|| full_name.to_string()),
        })
    })
}

/// The message as it will be submitted, and its envelope.
#[derive(Debug)]
struct Prepared {
    sender: String,
    recipients: Vec<String>,
    data: Vec<u8>,
}

/// Envelope and content from the arguments and stdin: what Postfix's sendmail and
/// cleanup do for a local submission, see the README.
fn prepare(
    args: &Args,
    input: &[u8],
    hostname: &str,
    user: Option<&User>,
) -> Result<Prepared, Failure> {
    let sender = match &args.sender {
        Some(given) => qualify(
            given.trim().trim_start_matches('<').trim_end_matches('>'),
            hostname,
        ),
        None => match user {
            Some(user) => qualify(&user.name, hostname),
            None => {
                return Err(Failure::new(
                    EX_NOUSER,
                    "cannot tell which user runs sendmail (no /etc/passwd entry, $USER or $LOGNAME); pass -f SENDER",
                ));
            }
        },
    };
    let full_name = args.full_name.clone().or_else(|| {
        // The login's GECOS name only describes the login's own address.
        args.sender
            .is_none()
            .then(|| user.and_then(|u| u.full_name.clone()))
            .flatten()
    });

    let lines = message::lines(input, args.ignore_dots);
    let mut msg = message::Message::split(&lines);

    let mut recipients: Vec<String> = Vec::new();
    let mut add = |addr: &str| {
        let addr = addr.trim().trim_start_matches('<').trim_end_matches('>');
        if addr.is_empty() {
            return;
        }
        let addr = qualify(addr, hostname);
        if !recipients.iter().any(|r| r.eq_ignore_ascii_case(&addr)) {
            recipients.push(addr);
        }
    };
    for arg in &args.recipients {
        args::list(arg).for_each(&mut add);
    }
    if args.extract {
        for addr in msg.header_recipients() {
            // As strict as an argument: a header is as much the caller's input.
            args::check_address(&addr)
                .map_err(|e| Failure::new(EX_USAGE, format!("in To:, Cc: or Bcc:, {e}")))?;
            add(&addr);
        }
    }
    if recipients.is_empty() {
        let hint = if args.extract {
            "no recipients: none on the command line and none in To:, Cc: or Bcc:"
        } else {
            "no recipients: give them as arguments, or use -t to read To:, Cc: and Bcc:"
        };
        return Err(Failure::new(EX_USAGE, hint));
    }
    msg.remove_bcc();

    let mut added = Vec::new();
    if !msg.has("from") {
        let address = if sender.is_empty() {
            format!("MAILER-DAEMON@{hostname}")
        } else {
            sender.clone()
        };
        added.push(match full_name.as_deref().map(str::trim) {
            Some(name) if !name.is_empty() => {
                format!("From: {} <{address}>", message::display_name(name))
            }
            _ => format!("From: {address}"),
        });
    }
    if !msg.has("date") {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
        added.push(format!("Date: {}", crate::queue::dsn::rfc5322_date(ms)));
    }
    if !msg.has("message-id") {
        added.push(format!(
            "Message-ID: <{}.sendmail@{hostname}>",
            crate::message::new_id()
        ));
    }
    Ok(Prepared {
        sender,
        recipients,
        data: msg.render(&added),
    })
}

/// A bare local part (`root`) gets `@hostname`, as Postfix appends `$myorigin`.
fn qualify(addr: &str, hostname: &str) -> String {
    if addr.is_empty() || addr.contains('@') {
        addr.to_string()
    } else {
        format!("{addr}@{hostname}")
    }
}

/// What sendmail needs from the config.
#[derive(Debug, PartialEq, Eq)]
struct ServerView {
    /// The plain listeners in order, wildcards turned into loopback.
    listen: Vec<SocketAddr>,
    hostname: String,
}

/// Reads `[server] listen` and `hostname` only (defaults as in SPEC §3). The rest of
/// the file is the daemon's business; its secrets may be unreadable here, on purpose.
fn read_server(path: &Path) -> Result<ServerView, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "{}: cannot read the configuration file: {e}",
            path.display()
        )
    })?;
    server_view(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn server_view(text: &str) -> Result<ServerView, String> {
    let doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| format!("not valid TOML: {}", e.message()))?;
    let server = doc.get("server");
    let hostname = match server.and_then(|s| s.get("hostname")) {
        None => "localhost".to_string(),
        Some(item) => item
            .as_str()
            .filter(|h| !h.is_empty() && !h.contains(char::is_whitespace))
            .ok_or("[server] hostname must be a host name")?
            .to_string(),
    };
    let listen: Vec<String> = match server.and_then(|s| s.get("listen")) {
        None => vec!["127.0.0.1:2525".into(), "[::1]:2525".into()],
        Some(item) => item
            .as_array()
            .ok_or("[server] listen must be a list of addresses")?
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or("[server] listen must be a list of addresses")?,
    };
    let mut addrs = Vec::new();
    for text in &listen {
        for addr in listen_addrs(text)? {
            if addr.port() == 0 {
                return Err(format!(
                    "[server] listen {text:?} has port 0: sendmail cannot know which port the proxy got"
                ));
            }
            addrs.push(addr);
        }
    }
    if addrs.is_empty() {
        return Err("[server] listen is empty: sendmail needs a plain listener".to_string());
    }
    Ok(ServerView {
        listen: addrs,
        hostname,
    })
}

/// A listener as the proxy reads it ([`crate::config::parse_listen`]: `"localhost:PORT"` is
/// both loopback addresses); a wildcard address is reached through loopback.
fn listen_addrs(text: &str) -> Result<Vec<SocketAddr>, String> {
    let mut addrs = crate::config::parse_listen(text)?;
    for addr in &mut addrs {
        match addr.ip() {
            ip if ip.is_unspecified() && ip.is_ipv4() => addr.set_ip(Ipv4Addr::LOCALHOST.into()),
            ip if ip.is_unspecified() => addr.set_ip(Ipv6Addr::LOCALHOST.into()),
            _ => {}
        }
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Args {
        args::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn root() -> User {
        User {
            name: "root".into(),
            full_name: Some("Charlie Root".into()),
        }
    }

    fn text(p: &Prepared) -> String {
        String::from_utf8(p.data.clone()).unwrap()
    }

    #[test]
    fn cron_style_adds_from_date_message_id_and_qualifies_names() {
        let a = args(&["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"]);
        let p = prepare(
            &a,
            b"Subject: Cron <root@h> ls\n\nout\n",
            "box.test",
            Some(&root()),
        )
        .unwrap();
        assert_eq!(p.sender, "root@box.test");
        assert_eq!(p.recipients, ["root@box.test"]);
        let t = text(&p);
        assert!(
            t.starts_with(
                "Subject: Cron <root@h> ls\r\nFrom: CronDaemon <root@box.test>\r\nDate: "
            ),
            "{t}"
        );
        assert!(
            t.contains("\r\nMessage-ID: <") && t.contains(".sendmail@box.test>\r\n\r\nout\r\n"),
            "{t}"
        );
    }

    #[test]
    fn existing_headers_are_kept_and_gecos_names_the_default_sender() {
        let input = b"From: App <app@example.com>\nDate: Thu, 01 Jan 2026 00:00:00 +0000\nMessage-ID: <x@y>\nTo: a@example.org\n\nhi\n";
        let p = prepare(&args(&["-t", "-i"]), input, "h", Some(&root())).unwrap();
        assert_eq!(p.sender, "root@h");
        assert_eq!(
            text(&p),
            String::from_utf8_lossy(input).replace('\n', "\r\n")
        );

        let p = prepare(&args(&["x@example.org"]), b"\nbody\n", "h", Some(&root())).unwrap();
        assert!(text(&p).starts_with("From: Charlie Root <root@h>\r\n"));
        // -f names someone else: the login's full name does not describe them
        let p = prepare(
            &args(&["-f", "<web@example.com>", "x@example.org"]),
            b"\nbody\n",
            "h",
            Some(&root()),
        )
        .unwrap();
        assert_eq!(p.sender, "web@example.com");
        assert!(text(&p).starts_with("From: web@example.com\r\n"));
        let p = prepare(&args(&["-f", "<>", "x@example.org"]), b"\n", "h", None).unwrap();
        assert_eq!(p.sender, "");
        assert!(text(&p).starts_with("From: MAILER-DAEMON@h\r\n"));
    }

    #[test]
    fn extract_adds_header_recipients_dedupes_and_drops_bcc() {
        let input =
            b"To: a@example.org, B@example.org\nBcc: hidden@example.org\nSubject: s\n\nbody\n";
        let p = prepare(
            &args(&["-t", "-f", "s@h", "b@example.org,c@example.org"]),
            input,
            "h",
            None,
        )
        .unwrap();
        assert_eq!(
            p.recipients,
            [
                "b@example.org",
                "c@example.org",
                "a@example.org",
                "hidden@example.org"
            ]
        );
        // No Bcc: line, and its address gone. (Not a search for "bcc" anywhere: the added
        // Message-ID is random hex, which may hold those letters.)
        let sent = text(&p).to_ascii_lowercase();
        assert!(!sent.lines().any(|l| l.starts_with("bcc:")), "{sent}");
        assert!(!sent.contains("hidden@"), "{sent}");
        // without -t the header recipients are not used, and Bcc: still never goes out
        let p = prepare(&args(&["-f", "s@h", "z@example.org"]), input, "h", None).unwrap();
        assert_eq!(p.recipients, ["z@example.org"]);
        assert!(!text(&p).contains("hidden"));
    }

    #[test]
    fn no_recipients_or_no_user_are_errors() {
        let e = prepare(&args(&["-t", "-f", "s@h"]), b"Subject: s\n\n", "h", None).unwrap_err();
        assert_eq!(e.code, EX_USAGE);
        assert!(e.reason.contains("none in To:"), "{}", e.reason);
        let e = prepare(&args(&["x@y"]), b"\n", "h", None).unwrap_err();
        assert_eq!(e.code, EX_NOUSER);
    }

    #[test]
    fn header_recipients_are_checked_like_arguments() {
        // mail-parser hands these over with the CR inside the address.
        for input in [
            &b"To: a@example.org\rDATA\n\nbody\n"[..],
            b"To: ok@example.org\nCc: <a@example.org\rRSET>\n\nbody\n",
            b"To: x <a<b>@example.org>\n\nbody\n",
            b"Bcc: <a\"b c\"@example.org>\n\nbody\n",
        ] {
            let e = prepare(&args(&["-t", "-f", "s@h"]), input, "h", None).unwrap_err();
            assert_eq!(e.code, EX_USAGE, "{}", e.reason);
            assert!(e.reason.contains("is not an address"), "{}", e.reason);
            assert!(!e.reason.contains(['\r', '\n']), "{}", e.reason);
            // without -t the headers are content, not an envelope
            assert!(prepare(&args(&["-f", "s@h", "z@example.org"]), input, "h", None).is_ok());
        }
    }

    #[test]
    fn a_full_name_never_adds_a_header() {
        // -F refuses control characters; a GECOS name goes through display_name, which
        // drops them.
        let user = User {
            name: "www".into(),
            full_name: Some("Web\r\nBcc: eve@evil.org".into()),
        };
        let p = prepare(&args(&["x@example.org"]), b"\nbody\n", "h", Some(&user)).unwrap();
        let t = text(&p);
        assert!(
            t.starts_with("From: \"WebBcc: eve@evil.org\" <www@h>\r\n"),
            "{t}"
        );
        assert!(!t.contains("\r\nBcc:"), "{t}");
    }

    #[test]
    fn passwd_lookup() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nwww-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\n\
                      alice:x:1000:1000:Alice Example,,,:/home/alice:/bin/bash\nbroken\n";
        assert_eq!(
            passwd_entry(passwd, 1000).unwrap(),
            User {
                name: "alice".into(),
                full_name: Some("Alice Example".into())
            }
        );
        assert_eq!(passwd_entry(passwd, 33).unwrap().name, "www-data");
        assert_eq!(passwd_entry(passwd, 5), None);
        assert!(invoking_user().is_some());
    }

    #[test]
    fn the_listener_from_the_config() {
        let v = server_view("[server]\nhostname = \"mx.test\"\nlisten = [\"0.0.0.0:2525\", \"[::]:2526\", \"localhost:25\"]\n[channels.x]\nkind = \"file\"\n").unwrap();
        assert_eq!(v.hostname, "mx.test");
        let want: Vec<SocketAddr> = ["127.0.0.1:2525", "[::1]:2526", "127.0.0.1:25", "[::1]:25"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(v.listen, want);
        let v = server_view("").unwrap();
        assert_eq!(v.hostname, "localhost");
        assert_eq!(v.listen.len(), 2);
        assert!(
            server_view("[server]\nlisten = [\"127.0.0.1:0\"]\n")
                .unwrap_err()
                .contains("port 0")
        );
        assert!(
            server_view("[server]\nlisten = []\n")
                .unwrap_err()
                .contains("empty")
        );
        assert!(
            server_view("[server]\nlisten = [\"nope\"]\n")
                .unwrap_err()
                .contains("invalid listener")
        );
        assert!(
            server_view("[server\n")
                .unwrap_err()
                .contains("not valid TOML")
        );
    }

    #[test]
    fn argv0() {
        assert!(invoked_as_sendmail(OsStr::new("/usr/sbin/sendmail")));
        assert!(invoked_as_sendmail(OsStr::new("sendmail")));
        assert!(!invoked_as_sendmail(OsStr::new("/usr/local/bin/mailgate")));
    }
}
