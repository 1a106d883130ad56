//! The sendmail command line: getopt-style flags as cron, PHP, mailx and logwatch pass them.

use std::path::PathBuf;

/// What the command line asks for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Args {
    /// `-t`: recipients also come from `To:`/`Cc:`/`Bcc:`.
    pub extract: bool,
    /// `-i`/`-oi`: a line holding only `.` is content, not the end of the message.
    pub ignore_dots: bool,
    /// `-f`/`-r`: the envelope sender as given (brackets kept; `<>` is the null sender).
    pub sender: Option<String>,
    /// `-F`: the full name for an added `From:`.
    pub full_name: Option<String>,
    /// `-B 8BITMIME`: the caller declares an 8-bit body.
    pub eightbit: bool,
    /// `-C`: the configuration file.
    pub config: Option<PathBuf>,
    /// Recipients given as arguments (each may hold a comma-separated list).
    pub recipients: Vec<String>,
    /// `--help`.
    pub help: bool,
}

/// The usage text for `--help` and for usage errors.
pub const USAGE: &str = "usage: sendmail [-t] [-i] [-oi] [-f SENDER] [-F NAME] [-B 8BITMIME|7BIT] [-C|-c CONFIG] [--] [RCPT...]\n\
reads one message on stdin and submits it to this config's first plain listener.\n\
Accepted and ignored: -bm -m -v -n -G -U -odb/-odi/-odq/-odd -oem/-oee/-oep/-oeq/-oew -om -o7 -o8 -h N -N DSN -R RET -V ENVID -L TAG -O OPT=VAL";

/// Flags that take a value, attached (`-fSENDER`) or as the next argument.
const WITH_VALUE: &str = "fFrBCcobhNRVLO";
/// Flags without a value that do not apply here and are ignored.
const IGNORED: &str = "mvnGU";

/// Parses the arguments after the program name. Options come first, as with Postfix
/// (getopt `+`): after the first recipient, or after `--`, every argument is a recipient,
/// and an argument starting with `-` there is an error rather than a strange address.
pub fn parse(args: &[String]) -> Result<Args, String> {
    let mut out = Args::default();
    let mut i = 0;
    let mut after_dashes = false;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg == "--" {
            after_dashes = true;
            break;
        }
        if arg == "--help" {
            out.help = true;
            return Ok(out);
        }
        if !arg.starts_with('-') || arg == "-" {
            i -= 1;
            break;
        }
        for (at, flag) in arg[1..].char_indices() {
            if WITH_VALUE.contains(flag) {
                let rest = &arg[1 + at + flag.len_utf8()..];
                let value = if !rest.is_empty() {
                    rest.to_string()
                } else if i < args.len() {
                    i += 1;
                    args[i - 1].clone()
                } else {
                    return Err(format!("option -{flag} needs a value"));
                };
                apply(&mut out, flag, value)?;
                break;
            }
            match flag {
                't' => out.extract = true,
                'i' => out.ignore_dots = true,
                f if IGNORED.contains(f) => {}
                other => return Err(format!("unknown option -{other}")),
            }
        }
    }
    for arg in &args[i..] {
        if arg.starts_with('-') && !after_dashes {
            return Err(format!(
                "option {arg:?} after the first recipient: options come before recipients"
            ));
        }
        for addr in list(arg) {
            check_address(addr)?;
        }
        out.recipients.push(arg.clone());
    }
    Ok(out)
}

/// The addresses of a recipient argument: a comma-separated list, spaces next to the
/// commas allowed (`"a@b, c@d"`); empty entries are left out. Spaces at either end of
/// the argument stay, so that `" a@b"` is refused like any address holding a space.
pub fn list(arg: &str) -> impl Iterator<Item = &str> {
    let last = arg.matches(',').count();
    arg.split(',')
        .enumerate()
        .map(move |(i, a)| {
            let a = if i > 0 { a.trim_start_matches(' ') } else { a };
            if i < last { a.trim_end_matches(' ') } else { a }
        })
        .filter(|a| !a.is_empty())
}

