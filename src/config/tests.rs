//! The configuration's tests: each rule with the problem and line it reports.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::*;

const OUTBOX: &str = "[channels.outbox]\nkind = \"file\"\ndir = \"out\"\nsenders = [\"*\"]\n";
/// A well-formed argon2 PHC string (the reference implementation's example).
const HASH: &str = "$argon2i$v=19$m=65536,t=2,p=4$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG";

fn ok(text: &str) -> Config {
    match parse(text, Path::new("conf/proxy.toml")) {
        Ok(config) => config,
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

fn problems(text: &str) -> Vec<Problem> {
    match parse(text, Path::new("conf/proxy.toml")) {
        Ok(_) => panic!("expected problems in:\n{text}"),
        Err(e) => {
            assert!(!e.problems.is_empty());
            e.problems
        }
    }
}

/// The single problem of `text`.
fn problem(text: &str) -> Problem {
    let mut all = problems(text);
    assert_eq!(all.len(), 1, "expected one problem, got {all:#?}");
    all.remove(0)
}

fn smtp(config: &Config, name: &str) -> SmtpTarget {
    let id = config.channel_id(name).expect("channel exists");
    match &config.channels[id].kind {
        ChannelKind::Smtp(t) => t.clone(),
        ChannelKind::Graph(_) => panic!("{name} is a graph channel"),
        ChannelKind::File { .. } => panic!("{name} is a file channel"),
    }
}
#[test]
fn defaults_follow_the_spec() {
    let config = ok(OUTBOX);
    let s = &config.server;
    assert_eq!(
        s.listen,
        vec![
            "127.0.0.1:2525".parse::<SocketAddr>().unwrap(),
            "[::1]:2525".parse().unwrap()
        ]
    );
    assert!(s.tls_listen.is_empty());
    assert_eq!(s.hostname, "localhost");
    assert!(s.tls.is_none());
    assert_eq!(s.max_message_size, 35 * 1024 * 1024);
    assert_eq!(s.max_recipients, 500);
    assert_eq!(s.max_connections, 1000);
    assert_eq!(s.delivery, DeliveryMode::Queue);
    assert_eq!(s.spool_dir, Path::new("conf/spool"));
    assert_eq!(s.retry_first, Duration::from_secs(60));
    assert_eq!(s.retry_max, Duration::from_secs(3600));
    assert_eq!(s.give_up_after, Duration::from_secs(5 * 86_400));
    assert!(!s.require_auth);
    assert!(s.allow_networks.is_empty());
    assert!(s.check_header_from);
    assert_eq!(s.bare_lf, BareLf::Normalize);
    assert_eq!(s.idle_timeout, Duration::from_secs(300));
    assert!(!config.has_literal_secrets);
    let outbox = &config.channels[0];
    assert_eq!(outbox.scope, vec![SenderPattern::Any]);
    assert!(matches!(&outbox.kind, ChannelKind::File { dir } if dir == Path::new("conf/out")));
    assert_eq!(outbox.limits.connections, 4);
}

#[test]
fn server_keys_are_read() {
    let config = ok(&format!(
        "[server]\nlisten = [\"localhost:0\"]\nhostname = \"mx.example.com\"\nmax_message_size = 1000\n\
         max_recipients = 7\ndelivery = \"relay\"\nspool_dir = \"/var/spool/mg\"\nretry_first = \"30s\"\n\
         idle_timeout = \"500ms\"\nbare_lf = \"reject\"\ncheck_header_from = false\n\
         allow_networks = [\"10.0.0.0/8\", \"192.168.1.7\"]\n{OUTBOX}"
    ));
    let s = &config.server;
    assert_eq!(
        s.listen,
        vec![
            "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
            "[::1]:0".parse().unwrap()
        ]
    );
    assert_eq!(s.hostname, "mx.example.com");
    assert_eq!(s.max_message_size, 1000);
    assert_eq!(s.max_recipients, 7);
    assert_eq!(s.delivery, DeliveryMode::Relay);
    assert_eq!(s.spool_dir, Path::new("/var/spool/mg"));
    assert_eq!(s.retry_first, Duration::from_secs(30));
    assert_eq!(s.idle_timeout, Duration::from_millis(500));
    assert_eq!(s.bare_lf, BareLf::Reject);
    assert!(!s.check_header_from);
    let networks: Vec<String> = s.allow_networks.iter().map(|n| n.to_string()).collect();
    assert_eq!(networks, ["10.0.0.0/8", "192.168.1.7/32"]);
}

#[test]
fn unknown_keys_are_named_with_their_table_and_line() {
    let p = problem(&format!(
        "[server]\nhostname = \"mx\"\nlisen = [\"127.0.0.1:25\"]\n{OUTBOX}"
    ));
    assert_eq!(p.line, Some(3));
    assert_eq!(
        p.message,
        r#"unknown key "lisen" in [server] (did you mean "listen"?)"#
    );

    let p = problem(&format!("{OUTBOX}colour = \"blue\"\n"));
    assert_eq!(p.line, Some(5));
    assert_eq!(p.message, r#"unknown key "colour" in [channels.outbox]"#);

    let p = problem(&format!("{OUTBOX}[metrix]\nlisten = 1\n"));
    assert_eq!(p.line, Some(5));
    assert!(
        p.message
            .starts_with(r#"unknown key "metrix" at the top level"#),
        "{}",
        p.message
    );
}

#[test]
fn a_bad_duration_names_key_and_line() {
    let p = problem(&format!("[server]\n\nretry_first = \"5x\"\n{OUTBOX}"));
    assert_eq!(p.line, Some(3));
    assert!(
        p.message
            .starts_with(r#""retry_first" in [server]: invalid duration "5x""#),
        "{}",
        p.message
    );

    let p = problem(&format!("[server]\nidle_timeout = 30\n{OUTBOX}"));
    assert_eq!(p.line, Some(2));
    assert!(
        p.message.contains("idle_timeout") && p.message.contains("no unit"),
        "{}",
        p.message
    );
}

#[test]
fn a_bad_size_names_key_and_line() {
    let p = problem(&format!("[server]\nmax_message_size = \"35XB\"\n{OUTBOX}"));
    assert_eq!(p.line, Some(2));
    assert!(
        p.message
            .starts_with(r#""max_message_size" in [server]: invalid size "35XB""#),
        "{}",
        p.message
    );

    let p = problem(&format!("{OUTBOX}max_message_size = -1\n"));
    assert_eq!(p.line, Some(5));
    assert!(
        p.message.contains("[channels.outbox]") && p.message.contains("more than zero"),
        "{}",
        p.message
    );

    let p = problem(&format!("[server]\nmax_message_size = true\n{OUTBOX}"));
    assert!(p.message.contains("found boolean"), "{}", p.message);
}

#[test]
fn a_bad_rate_names_key_and_line() {
    let p = problem(&format!("{OUTBOX}rate = \"30/fortnight\"\n"));
    assert_eq!(p.line, Some(5));
    assert!(
        p.message
            .starts_with(r#""rate" in [channels.outbox]: invalid rate "30/fortnight""#),
        "{}",
        p.message
    );
}

#[test]
fn a_wrong_type_names_key_and_line() {
    let p = problem(&format!("[server]\nrequire_auth = \"yes\"\n{OUTBOX}"));
    assert_eq!(p.line, Some(2));
    assert_eq!(
        p.message,
        r#""require_auth" in [server]: expected true or false, found string"#
    );

    let p =
        problem("[channels.outbox]\nkind = \"file\"\ndir = \"out\"\nsenders = [\"*\",\n  42]\n");
    assert_eq!(p.line, Some(5));
    assert!(
        p.message
            .contains("expected strings in the array, found integer"),
        "{}",
        p.message
    );
}

#[test]
fn an_address_scoped_channel_lists_exact_addresses_only() {
    let text = "[channels.alice]\npreset = \"office365\"\nusername = \"alice@example.com\"\npassword = \"pw\"\n\
                senders = [\"alice@example.com\", \"*\", \"*@example.com\"]\ndomains = [\"example.com\"]\n";
    let all = problems(text);
    assert_eq!(all.len(), 3, "{all:#?}");
    for p in &all {
        assert!(
            p.message
                .starts_with("[channels.alice] is address-scoped (preset \"office365\")"),
            "{}",
            p.message
        );
    }
    assert!(all[0].message.ends_with("not \"*\""));
    assert!(all[1].message.ends_with("not \"*@example.com\""));
    assert!(all[2].message.ends_with("not domain \"example.com\""));
    assert_eq!(
        all.iter().map(|p| p.line).collect::<Vec<_>>(),
        [Some(5), Some(5), Some(6)]
    );

    let p = problem(&format!("{OUTBOX}scope = \"address\"\n"));
    assert!(
        p.message.contains("(scope = \"address\")") && p.message.ends_with("not \"*\""),
        "{}",
        p.message
    );

    // A mailbox preset stays address-only even when `scope` says otherwise.
    let p = problem(
        "[channels.app]\npreset = \"office365\"\nscope = \"domain\"\nusername = \"app@example.com\"\n\
                     password = \"pw\"\ndomains = [\"example.com\"]\n",
    );
    assert!(
        p.message.contains("[channels.app]") && p.message.contains("office365"),
        "{}",
        p.message
    );
}

#[test]
fn the_same_pattern_at_the_same_specificity_names_both_channels() {
    let p = problem(&format!(
        "{OUTBOX}[channels.other]\nkind = \"file\"\ndir = \"o\"\nsenders = [\"*\"]\n"
    ));
    assert_eq!(p.line, Some(8));
    assert!(
        p.message.contains("\"outbox\"") && p.message.contains("\"other\""),
        "{}",
        p.message
    );

    let mailbox = |name: &str, sender: &str| {
        format!("[channels.{name}]\nkind = \"file\"\ndir = \"{name}\"\nsenders = [\"{sender}\"]\n")
    };
    let p = problem(&format!(
        "{}{}",
        mailbox("a", "Alice@Example.COM"),
        mailbox("b", "Alice@example.com")
    ));
    assert!(p.message.contains("exact address"), "{}", p.message);
    // Routing ignores case in the local part too, so these would be ambiguous.
    problem(&format!(
        "{}{}",
        mailbox("a", "Alice@example.com"),
        mailbox("b", "alice@example.com")
    ));
    ok(&format!(
        "{}{}",
        mailbox("a", "alice@example.com"),
        mailbox("b", "alice@example.org")
    ));
    let p = problem(&format!(
        "{}{}",
        mailbox("a", "*@example.com"),
        mailbox("b", "*@EXAMPLE.com")
    ));
    assert!(
        p.message.contains("\"a\"") && p.message.contains("\"b\""),
        "{}",
        p.message
    );
    let domain = "[channels.d]\nkind = \"file\"\ndir = \"d\"\ndomains = [\"example.com\"]\n";
    let p = problem(&format!(
        "{domain}{}",
        domain.replace("channels.d", "channels.e")
    ));
    assert!(
        p.message.contains("domain \"example.com\""),
        "{}",
        p.message
    );
    // Different specificities for the same domain are fine: the more specific wins.
    ok(&format!(
        "{domain}{}{}",
        mailbox("a", "*@example.com"),
        mailbox("b", "x@example.com")
    ));
}

#[test]
fn plaintext_goes_to_loopback_hosts_only() {
    let relay = |host: &str| {
        format!("[channels.relay]\nhost = \"{host}\"\ntls = \"none\"\nsenders = [\"*\"]\n")
    };
    let p = problem(&relay("smtp.example.net"));
    assert_eq!(p.line, Some(3));
    assert!(
        p.message
            .starts_with("[channels.relay] has tls = \"none\" to \"smtp.example.net\""),
        "{}",
        p.message
    );
    for host in ["127.0.0.1", "127.8.9.10", "::1", "localhost"] {
        let config = ok(&relay(host));
        let target = smtp(&config, "relay");
        assert_eq!((target.tls, target.port), (TlsMode::None, 25));
    }
}

#[test]
fn a_non_loopback_listener_needs_auth_or_an_allow_list() {
    let p = problem(&format!(
        "[server]\nlisten = [\"127.0.0.1:2525\", \"0.0.0.0:2525\"]\n{OUTBOX}"
    ));
    assert_eq!(p.line, Some(2));
    assert!(
        p.message
            .starts_with("listener 0.0.0.0:2525 is not on loopback"),
        "{}",
        p.message
    );
    let all = problems(&format!("[server]\ntls_listen = [\"[::]:4650\"]\n{OUTBOX}"));
    assert!(
        all.iter()
            .any(|p| p.message.contains("[::]:4650 is not on loopback")),
        "{all:?}"
    );

    // `allow_networks = []` (the shipped default) restricts nothing.
    let p = problem(&format!(
        "[server]\nlisten = [\"0.0.0.0:2525\"]\nallow_networks = []\n{OUTBOX}"
    ));
    assert!(p.message.contains("is not on loopback"), "{}", p.message);

    ok(&format!(
        "[server]\nlisten = [\"0.0.0.0:2525\"]\nallow_networks = [\"10.0.0.0/8\"]\n{OUTBOX}"
    ));
    ok(&format!(
        "[server]\nlisten = [\"0.0.0.0:2525\"]\nrequire_auth = true\n\
         [[users]]\nname = \"app\"\npassword_hash = \"{HASH}\"\nsenders = [\"*\"]\n{OUTBOX}"
    ));
}

#[test]
fn require_auth_needs_users_and_users_need_argon2_hashes() {
    let p = problem(&format!("[server]\nrequire_auth = true\n{OUTBOX}"));
    assert_eq!(p.line, Some(2));
    assert!(p.message.contains("no [[users]]"), "{}", p.message);

    let config = ok(&format!(
        "[[users]]\nname = \"app\"\npassword_hash = \"{HASH}\"\nsenders = [\"billing@Example.com\", \"*@example.org\"]\n{OUTBOX}"
    ));
    let user = &config.users[0];
    assert_eq!(user.name, "app");
    assert_eq!(user.password_hash.expose(), HASH);
    assert_eq!(
        user.senders,
        [
            SenderPattern::Exact("billing@example.com".into()),
            SenderPattern::AnyAtDomain("example.org".into())
        ]
    );

    let p = problem(&format!(
        "[[users]]\nname = \"app\"\npassword_hash = \"plaintext-oops\"\nsenders = [\"*\"]\n{OUTBOX}"
    ));
    assert_eq!(p.line, Some(3));
    assert!(p.message.contains("not an argon2 hash"), "{}", p.message);
    assert!(
        !p.message.contains("plaintext-oops"),
        "the value is echoed: {}",
        p.message
    );
}

#[test]
fn a_missing_environment_variable_names_channel_and_key() {
    let text = "[channels.relay]\nhost = \"smtp.example.net\"\nusername = \"u\"\n\
                password_env = \"MAILGATE_TEST_SURELY_UNSET_8F3A\"\nsenders = [\"*\"]\n";
    let p = problem(text);
    assert_eq!(p.line, Some(4));
    assert_eq!(
        p.message,
        r#""password_env" in [channels.relay]: environment variable "MAILGATE_TEST_SURELY_UNSET_8F3A" is not set"#
    );

    // PATH is set wherever tests run (and tests may not set variables: no unsafe code).
    let path = std::env::var("PATH").expect("PATH is set");
    let config = ok(&text.replace("MAILGATE_TEST_SURELY_UNSET_8F3A", "PATH"));
    let target = smtp(&config, "relay");
    assert_eq!(
        target.password.as_ref().map(Secret::expose),
        Some(path.as_str())
    );
    assert_eq!(target.username.as_deref(), Some("u"));
    assert!(!config.has_literal_secrets);
}

#[test]
fn a_password_file_is_read_relative_to_the_config_and_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("relay.pw"), "s3cret\n").unwrap();
    let text = "[channels.relay]\nhost = \"smtp.example.net\"\nusername = \"u\"\n\
                password_file = \"relay.pw\"\nsenders = [\"*\"]\n";
    let config = parse(text, &dir.path().join("proxy.toml")).unwrap();
    assert_eq!(smtp(&config, "relay").password.unwrap().expose(), "s3cret");

    let errors = parse(text, &dir.path().join("elsewhere/proxy.toml")).unwrap_err();
    let p = &errors.problems[0];
    assert_eq!(p.line, Some(4));
    assert!(
        p.message
            .starts_with(r#""password_file" in [channels.relay]: cannot read "#),
        "{}",
        p.message
    );
}

#[test]
fn only_one_password_form_and_username_goes_with_password() {
    let p = problem(
        "[channels.r]\nhost = \"h.example\"\nusername = \"u\"\npassword = \"a\"\npassword_env = \"PATH\"\nsenders = [\"*\"]\n",
    );
    assert_eq!(p.line, Some(4));
    assert!(p.message.contains("give only one of"), "{}", p.message);
    let p = problem("[channels.r]\nhost = \"h.example\"\nusername = \"u\"\nsenders = [\"*\"]\n");
    assert!(
        p.message.contains("username but no password"),
        "{}",
        p.message
    );
    let p = problem("[channels.r]\nhost = \"h.example\"\npassword = \"a\"\nsenders = [\"*\"]\n");
    assert!(
        p.message.contains("password but no username"),
        "{}",
        p.message
    );
}

#[test]
fn several_problems_are_reported_together_in_file_order() {
    let text = "\
[channels.relay]
host = \"smtp.example.net\"
tls = \"none\"
senders = [\"*\"]
rate = \"fast\"

[channels.outbox]
kind = \"file\"
dir = \"out\"
senders = [\"*\"]

[server]
lisen = []
max_recipients = 0
";
    let all = problems(text);
    let lines: Vec<Option<usize>> = all.iter().map(|p| p.line).collect();
    assert_eq!(
        lines,
        [Some(3), Some(5), Some(10), Some(13), Some(14)],
        "{all:#?}"
    );
    assert!(all[0].message.contains("tls = \"none\""));
    assert!(all[1].message.contains("invalid rate"));
    assert!(all[2].message.contains("both list \"*\""));
    assert!(all[3].message.contains("unknown key \"lisen\""));
    assert!(all[4].message.contains("max_recipients"));

    let shown = parse(text, Path::new("proxy.toml"))
        .unwrap_err()
        .to_string();
    assert_eq!(shown.lines().count(), 5);
    assert!(shown.starts_with("proxy.toml:3: "), "{shown}");
}

#[test]
fn a_syntax_error_has_a_line() {
    let p = problem("[server]\nhostname = \n");
    assert_eq!(p.line, Some(2));
    assert!(p.message.starts_with("TOML syntax error"), "{}", p.message);
    // toml_edit's "expected ..." hint stays on the problem's one line.
    let p = problem("[server\n");
    assert_eq!(p.line, Some(1));
    assert!(!p.message.contains('\n'), "{:?}", p.message);
    assert!(p.message.contains("expected"), "{:?}", p.message);
}

#[test]
fn presets_fill_defaults_and_explicit_keys_override_them() {
    let text = "[channels.alice]\npreset = \"office365\"\nusername = \"alice@example.com\"\npassword_env = \"PATH\"\n\
                senders = [\"alice@example.com\"]\n\
                [channels.bob]\npreset = \"gmail\"\nusername = \"bob@example.org\"\npassword_env = \"PATH\"\n\
                senders = [\"bob@example.org\"]\nconnections = 2\nrate = \"10/min\"\nmax_recipients = 50\n\
                [channels.sp]\npreset = \"sparkpost\"\nusername = \"SMTP_Injection\"\npassword_env = \"PATH\"\n\
                domains = [\"example.com\"]\nhost = \"smtp.eu.sparkpostmail.com\"\nport = 2525\n";
    let config = ok(text);
    let names: Vec<&str> = config.channels.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["alice", "bob", "sp"]);

    let alice = &config.channels[0];
    assert!(alice.address_scoped);
    assert_eq!(alice.preset.as_deref(), Some("office365"));
    let t = smtp(&config, "alice");
    assert_eq!(
        (t.host.as_str(), t.port, t.tls),
        ("smtp.office365.com", 587, TlsMode::Starttls)
    );
    assert_eq!(
        alice.limits,
        Limits {
            rate: Some(Rate {
                count: 30,
                per: Duration::from_secs(60)
            }),
            recipients_per_day: Some(10_000),
            max_recipients: Some(500),
            connections: 3,
            max_message_size: Some(35 * 1024 * 1024),
        }
    );

    let bob = &config.channels[1];
    assert!(bob.address_scoped);
    let t = smtp(&config, "bob");
    assert_eq!(
        (t.host.as_str(), t.port, t.tls),
        ("smtp.gmail.com", 465, TlsMode::Implicit)
    );
    assert_eq!(
        bob.limits,
        Limits {
            rate: Some(Rate {
                count: 10,
                per: Duration::from_secs(60)
            }),
            recipients_per_day: Some(10_000),
            max_recipients: Some(50),
            connections: 2,
            max_message_size: None,
        }
    );

    let sp = &config.channels[2];
    assert!(!sp.address_scoped);
    assert_eq!(sp.scope, [SenderPattern::Domain("example.com".into())]);
    let t = smtp(&config, "sp");
    assert_eq!(
        (t.host.as_str(), t.port, t.tls),
        ("smtp.eu.sparkpostmail.com", 2525, TlsMode::Starttls)
    );
    assert_eq!(
        sp.limits,
        Limits {
            connections: 4,
            ..Limits::default()
        }
    );

    // Choosing the other TLS mode of a preset picks that mode's port.
    let config = ok(&text.replace(
        "preset = \"gmail\"",
        "preset = \"gmail\"\ntls = \"starttls\"",
    ));
    assert_eq!(smtp(&config, "bob").port, 587);

    let p = problem("[channels.x]\npreset = \"hotmail\"\nsenders = [\"*\"]\n");
    assert_eq!(p.line, Some(2));
    assert!(
        p.message.contains("unknown preset \"hotmail\"") && p.message.contains("office365"),
        "{}",
        p.message
    );
}

#[test]
fn ses_needs_a_region() {
    let text = "[channels.ses]\npreset = \"ses\"\nusername = \"AKIA\"\npassword_env = \"PATH\"\ndomains = [\"example.com\"]\n";
    let p = problem(text);
    assert_eq!(p.line, Some(1));
    assert!(p.message.contains("needs region"), "{}", p.message);

    let config = ok(&text.replace(
        "preset = \"ses\"",
        "preset = \"ses\"\nregion = \"eu-west-1\"",
    ));
    let t = smtp(&config, "ses");
    assert_eq!(
        (t.host.as_str(), t.port),
        ("email-smtp.eu-west-1.amazonaws.com", 587)
    );

    let p = problem(&text.replace(
        "preset = \"ses\"",
        "preset = \"mailgun\"\nregion = \"eu-west-1\"",
    ));
    assert!(
        p.message
            .starts_with("\"region\" in [channels.ses]: only used with preset = \"ses\""),
        "{}",
        p.message
    );
}

#[test]
fn channel_kinds_need_their_own_keys() {
    let p = problem("[channels.r]\nsenders = [\"*\"]\n");
    assert!(p.message.contains("needs host"), "{}", p.message);
    let p = problem("[channels.f]\nkind = \"file\"\nsenders = [\"*\"]\n");
    assert!(p.message.contains("no dir"), "{}", p.message);
    let p = problem(&format!("{OUTBOX}host = \"smtp.example.net\"\n"));
    assert_eq!(
        p.message,
        r#""host" in [channels.outbox]: not allowed for kind = "file""#
    );
    let p = problem("[channels.r]\nhost = \"h.example\"\ndir = \"out\"\nsenders = [\"*\"]\n");
    assert!(
        p.message.contains("only for kind = \"file\""),
        "{}",
        p.message
    );
    let p = problem("[channels.r]\nkind = \"pigeon\"\nhost = \"h.example\"\nsenders = [\"*\"]\n");
    assert!(
        p.message
            .contains("\"pigeon\" is not one of \"smtp\", \"graph\", \"file\""),
        "{}",
        p.message
    );
    let p = problem("[channels.r]\nhost = \"h.example\"\nport = 70000\nsenders = [\"*\"]\n");
    assert!(p.message.contains("not a TCP port"), "{}", p.message);
}

#[test]
fn a_channel_with_an_empty_scope_and_a_config_without_channels_are_errors() {
    let p = problem("[channels.r]\nhost = \"h.example\"\nsenders = []\n");
    assert_eq!(p.line, Some(1));
    assert!(
        p.message.contains("[channels.r] has an empty scope"),
        "{}",
        p.message
    );
    let p = problem("[server]\nhostname = \"mx\"\n");
    assert!(p.message.contains("no channel is defined"), "{}", p.message);
}

#[test]
fn tls_files_go_together_and_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cert.pem"), "x").unwrap();
    std::fs::write(dir.path().join("key.pem"), "x").unwrap();
    let path = dir.path().join("proxy.toml");
    let text = format!(
        "[server]\ntls_listen = [\"127.0.0.1:0\"]\ntls_cert = \"cert.pem\"\ntls_key = \"key.pem\"\n{OUTBOX}"
    );
    let config = parse(&text, &path).unwrap();
    let tls = config.server.tls.unwrap();
    assert_eq!(
        (tls.cert, tls.key),
        (dir.path().join("cert.pem"), dir.path().join("key.pem"))
    );

    let errors = parse(&text.replace("tls_key = \"key.pem\"\n", ""), &path).unwrap_err();
    let messages: Vec<&str> = errors.problems.iter().map(|p| p.message.as_str()).collect();
    assert_eq!(
        messages,
        [
            r#""tls_listen" in [server] needs tls_cert and tls_key"#,
            r#""tls_cert" in [server] needs "tls_key" too"#
        ]
    );

    let errors = parse(&text.replace("key.pem", "nokey.pem"), &path).unwrap_err();
    assert_eq!(errors.problems.len(), 1);
    assert!(errors.problems[0].message.contains("does not exist"));
}

#[test]
fn channels_are_sorted_and_bulk_channel_is_checked() {
    let text = "[channels.zeta]\nhost = \"h.example\"\ndomains = [\"example.com\"]\n\
                [channels.alpha]\npreset = \"office365\"\nusername = \"a@example.com\"\npassword_env = \"PATH\"\n\
                senders = [\"a@example.com\"]\n[routing]\nbulk_channel = \"zeta\"\nbulk_recipients = 50\n";
    let config = ok(text);
    assert_eq!(config.channel_id("alpha"), Some(0));
    assert_eq!(config.channel_id("zeta"), Some(1));
    assert_eq!(config.routing.bulk_channel, Some(1));
    assert_eq!(config.routing.bulk_recipients, Some(50));

    let p = problem(&text.replace("bulk_channel = \"zeta\"", "bulk_channel = \"alpha\""));
    assert!(
        p.message.contains("\"alpha\" is address-scoped"),
        "{}",
        p.message
    );
    let p = problem(&text.replace("bulk_channel = \"zeta\"", "bulk_channel = \"omega\""));
    assert!(
        p.message.contains("there is no channel \"omega\""),
        "{}",
        p.message
    );
}

#[test]
fn secrets_print_as_stars() {
    let secret = Secret::new("hunter2");
    assert_eq!(format!("{secret:?}"), "***");
    assert_eq!(format!("{secret}"), "***");
    let config = ok(
        "[channels.r]\nhost = \"h.example\"\nusername = \"u\"\npassword = \"hunter2\"\nsenders = [\"*\"]\n",
    );
    assert!(config.has_literal_secrets);
    assert!(!format!("{config:?}").contains("hunter2"));
}

#[test]
fn the_shipped_proxy_toml_is_valid() {
    let config = parse(include_str!("../../proxy.toml"), Path::new("proxy.toml")).unwrap();
    assert_eq!(
        config.server.listen,
        vec![
            "127.0.0.1:2525".parse::<SocketAddr>().unwrap(),
            "[::1]:2525".parse().unwrap()
        ]
    );
    assert_eq!(config.server.delivery, DeliveryMode::Queue);
    assert_eq!(config.channels.len(), 1);
    let outbox = &config.channels[0];
    assert_eq!(outbox.name, "outbox");
    assert_eq!(outbox.scope, [SenderPattern::Any]);
    assert!(matches!(&outbox.kind, ChannelKind::File { dir } if dir == Path::new("outbox")));
    assert!(!config.has_literal_secrets);
}

#[test]
fn the_shipped_examples_are_valid_once_uncommented() {
    // Uncomment every commented table header and `key = value` line.
    let text: String = include_str!("../../proxy.toml")
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest)
                if rest.starts_with('[')
                    || rest.split_once(" = ").is_some_and(|(key, _)| {
                        key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    }) =>
            {
                rest
            }
            _ => line,
        })
        .map(|line| format!("{line}\n"))
        .collect();
    let errors = parse(&text, Path::new("proxy.toml")).unwrap_err();
    // What is left is only what a fresh machine lacks: secrets, certificates, a real hash.
    for p in &errors.problems {
        let expected = [
            "is not set",
            "cannot read",
            "does not exist",
            "not an argon2 hash",
        ];
        assert!(
            expected.iter().any(|e| p.message.contains(e)),
            "unexpected: {p:?}"
        );
    }
    assert!(
        errors
            .problems
            .iter()
            .any(|p| p.message.contains("[channels.ses]"))
    );
}

#[test]
fn every_listed_key_is_a_field_of_its_raw_struct() {
    use super::reader::{Expect, Keys};
    let sample = |expect: Expect| match expect {
        Expect::Str => "\"x\"",
        Expect::Duration => "\"1s\"",
        Expect::Bool => "true",
        Expect::Count | Expect::Size => "1",
        Expect::Strings => "[]",
        Expect::Table => "{}",
    };
    let body = |keys: Keys| -> String {
        keys.iter()
            .filter(|(_, e)| *e != Expect::Table)
            .map(|(k, e)| format!("{k} = {}\n", sample(*e)))
            .collect()
    };
    let oauth: Vec<String> = super::oauth::OAUTH_KEYS
        .iter()
        .map(|(k, e)| format!("{k} = {}", sample(*e)))
        .collect();
    let text = format!(
        "[server]\n{}[[users]]\n{}[channels.c]\n{}oauth = {{ {} }}\n[routing]\n{}",
        body(super::server::SERVER_KEYS),
        body(super::users::USER_KEYS),
        body(super::channels::CHANNEL_KEYS),
        oauth.join(", "),
        body(super::routing::ROUTING_KEYS),
    );
    for p in problems(&text) {
        assert!(!p.message.contains("unknown key"), "{p:?}");
        assert!(!p.message.contains(", found "), "{p:?}");
    }
}

#[test]
fn numbers_too_large_to_use_are_problems_with_their_line() {
    let p = problem(&format!("[server]\nmax_connections = 1000001\n{OUTBOX}"));
    assert_eq!(p.line, Some(2));
    assert!(
        p.message.starts_with(
            r#""max_connections" in [server]: 1000001 is too large (at most 1000000)"#
        ),
        "{}",
        p.message
    );
    let config = ok(&format!(
        "[server]\nmax_connections = 1000000\nmax_recipients = 100000\n{OUTBOX}connections = 1000\nmax_recipients = 100000\n"
    ));
    assert_eq!(config.server.max_connections, 1_000_000);
    assert_eq!(config.channels[0].limits.connections, 1000);

    let p = problem(&format!(
        "[server]\nmax_connections = 9223372036854775807\n{OUTBOX}"
    ));
    assert!(p.message.contains("too large"), "{}", p.message);
    let p = problem(&format!("[server]\nmax_recipients = 100001\n{OUTBOX}"));
    assert!(p.message.contains("at most 100000"), "{}", p.message);

    let all = problems(&format!(
        "{OUTBOX}connections = 1001\nmax_recipients = 100001\n[channels.b]\nkind = \"file\"\ndir = \"b\"\nsenders = [\"b@example.com\"]\nconnections = 0\n"
    ));
    let lines: Vec<Option<usize>> = all.iter().map(|p| p.line).collect();
    assert_eq!(lines, [Some(5), Some(6), Some(11)], "{all:#?}");
    assert!(
        all[0]
            .message
            .contains("\"connections\" in [channels.outbox]: 1001 is too large (at most 1000)")
    );
    assert!(all[2].message.contains("must be more than zero, not 0"));

    let all = problems(&format!(
        "[server]\nmax_message_size = \"99999999999999GB\"\nretry_first = \"99999999999999999999d\"\n\
         give_up_after = \"40000d\"\nidle_timeout = \"18446744073709551615s\"\n{OUTBOX}max_message_size = 9223372036854775807\n"
    ));
    let lines: Vec<Option<usize>> = all.iter().map(|p| p.line).collect();
    assert_eq!(
        lines,
        [Some(2), Some(3), Some(4), Some(5), Some(10)],
        "{all:#?}"
    );
    assert!(all.iter().all(|p| p.message.contains("too")), "{all:#?}");
}

/// A Microsoft delegated OAuth channel; line 4 is the `oauth` table.
const ALICE: &str = "[channels.alice]\npreset = \"office365\"\nusername = \"alice@example.com\"\n\
                     oauth = { provider = \"microsoft\", tenant = \"example.com\", client_id = \"app-id\", refresh_token_file = \"alice.token\" }\n\
                     senders = [\"alice@example.com\"]\n";

fn oauth_of(config: &Config, name: &str) -> oauth::OAuth {
    smtp(config, name).oauth.expect("an OAuth channel")
}

#[test]
fn oauth_settings_are_read_with_the_provider_defaults() {
    use oauth::{Grant, Provider, TokenSource};
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("alice.token"), "rt-alice-1\n").unwrap();
    let config = parse(ALICE, &dir.path().join("proxy.toml")).unwrap();
    let t = smtp(&config, "alice");
    assert_eq!(t.username.as_deref(), Some("alice@example.com"));
    assert!(t.password.is_none());
    let o = t.oauth.unwrap();
    assert_eq!(
        (o.provider, o.grant),
        (Provider::Microsoft, Grant::RefreshToken)
    );
    assert_eq!(
        (o.tenant.as_str(), o.client_id.as_str()),
        ("example.com", "app-id")
    );
    assert!(o.client_secret.is_none());
    assert_eq!(
        o.refresh_token.as_ref().map(Secret::expose),
        Some("rt-alice-1")
    );
    assert_eq!(
        o.refresh_token_source,
        TokenSource::File(dir.path().join("alice.token"))
    );
    assert_eq!(
        o.scope,
        "https://outlook.office.com/SMTP.Send offline_access"
    );
    assert_eq!(
        o.token_url,
        "https://login.microsoftonline.com/example.com/oauth2/v2.0/token"
    );
    assert_eq!(
        o.auth_url,
        "https://login.microsoftonline.com/example.com/oauth2/v2.0/authorize"
    );
    assert_eq!(
        o.device_url,
        "https://login.microsoftonline.com/example.com/oauth2/v2.0/devicecode"
    );
    assert!(!config.has_literal_secrets);

    // Not authorized yet: no file, or no token at all. Both are fine.
    let o = oauth_of(&ok(ALICE), "alice");
    assert!(o.refresh_token.is_none());
    assert_eq!(
        o.refresh_token_source,
        TokenSource::File(Path::new("conf/alice.token").to_path_buf())
    );
    let text = ALICE.replace(", refresh_token_file = \"alice.token\"", "");
    let o = oauth_of(&ok(&text), "alice");
    assert_eq!(o.refresh_token_source, TokenSource::None);
    // The tenant defaults to "common"; an explicit auth = "xoauth2" is the same.
    let text = ALICE
        .replace("tenant = \"example.com\", ", "")
        .replace("oauth =", "auth = \"xoauth2\"\noauth =");
    let o = oauth_of(&ok(&text), "alice");
    assert_eq!(o.tenant, "common");
    assert!(
        o.token_url.contains("/common/oauth2/v2.0/token"),
        "{}",
        o.token_url
    );

    // App-only: client credentials with the app scope and no user token.
    let text = ALICE.replace(
        "refresh_token_file = \"alice.token\"",
        "grant = \"client_credentials\", client_secret_env = \"PATH\"",
    );
    let o = oauth_of(&ok(&text), "alice");
    assert_eq!(o.grant, Grant::ClientCredentials);
    assert_eq!(o.scope, "https://outlook.office365.com/.default");
    assert_eq!(
        o.client_secret.as_ref().map(Secret::expose),
        std::env::var("PATH").ok().as_deref()
    );
    assert_eq!(o.refresh_token_source, TokenSource::None);

    // Google: its own endpoints and scope; overrides win; loopback http is allowed.
    let text = "[channels.bob]\npreset = \"gmail\"\nusername = \"bob@example.org\"\n\
                oauth = { provider = \"google\", client_id = \"gid\", client_secret = \"gsecret\", refresh_token_env = \"PATH\", \
                token_url = \"http://127.0.0.1:8080/token\", auth_url = \"http://localhost:9/auth\", device_url = \"http://[::1]:9/device\" }\n\
                senders = [\"bob@example.org\"]\n";
    let config = ok(text);
    let o = oauth_of(&config, "bob");
    assert_eq!(o.provider, Provider::Google);
    assert_eq!(o.tenant, "");
    assert_eq!(o.scope, "https://mail.google.com/");
    assert_eq!(
        o.client_secret.as_ref().map(Secret::expose),
        Some("gsecret")
    );
    assert_eq!(o.refresh_token_source, TokenSource::Env("PATH".into()));
    assert_eq!(o.token_url, "http://127.0.0.1:8080/token");
    assert_eq!(o.auth_url, "http://localhost:9/auth");
    assert_eq!(o.device_url, "http://[::1]:9/device");
    assert!(config.has_literal_secrets);
    assert!(!format!("{config:?}").contains("gsecret"));
    let o = oauth_of(
        &ok(&text
            .replace(", token_url = \"http://127.0.0.1:8080/token\"", "")
            .replace(", auth_url = \"http://localhost:9/auth\"", "")
            .replace(", device_url = \"http://[::1]:9/device\"", "")),
        "bob",
    );
    assert_eq!(o.token_url, "https://oauth2.googleapis.com/token");
    assert_eq!(o.auth_url, "https://accounts.google.com/o/oauth2/v2/auth");

    // A literal refresh token counts as a literal secret.
    let text = ALICE.replace(
        "refresh_token_file = \"alice.token\"",
        "refresh_token = \"rt-lit\"",
    );
    let config = ok(&text);
    assert!(config.has_literal_secrets);
    assert_eq!(
        oauth_of(&config, "alice").refresh_token_source,
        TokenSource::Literal
    );
}

#[test]
fn oauth_rules_are_problems_with_their_line() {
    let one = |text: &str, line: usize, needle: &str| {
        let p = problem(text);
        assert_eq!(p.line, Some(line), "{p:?}");
        assert!(
            p.message.contains(needle),
            "{needle:?} not in {:?}",
            p.message
        );
    };
    let password_channel = "[channels.r]\nhost = \"h.example\"\nusername = \"u\"\nauth = \"xoauth2\"\nsenders = [\"*\"]\n";
    one(password_channel, 4, "auth = \"xoauth2\" but no oauth");
    // (The username without a password is a problem of its own there.)
    let all = problems(&ALICE.replace("oauth =", "auth = \"password\"\noauth ="));
    assert!(
        all.iter()
            .any(|p| p.line == Some(5) && p.message.contains("but auth = \"password\"")),
        "{all:#?}"
    );
    one(
        &ALICE.replace("senders", "password_env = \"PATH\"\nsenders"),
        5,
        "\"password_env\" in [channels.alice]: not used with auth = \"xoauth2\"",
    );
    one(
        &ALICE.replace("username = \"alice@example.com\"\n", ""),
        1,
        "needs username",
    );
    one(
        &ALICE.replace(
            "preset = \"office365\"",
            "host = \"127.0.0.1\"\ntls = \"none\"",
        ),
        3,
        "tokens never travel in plaintext",
    );
    one(
        &ALICE.replace("provider = \"microsoft\", ", ""),
        4,
        "needs provider",
    );
    one(
        &ALICE.replace("client_id = \"app-id\", ", ""),
        4,
        "needs client_id",
    );
    one(
        &ALICE.replace("provider = \"microsoft\"", "provider = \"yahoo\""),
        4,
        "\"yahoo\" is not one of \"microsoft\", \"google\"",
    );
    one(
        &ALICE.replace(
            "refresh_token_file = \"alice.token\"",
            "grant = \"client_credentials\"",
        ),
        4,
        "needs client_secret_env, client_secret_file or client_secret",
    );
    one(
        &ALICE.replace(", refresh_token_file = \"alice.token\"", ", grant = \"client_credentials\", client_secret_env = \"PATH\", refresh_token_env = \"PATH\""),
        4,
        "\"refresh_token_env\" in [channels.alice] oauth: not used with grant = \"client_credentials\"",
    );
    let google = ALICE.replace("\"microsoft\", tenant = \"example.com\"", "\"google\"");
    one(&google, 4, "provider = \"google\" needs client_secret_env");
    one(
        &google.replace(
            "client_id",
            "tenant = \"example.com\", client_secret_env = \"PATH\", client_id",
        ),
        4,
        "\"tenant\" in [channels.alice] oauth: only for provider = \"microsoft\"",
    );
    let all = problems(&google.replace(
        "client_id",
        "grant = \"client_credentials\", client_secret_env = \"PATH\", client_id",
    ));
    assert!(
        all.iter()
            .any(|p| p.message.contains("is for provider = \"microsoft\" only")),
        "{all:#?}"
    );
    one(
        &ALICE.replace(
            "client_id",
            "token_url = \"http://login.example.com/token\", client_id",
        ),
        4,
        "must be https://",
    );
    one(
        &ALICE.replace("client_id", "device_url = \"login.example.com\", client_id"),
        4,
        "is not a URL",
    );
    one(
        &ALICE.replace(
            "client_id",
            "graph_url = \"https://graph.microsoft.com\", client_id",
        ),
        4,
        "only for kind = \"graph\"",
    );
    one(
        &ALICE.replace("refresh_token_file", "refresh_tokn_file"),
        4,
        "unknown key \"refresh_tokn_file\" in [channels.alice] oauth (did you mean \"refresh_token_file\"?)",
    );
    one(
        &ALICE.replace(
            "refresh_token_file = \"alice.token\"",
            "refresh_token_env = \"PATH\", refresh_token = \"x\"",
        ),
        4,
        "give only one of refresh_token_env, refresh_token_file or refresh_token",
    );
    one(
        &ALICE.replace(
            "refresh_token_file = \"alice.token\"",
            "client_secret_file = \"nowhere.secret\"",
        ),
        4,
        "\"client_secret_file\" in [channels.alice] oauth: cannot read",
    );
    one(
        &ALICE.replace("oauth = {", "oauth = \"microsoft\"\n#{"),
        4,
        "\"oauth\" in [channels.alice]: expected a table, found string",
    );

    // Several OAuth problems of one channel are all listed, each on its line.
    let text = "[channels.c]\nhost = \"127.0.0.1\"\ntls = \"none\"\nauth = \"xoauth2\"\npassword = \"pw\"\n\
                oauth = { provider = \"google\", grant = \"client_credentials\", scope = 7 }\nsenders = [\"*\"]\n";
    let all = problems(text);
    let lines: Vec<Option<usize>> = all.iter().map(|p| p.line).collect();
    assert_eq!(
        lines,
        [
            Some(1),
            Some(3),
            Some(5),
            Some(6),
            Some(6),
            Some(6),
            Some(6)
        ],
        "{all:#?}"
    );
}

#[test]
fn max_header_size_is_a_size_with_a_1mb_default() {
    assert_eq!(ok(OUTBOX).server.max_header_size, 1_048_576);
    let c = ok(&format!("[server]\nmax_header_size = \"64KB\"\n{OUTBOX}"));
    assert_eq!(c.server.max_header_size, 65_536);
    assert_eq!(
        ok(&format!("[server]\nmax_header_size = 4096\n{OUTBOX}"))
            .server
            .max_header_size,
        4096
    );
    let p = problem(&format!("[server]\nmax_header_size = \"1XB\"\n{OUTBOX}"));
    assert_eq!(p.line, Some(2));
    assert!(p.message.contains("max_header_size"), "{}", p.message);
    let p = problem(&format!("[server]\nmax_header_size = 0\n{OUTBOX}"));
    assert!(p.message.contains("max_header_size"), "{}", p.message);
    let p = problem(&format!("[server]\nmax_header_size = \"2000GB\"\n{OUTBOX}"));
    assert!(p.message.contains("max_header_size"), "{}", p.message);
}

#[test]
fn per_client_limit_and_shutdown_grace() {
    let defaults = ok(OUTBOX).server;
    assert_eq!(defaults.max_connections_per_client, 50);
    assert_eq!(defaults.shutdown_grace, Duration::from_secs(30));
    let set = ok(&format!(
        "[server]\nmax_connections_per_client = 100000\nshutdown_grace = \"2m\"\n{OUTBOX}"
    ))
    .server;
    assert_eq!(set.max_connections_per_client, 100_000);
    assert_eq!(set.shutdown_grace, Duration::from_secs(120));
    let p = problem(&format!(
        "[server]\nmax_connections_per_client = 100001\n{OUTBOX}"
    ));
    assert_eq!(p.line, Some(2));
    assert!(p.message.contains("at most 100000"), "{}", p.message);
    let p = problem(&format!("[server]\nshutdown_grace = \"soon\"\n{OUTBOX}"));
    assert_eq!(p.line, Some(2));
}

#[test]
fn state_defaults_to_local_and_reads_redis_settings() {
    assert!(matches!(ok(OUTBOX).state, StateBackend::Local));
    let config = ok(&format!(
        "{OUTBOX}[state]\nbackend = \"redis\"\nurl = \"redis://:hunter2@127.0.0.1:6390/2\"\n"
    ));
    let StateBackend::Redis(redis) = &config.state else {
        panic!("expected redis");
    };
    assert_eq!(redis.url.expose(), "redis://:hunter2@127.0.0.1:6390/2");
    assert_eq!(redis.display, "redis://127.0.0.1:6390/2");
    assert_eq!(redis.key_prefix, "mailgate:");
    assert!(!format!("{config:?}").contains("hunter2"));
    assert!(config.has_literal_secrets);
    let tls = ok(&format!(
        "{OUTBOX}[state]\nbackend = \"redis\"\nurl = \"rediss://r.example:6380\"\nkey_prefix = \"fleet1:\"\n"
    ));
    let StateBackend::Redis(redis) = &tls.state else {
        panic!("expected redis");
    };
    assert_eq!(redis.display, "rediss://r.example:6380/0");
    assert_eq!(redis.key_prefix, "fleet1:");
}

#[test]
fn state_problems_name_their_line_and_never_the_url() {
    let p = problem(&format!("{OUTBOX}[state]\nbackend = \"memcached\"\n"));
    assert_eq!(p.line, Some(6));
    assert!(p.message.contains("\"local\", \"redis\""), "{}", p.message);
    let p = problem(&format!("{OUTBOX}[state]\nbackend = \"redis\"\n"));
    assert_eq!(p.line, Some(6));
    assert!(p.message.contains("needs url"), "{}", p.message);
    let p = problem(&format!(
        "{OUTBOX}[state]\nbackend = \"redis\"\nurl = \"http://user:s3cret@host\"\n"
    ));
    assert_eq!(p.line, Some(7));
    assert!(p.message.contains("redis://"), "{}", p.message);
    assert!(!p.message.contains("s3cret"), "{}", p.message);
    let p = problem(&format!("{OUTBOX}[state]\nurl = \"redis://127.0.0.1\"\n"));
    assert_eq!(p.line, Some(6));
    assert!(
        p.message.contains("for backend = \"redis\" only"),
        "{}",
        p.message
    );
    let p = problem(&format!(
        "{OUTBOX}[state]\nbackend = \"redis\"\nurl_env = \"MAILGATE_TEST_UNSET_REDIS_URL\"\n"
    ));
    assert_eq!(p.line, Some(7));
    let p = problem(&format!(
        "{OUTBOX}[state]\nbackend = \"redis\"\nurl = \"redis://h\"\nkey_prefix = \"a b\"\n"
    ));
    assert_eq!(p.line, Some(8));
}

#[test]
fn metrics_listen_is_read_and_optional() {
    let config = ok(&format!(
        "{OUTBOX}\n[metrics]\nlisten = \"127.0.0.1:9325\"\n"
    ));
    let listen: SocketAddr = "127.0.0.1:9325".parse().unwrap();
    assert_eq!(config.metrics, Some(Metrics::on(vec![listen])));
    let both = ok(&format!(
        "{OUTBOX}\n[metrics]\nlisten = \"localhost:9325\"\n"
    ));
    assert_eq!(both.metrics.unwrap().listen.len(), 2);
    // Not loopback is allowed: a Prometheus elsewhere must reach it (the README warns).
    let open = ok(&format!("{OUTBOX}\n[metrics]\nlisten = \"0.0.0.0:9325\"\n"));
    assert!(open.metrics.is_some());
    assert_eq!(ok(OUTBOX).metrics, None);
}

#[test]
fn metrics_problems_are_all_listed_with_their_lines() {
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:2525\"]\n{OUTBOX}\n[metrics]\nlisten = \"127.0.0.1:2525\"\nport = 9\n"
    );
    let all = problems(&text);
    let lines: Vec<(Option<usize>, &str)> =
        all.iter().map(|p| (p.line, p.message.as_str())).collect();
    assert_eq!(
        lines,
        vec![
            (
                Some(9),
                "\"listen\" in [metrics]: 127.0.0.1:2525 is also an SMTP listener in [server]"
            ),
            (Some(10), "unknown key \"port\" in [metrics]"),
        ],
        "{all:#?}"
    );
    let bad = problem(&format!("{OUTBOX}\n[metrics]\nlisten = \"nine\"\n"));
    assert_eq!(bad.line, Some(7));
    assert!(
        bad.message
            .starts_with("\"listen\" in [metrics]: invalid listener"),
        "{bad:?}"
    );
    let missing = problem(&format!("{OUTBOX}\n[metrics]\n"));
    assert_eq!(missing.line, Some(6));
    assert!(
        missing.message.contains("[metrics] needs listen"),
        "{missing:?}"
    );
    let wrong = problem(&format!("metrics = 3\n{OUTBOX}"));
    assert!(wrong.message.contains("expected a table"), "{wrong:?}");
}

const DAVE: &str = "[channels.dave]\nkind = \"graph\"\nmailbox = \"dave@example.com\"\n\
                    oauth = { provider = \"microsoft\", grant = \"client_credentials\", tenant = \"example.com\", client_id = \"app-id\", client_secret = \"s3cret\" }\n";

fn graph(config: &Config, name: &str) -> GraphTarget {
    let id = config.channel_id(name).expect("channel exists");
    match &config.channels[id].kind {
        ChannelKind::Graph(g) => g.clone(),
        _ => panic!("{name} is not a graph channel"),
    }
}

#[test]
fn graph_channel_defaults_follow_the_spec() {
    let config = ok(DAVE);
    let ch = &config.channels[0];
    assert_eq!(
        ch.scope,
        vec![SenderPattern::Exact("dave@example.com".into())]
    );
    assert!(ch.address_scoped);
    assert_eq!(
        ch.limits,
        Limits {
            rate: Some(Rate {
                count: 30,
                per: Duration::from_secs(60)
            }),
            recipients_per_day: Some(10_000),
            max_recipients: Some(500),
            connections: 4,
            max_message_size: Some(35 * 1024 * 1024),
        }
    );
    let g = graph(&config, "dave");
    assert_eq!(g.mailbox, "dave@example.com");
    assert_eq!(g.graph_url(), "https://graph.microsoft.com");
    assert_eq!(g.oauth.scope, "https://graph.microsoft.com/.default");
    assert_eq!(
        g.oauth.token_url,
        "https://login.microsoftonline.com/example.com/oauth2/v2.0/token"
    );

    // Delegated: the Graph delegated scope; graph_url overridable (loopback http for tests).
    let delegated = ok(&DAVE.replace(
        "grant = \"client_credentials\", tenant = \"example.com\", client_id = \"app-id\", client_secret = \"s3cret\"",
        "client_id = \"app-id\", refresh_token = \"rt\", graph_url = \"http://127.0.0.1:8080/\"",
    ));
    let g = graph(&delegated, "dave");
    assert_eq!(
        g.oauth.scope,
        "https://graph.microsoft.com/Mail.Send offline_access"
    );
    assert_eq!(g.graph_url(), "http://127.0.0.1:8080");

    // Explicit limits override the preset; senders may repeat the mailbox.
    let set = ok(&format!(
        "{DAVE}senders = [\"Dave@Example.com\"]\nconnections = 2\nmax_message_size = 1000\n"
    ));
    assert_eq!(set.channels[0].limits.connections, 2);
    assert_eq!(set.channels[0].limits.max_message_size, Some(1000));
}

#[test]
fn graph_channel_problems_name_the_channel() {
    let p = problem(&format!(
        "{DAVE}senders = [\"dave@example.com\", \"*@example.com\"]\n"
    ));
    assert_eq!(p.line, Some(5));
    assert!(
        p.message.contains("[channels.dave] is a graph channel"),
        "{}",
        p.message
    );
    assert!(p.message.contains("\"*@example.com\""), "{}", p.message);
    let p = problem(&format!("{DAVE}senders = [\"erin@example.com\"]\n"));
    assert!(
        p.message.contains("not \"erin@example.com\""),
        "{}",
        p.message
    );
    let p = problem(&format!("{DAVE}domains = [\"example.com\"]\n"));
    assert!(
        p.message.contains("domain \"example.com\""),
        "{}",
        p.message
    );
    let p = problem(&DAVE.replace("mailbox = \"dave@example.com\"\n", ""));
    assert!(p.message.contains("no mailbox"), "{}", p.message);
    let p = problem(&DAVE.replace("dave@example.com", "dave/../x@example.com"));
    assert!(p.message.contains("not a mailbox address"), "{}", p.message);
    let p = problem(&DAVE.replace(
        "provider = \"microsoft\", grant = \"client_credentials\", tenant = \"example.com\", ",
        "provider = \"google\", ",
    ));
    assert!(p.message.contains("microsoft"), "{}", p.message);
    let p = problem(&format!("{DAVE}host = \"smtp.example.com\"\n"));
    assert!(
        p.message.contains("not used by kind = \"graph\""),
        "{}",
        p.message
    );
    let p = problem("[channels.dave]\nkind = \"graph\"\nmailbox = \"dave@example.com\"\n");
    assert!(p.message.contains("no oauth"), "{}", p.message);
    let p = problem(&format!("{OUTBOX}mailbox = \"x@example.com\"\n"));
    assert!(
        p.message.contains("only for kind = \"graph\""),
        "{}",
        p.message
    );
}

const ALICE_SMTP: &str = "[channels.alice]\nhost = \"smtp.example.com\"\nusername = \"alice@example.com\"\n\
                          password = \"pw\"\nsenders = [\"alice@example.com\"]\n";

#[test]
fn fallback_is_resolved_and_not_a_routing_candidate() {
    let config = ok(&format!(
        "{ALICE_SMTP}fallback = \"dave\"\n{}",
        DAVE.replace("dave@example.com", "alice@example.com")
    ));
    let alice = config.channel_id("alice").unwrap();
    let dave = config.channel_id("dave").unwrap();
    assert_eq!(config.channels[alice].fallback, Some(dave));
    assert!(config.is_fallback(dave) && !config.is_fallback(alice));
    // Both claim alice@example.com, yet no clash: the fallback is no candidate.
    let route = crate::routing::route_sender(&config, "alice@example.com").unwrap();
    assert_eq!(route.channel, alice);
}

#[test]
fn fallback_problems() {
    let p = problem(&format!("{ALICE_SMTP}fallback = \"nobody\"\n"));
    assert_eq!(p.line, Some(6));
    assert!(p.message.contains("no channel \"nobody\""), "{}", p.message);
    let p = problem(&format!("{ALICE_SMTP}fallback = \"alice\"\n"));
    assert!(p.message.contains("names itself"), "{}", p.message);
    // The fallback's mailbox must cover the channel's senders.
    let p = problem(&format!("{ALICE_SMTP}fallback = \"dave\"\n{DAVE}"));
    assert!(
        p.message
            .contains("does not cover sender \"alice@example.com\""),
        "{}",
        p.message
    );
    // A loop.
    let all = problems(&format!(
        "{ALICE_SMTP}fallback = \"bob\"\n[channels.bob]\nhost = \"smtp.example.com\"\nusername = \"u\"\npassword = \"pw\"\nsenders = [\"alice@example.com\"]\nfallback = \"alice\"\n"
    ));
    assert!(
        all.iter().any(|p| p.message.contains("loops back")),
        "{all:#?}"
    );
}

#[test]
fn https_proxy_is_a_proxy_url_and_never_prints_its_password() {
    assert_eq!(ok(OUTBOX).server.https_proxy, None);
    let empty = ok(&format!("[server]\nhttps_proxy = \"\"\n{OUTBOX}"));
    assert_eq!(empty.server.https_proxy, None, "empty: the environment's");
    let set = ok(&format!(
        "[server]\nhttps_proxy = \"http://svc:pr0xy-pw@proxy.corp:3128\"\n{OUTBOX}"
    ));
    let proxy = set.server.https_proxy.as_ref().expect("set");
    assert_eq!(proxy.to_string(), "http://***@proxy.corp:3128");
    assert!(!format!("{set:?}").contains("pr0xy-pw"));
    assert!(
        ok(&format!(
            "[server]\nhttps_proxy = \"https://proxy.corp\"\n{OUTBOX}"
        ))
        .server
        .https_proxy
        .is_some()
    );
    for bad in [
        "proxy.corp:3128",
        "socks5://proxy.corp:1080",
        "http://u:pr0xy-pw@proxy.corp:3128/path",
        "http://",
    ] {
        let p = problem(&format!("[server]\nhttps_proxy = \"{bad}\"\n{OUTBOX}"));
        assert_eq!(p.line, Some(2), "{bad}");
        assert!(p.message.contains("https_proxy"), "{}", p.message);
        assert!(!p.message.contains("pr0xy-pw"), "{}", p.message);
    }
    let p = problem(&format!("[server]\nhttps_proxy = 3128\n{OUTBOX}"));
    assert_eq!(p.line, Some(2));
}

#[test]
fn acs_preset_is_domain_scoped_with_the_communication_scope_for_app_tokens() {
    let base = "[channels.acs]\npreset = \"acs\"\ndomains = [\"example.com\"]\n";
    let config = ok(&format!(
        "{base}username = \"mailer|11111111-2222-3333-4444-555555555555|66666666-7777-8888-9999-000000000000\"\npassword_env = \"PATH\"\n"
    ));
    let t = smtp(&config, "acs");
    assert_eq!(
        (t.host.as_str(), t.port, t.tls),
        ("smtp.azurecomm.net", 587, TlsMode::Starttls)
    );
    let id = config.channel_id("acs").unwrap();
    assert_eq!(
        config.channels[id].limits.rate, None,
        "the README says: set rate to the quota"
    );
    // An SMTP Username resource's name (free form or an address) is fine too.
    ok(&format!(
        "{base}username = \"mailer@example.com\"\npassword_env = \"PATH\"\n"
    ));
    // XOAUTH2 with the app's own token: the ACS audience by default.
    let app = format!(
        "{base}username = \"mailer|app|tenant\"\noauth = {{ provider = \"microsoft\", grant = \"client_credentials\", tenant = \"example.com\", client_id = \"app\", client_secret_env = \"PATH\" }}\n"
    );
    let config = ok(&app);
    assert_eq!(
        oauth_of(&config, "acs").scope,
        "https://communication.azure.com/.default"
    );
    let p = problem(&format!(
        "{base}username = \"mailer|app\"\npassword_env = \"PATH\"\n"
    ));
    assert_eq!(p.line, Some(4));
    assert!(
        p.message.contains("<resource>|<app id>|<tenant id>"),
        "{}",
        p.message
    );
    let p = problem(&format!(
        "{base}username = \"mailer||tenant\"\npassword_env = \"PATH\"\n"
    ));
    assert_eq!(p.line, Some(4));
    // A user's delegated token does not open ACS.
    let p = problem(&format!(
        "{base}username = \"mailer|app|tenant\"\noauth = {{ provider = \"microsoft\", client_id = \"app\", refresh_token_env = \"PATH\" }}\n"
    ));
    assert!(p.message.contains("client_credentials"), "{}", p.message);
}

#[test]
fn hve_preset_is_address_scoped_with_exchange_scope_for_app_tokens() {
    let base = "[channels.hve]\npreset = \"hve\"\nusername = \"notify@example.com\"\n";
    let config = ok(&format!(
        "{base}senders = [\"notify@example.com\"]\npassword_env = \"PATH\"\n"
    ));
    let t = smtp(&config, "hve");
    assert_eq!(
        (t.host.as_str(), t.port, t.tls),
        ("smtp.hve.mx.microsoft", 587, TlsMode::Starttls)
    );
    let config = ok(&format!(
        "{base}senders = [\"notify@example.com\"]\noauth = {{ provider = \"microsoft\", grant = \"client_credentials\", tenant = \"example.com\", client_id = \"app\", client_secret_env = \"PATH\" }}\n"
    ));
    assert_eq!(
        oauth_of(&config, "hve").scope,
        "https://outlook.office365.com/.default"
    );
    let p = problem(&format!(
        "{base}domains = [\"example.com\"]\npassword_env = \"PATH\"\n"
    ));
    assert!(p.message.contains("hve"), "{}", p.message);
    // An explicit scope wins over the preset's.
    let config = ok(&format!(
        "{base}senders = [\"notify@example.com\"]\noauth = {{ provider = \"microsoft\", grant = \"client_credentials\", client_id = \"app\", client_secret_env = \"PATH\", scope = \"api://x/.default\" }}\n"
    ));
    assert_eq!(oauth_of(&config, "hve").scope, "api://x/.default");
}