/// Refuses an address that could carry more than an address into an SMTP command or a
/// header (SPEC §2): a control character (CR/LF would end the command and start
/// another), a space, or a `<`/`>` other than one enclosing pair. Web applications pass
/// user input here (`mail ADDR`), so nothing is repaired: the whole submission fails.
pub fn check_address(addr: &str) -> Result<(), String> {
    let why = if addr.chars().any(char::is_control) {
        "a control character"
    } else if addr.chars().any(char::is_whitespace) {
        "a space"
    } else {
        let inner = addr
            .strip_prefix('<')
            .and_then(|a| a.strip_suffix('>'))
            .unwrap_or(addr);
        if !inner.contains(['<', '>']) {
            return Ok(());
        }
        "a '<' or '>' other than one enclosing pair"
    };
    Err(format!(
        "{} is not an address: it holds {why}",
        crate::text::escape_controls(addr)
    ))
}

fn apply(out: &mut Args, flag: char, value: String) -> Result<(), String> {
    match flag {
        'f' | 'r' => {
            check_address(&value)?;
            out.sender = Some(value);
        }
        'F' => {
            // It goes into an added From: header: a CR/LF there would start another field.
            if value.chars().any(char::is_control) {
                return Err(format!(
                    "-F {}: a full name holds no control characters",
                    crate::text::escape_controls(&value)
                ));
            }
            out.full_name = Some(value);
        }
        // -C is sendmail's; -c is mailgate's own, when it comes after a sendmail flag
        'C' | 'c' => out.config = Some(PathBuf::from(value)),
        'B' => match value.to_ascii_uppercase().as_str() {
            "8BITMIME" => out.eightbit = true,
            "7BIT" => out.eightbit = false,
            _ => return Err(format!("-B {value}: expected 8BITMIME or 7BIT")),
        },
        'o' => option(out, &value)?,
        'b' if value != "m" => {
            return Err(format!(
                "-b{value} is not supported: mailgate sendmail only submits mail (-bm)"
            ));
        }
        // -h hop count, -N DSN notify, -R DSN return, -V envelope id, -L syslog tag,
        // -O option=value: meaningful to a full MTA, not to a submission client.
        _ => {}
    }
    Ok(())
}

/// `-oX`: sendmail's one-letter options; only `-oi` changes anything here.
fn option(out: &mut Args, value: &str) -> Result<(), String> {
    let mut chars = value.chars();
    match (chars.next(), chars.as_str()) {
        (Some('i'), "") => out.ignore_dots = true,
        // -om (me too), -o7/-o8 (body type hints)
        (Some('m' | '7' | '8'), "") => {}
        // delivery mode: background, interactive, queue, deferred
        (Some('d'), "b" | "i" | "q" | "d" | "") => {}
        // error mode: mail, exit status, print, quiet, write: the exit status is always used
        (Some('e'), "m" | "e" | "p" | "q" | "w") => {}
        _ => return Err(format!("unknown option -o{value}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Args, String> {
        parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn php_and_logwatch() {
        let a = p(&["-t", "-i"]).unwrap();
        assert!(a.extract && a.ignore_dots && a.recipients.is_empty());
        let a = p(&["-ti", "-fweb@example.com"]).unwrap();
        assert!(a.extract && a.ignore_dots);
        assert_eq!(a.sender.as_deref(), Some("web@example.com"));
        assert!(p(&["-t"]).unwrap().extract);
    }

    #[test]
    fn debian_cron_and_cronie() {
        let a = p(&["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"]).unwrap();
        assert_eq!(a.full_name.as_deref(), Some("CronDaemon"));
        assert!(a.ignore_dots && a.eightbit && !a.extract);
        assert_eq!(a.recipients, ["root"]);
        let a = p(&[
            "-FCronDaemon",
            "-i",
            "-odi",
            "-oem",
            "-oi",
            "-t",
            "-f",
            "root",
        ])
        .unwrap();
        assert!(a.extract && a.ignore_dots);
        assert_eq!(a.sender.as_deref(), Some("root"));
        let a = p(&["-B", "8BITMIME", "-F", "Cron Daemon", "a@b", "c@d"]).unwrap();
        assert!(a.eightbit);
        assert_eq!(a.full_name.as_deref(), Some("Cron Daemon"));
        assert_eq!(a.recipients, ["a@b", "c@d"]);
    }

    #[test]
    fn mailx_and_ignored_flags() {
        let a = p(&["-i", "-m", "-v", "--", "-odd-name@example.com"]).unwrap();
        assert_eq!(a.recipients, ["-odd-name@example.com"]);
        for ok in [
            "-bm", "-om", "-o7", "-o8", "-odb", "-odq", "-oee", "-oep", "-oeq", "-oew", "-G", "-U",
            "-n",
        ] {
            assert_eq!(p(&[ok, "x@y"]).unwrap().recipients, ["x@y"], "{ok}");
        }
        for (flag, value) in [("-h", "5"), ("-N", "never"), ("-R", "hdrs"), ("-V", "id")] {
            assert_eq!(p(&[flag, value, "x@y"]).unwrap().recipients, ["x@y"]);
        }
        for flag in ["-C", "-c"] {
            assert_eq!(
                p(&["-t", flag, "/etc/m.toml"]).unwrap().config,
                Some(PathBuf::from("/etc/m.toml"))
            );
        }
        assert!(!p(&["-i"]).unwrap().extract);
        assert!(p(&["--help"]).unwrap().help);
    }

    #[test]
    fn addresses_that_could_inject_are_refused() {
        let payload =
            "b@example.org>\r\nDATA\r\nSubject: forged\r\n\r\nx\r\n.\r\nMAIL FROM:<a@example.com";
        for bad in [
            payload,
            "a@b\r\nRSET",
            "a@b\nx",
            "a@b\tx",
            "a@b\u{7f}",
            "a@b\u{85}",
            "a b@example.org",
            "a@b\u{a0}",
            "<<a@b>>",
            "<a@b",
            "a@b>",
            "a<b>@c",
            "<a@b>>",
            "<>x>",
        ] {
            let err = check_address(bad).unwrap_err();
            assert!(err.contains("is not an address"), "{err}");
            assert!(!err.contains(['\r', '\n']), "{err}");
            // as a recipient, inside a list, and as -f/-r
            assert_eq!(p(&[bad]).unwrap_err(), err);
            assert_eq!(p(&[&format!("ok@x, {bad}")]).unwrap_err(), err);
            assert_eq!(p(&["--", bad]).unwrap_err(), err);
            assert_eq!(p(&["-f", bad, "x@y"]).unwrap_err(), err);
            assert_eq!(p(&[&format!("-r{bad}"), "x@y"]).unwrap_err(), err);
        }
        assert!(p(&[payload]).unwrap_err().contains("\\x0d\\x0aDATA"));
        for good in ["<a@b>", "a@b", "root", "<>", "jörg@example.de", "\"q\"@x"] {
            assert_eq!(check_address(good), Ok(()), "{good}");
            assert_eq!(p(&[good]).unwrap().recipients, [good]);
            assert_eq!(p(&["-f", good]).unwrap().sender.as_deref(), Some(good));
        }
        // a list: spaces around the commas are separators, empty entries ignored
        assert_eq!(
            list("a@b, <c@d> ,,e@f").collect::<Vec<_>>(),
            ["a@b", "<c@d>", "e@f"]
        );
        assert_eq!(list(" a@b,c@d ").collect::<Vec<_>>(), [" a@b", "c@d "]);
        assert!(p(&["a@b, c@d"]).is_ok());
        for bad in [" a@b", "a@b ", "a@b, c@d "] {
            assert!(p(&[bad]).unwrap_err().contains("a space"), "{bad:?}");
        }
    }

    #[test]
    fn a_full_name_cannot_start_another_header() {
        for bad in [
            "Cron\r\nBcc: eve@evil.org",
            "Cron\nX: y",
            "Cron\rX",
            "A\u{0}",
        ] {
            let err = p(&["-F", bad, "x@y"]).unwrap_err();
            assert!(err.contains("no control characters"), "{err}");
            assert!(!err.contains(['\r', '\n']), "{err}");
        }
        assert_eq!(
            p(&["-F", "Cron Daemon <x>, \"q\"", "x@y"])
                .unwrap()
                .full_name
                .as_deref(),
            Some("Cron Daemon <x>, \"q\"")
        );
    }

    #[test]
    fn errors_name_the_flag() {
        assert_eq!(p(&["-x"]).unwrap_err(), "unknown option -x");
        assert_eq!(p(&["-tq"]).unwrap_err(), "unknown option -q");
        assert_eq!(p(&["-oZ"]).unwrap_err(), "unknown option -oZ");
        assert_eq!(p(&["-f"]).unwrap_err(), "option -f needs a value");
        assert!(p(&["-bp"]).unwrap_err().contains("-bp is not supported"));
        assert!(p(&["-bs"]).unwrap_err().contains("not supported"));
        assert!(p(&["-B", "9BIT"]).unwrap_err().contains("8BITMIME or 7BIT"));
        assert!(
            p(&["root", "-i"])
                .unwrap_err()
                .contains("options come before recipients")
        );
    }
}
