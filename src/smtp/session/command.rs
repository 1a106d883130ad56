//! The command line, the liberal way: before smtp-proto parses a line, it is rewritten
//! into what Postfix would accept (bare addresses bracketed, trailing blanks dropped,
//! over-long `SIZE=` clamped). Pure, so the `command` fuzz target can drive it.

use std::borrow::Cow;

use smtp_proto::{Error as ParseError, Request};

use crate::message::address::{self, PathError};
use crate::smtp::reply::{Reply, Syntax};

/// Parses one command line (CRLF or LF included) the liberal way (see [`liberal`]);
/// a line that is not a valid command yields the reply the client gets. Public so a
/// fuzz target can drive it.
pub fn parse_command(line: &[u8]) -> Result<Request<String>, Reply> {
    let line = liberal(line);
    let mut request = Request::parse(&mut line.iter())
        .map(Request::into_owned)
        .map_err(parse_error_reply)?;
    let (address, sender) = match &mut request {
        Request::Mail { from } => (&mut from.address, true),
        Request::Rcpt { to } => (&mut to.address, false),
        _ => return Ok(request),
    };
    // smtp-proto strips the quotes of a quoted local part; such a path is read again.
    if let Some(path) = address::path_in_line(&line)
        && address::needs_own_reading(path)
    {
        *address = address::canonical_mailbox(path).map_err(|e| match e {
            PathError::AngleBracket => Reply::local_part_not_relayed(sender),
            PathError::Syntax if sender => Reply::bad_parameters(Syntax::InvalidSender),
            PathError::Syntax => Reply::bad_parameters(Syntax::InvalidRecipient),
        })?;
        return Ok(request);
    }
    if let Request::Rcpt { to } = &mut request
        && to.address.is_empty()
        && let Some(name) = postmaster_in(&line)
    {
        to.address = name;
    }
    Ok(request)
}

/// smtp-proto reads `RCPT TO:<Postmaster>` as the empty path `<>`; the session must
/// tell them apart (RFC 5321 §4.5.1), so the name is taken from the line as written.
fn postmaster_in(line: &[u8]) -> Option<String> {
    let open = line.iter().position(|&b| b == b'<')?;
    let close = open + line[open..].iter().position(|&b| b == b'>')?;
    let path = &line[open + 1..close];
    // A source route (`<@relay:Postmaster>`) is dropped, as smtp-proto drops it.
    let mailbox = match path.strip_prefix(b"@") {
        Some(_) => &path[path.iter().rposition(|&b| b == b':')? + 1..],
        None => path,
    };
    mailbox
        .eq_ignore_ascii_case(b"postmaster")
        .then(|| String::from_utf8_lossy(mailbox).into_owned())
}

/// The reply to a command line smtp-proto could not parse.
fn parse_error_reply(error: ParseError) -> Reply {
    match error {
        ParseError::UnknownCommand => Reply::unknown_command(),
        ParseError::InvalidSenderAddress => Reply::bad_parameters(Syntax::InvalidSender),
        ParseError::InvalidRecipientAddress => Reply::bad_parameters(Syntax::InvalidRecipient),
        ParseError::SyntaxError { syntax } => Reply::bad_parameters(Syntax::Use(syntax)),
        ParseError::InvalidParameter { param } => {
            Reply::bad_parameters(Syntax::InvalidParameter(param))
        }
        ParseError::UnsupportedParameter { param } => {
            Reply::bad_parameters(Syntax::UnsupportedParameter(param))
        }
        ParseError::NeedsMoreData { .. }
        | ParseError::ResponseTooLong
        | ParseError::InvalidResponse { .. } => Reply::bad_parameters(Syntax::Incomplete),
    }
}

/// Rewrites a command line the way Postfix would accept it: trailing blanks dropped,
/// and a bare address after `MAIL FROM:` / `RCPT TO:` wrapped in angle brackets.
fn liberal(line: &[u8]) -> Cow<'_, [u8]> {
    let content = line.strip_suffix(b"\n").unwrap_or(line);
    let content = content.strip_suffix(b"\r").unwrap_or(content);
    let trimmed = content.trim_ascii_end();
    let wrapped = wrap_bare_address(trimmed);
    let clamped = clamp_size(wrapped.as_deref().unwrap_or(trimmed));
    let wrapped = clamped.or(wrapped);
    if wrapped.is_none() && trimmed.len() == content.len() && line.ends_with(b"\r\n") {
        return Cow::Borrowed(line);
    }
    let mut fixed = wrapped.unwrap_or_else(|| trimmed.to_vec());
    fixed.extend_from_slice(b"\r\n");
    Cow::Owned(fixed)
}

/// `MAIL FROM:a@b [params]` → `MAIL FROM:<a@b> [params]` (also RCPT TO); `None` when
/// the line is not such a command or already has brackets.
fn wrap_bare_address(line: &[u8]) -> Option<Vec<u8>> {
    let verb = line.get(..4)?;
    let keyword: &[u8] = if verb.eq_ignore_ascii_case(b"MAIL") {
        b"FROM"
    } else if verb.eq_ignore_ascii_case(b"RCPT") {
        b"TO"
    } else {
        return None;
    };
    let rest = &line[4..];
    let after_space = rest.trim_ascii_start();
    if after_space.len() == rest.len() {
        return None;
    }
    let after_keyword = after_space.get(keyword.len()..)?;
    if !after_space[..keyword.len()].eq_ignore_ascii_case(keyword) {
        return None;
    }
    let after_colon = after_keyword.trim_ascii_start().strip_prefix(b":")?;
    let address_start = after_colon.trim_ascii_start();
    if address_start.is_empty() || address_start[0] == b'<' {
        return None;
    }
    let address_len = address_start
        .iter()
        .position(|b| b.is_ascii_whitespace())
        .unwrap_or(address_start.len());
    let prefix_len = line.len() - address_start.len();
    let mut fixed = Vec::with_capacity(line.len() + 2);
    fixed.extend_from_slice(&line[..prefix_len]);
    fixed.push(b'<');
    fixed.extend_from_slice(&address_start[..address_len]);
    fixed.push(b'>');
    fixed.extend_from_slice(&address_start[address_len..]);
    Some(fixed)
}

/// The largest `SIZE=` value passed on to smtp-proto: over any `max_message_size`, and
/// still parsed exactly (it fits in 64 bits and is not smtp-proto's "invalid" `usize::MAX`).
const SIZE_CLAMP: &[u8] = b"18446744073709551614";

/// `MAIL FROM:<a@b> SIZE=<more than 64 bits of digits>` → `SIZE=18446744073709551614`.
/// smtp-proto saturates an over-long SIZE and then starts again from the next digit, so
/// `SIZE=10^22` would read as a tiny size and pass; clamped, it is refused as too big.
fn clamp_size(line: &[u8]) -> Option<Vec<u8>> {
    if !line.get(..4)?.eq_ignore_ascii_case(b"MAIL") {
        return None;
    }
    let start = line
        .windows(6)
        .position(|w| w.eq_ignore_ascii_case(b" SIZE="))?
        + 6;
    let digits = line[start..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    let value = &line[start..start + digits];
    let fits = std::str::from_utf8(value).is_ok_and(|v| v.parse::<u64>().is_ok());
    if digits == 0 || fits {
        return None;
    }
    let mut fixed = line[..start].to_vec();
    fixed.extend_from_slice(SIZE_CLAMP);
    fixed.extend_from_slice(&line[start + digits..]);
    Some(fixed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reply's last line starts with `code` (e.g. `"503 5.5.1"`).
    #[track_caller]
    fn assert_code(reply: &str, code: &str) {
        let last = reply.lines().last().unwrap_or("");
        assert!(last.starts_with(code), "expected {code}, got {reply:?}");
    }

    #[test]
    fn liberal_rewrites_bare_addresses_and_trailing_blanks() {
        let cases: &[(&str, &str)] = &[
            ("MAIL FROM:a@b\r\n", "MAIL FROM:<a@b>\r\n"),
            ("mail from: a@b SIZE=10\r\n", "mail from: <a@b> SIZE=10\r\n"),
            ("RCPT TO:x@y  \r\n", "RCPT TO:<x@y>\r\n"),
            ("rcpt to : x@y\n", "rcpt to : <x@y>\r\n"),
            ("MAIL FROM:<a@b>\r\n", "MAIL FROM:<a@b>\r\n"),
            ("MAIL FROM: <a@b> \t\r\n", "MAIL FROM: <a@b>\r\n"),
            ("MAIL FROM:\r\n", "MAIL FROM:\r\n"),
            ("MAILFROM:a@b\r\n", "MAILFROM:a@b\r\n"),
            ("NOOP\n", "NOOP\r\n"),
            (
                "MAIL FROM:<a@b> SIZE=99999999999999999999999 BODY=8BITMIME\r\n",
                "MAIL FROM:<a@b> SIZE=18446744073709551614 BODY=8BITMIME\r\n",
            ),
            (
                "mail from:a@b size=18446744073709551616\r\n",
                "mail from:<a@b> size=18446744073709551614\r\n",
            ),
            (
                "MAIL FROM:<a@b> SIZE=18446744073709551615\r\n",
                "MAIL FROM:<a@b> SIZE=18446744073709551615\r\n",
            ),
            (
                "RCPT TO:<a@b> SIZE=99999999999999999999999\r\n",
                "RCPT TO:<a@b> SIZE=99999999999999999999999\r\n",
            ),
        ];
        for (input, want) in cases {
            let got = liberal(input.as_bytes());
            assert_eq!(String::from_utf8_lossy(&got), *want, "{input:?}");
        }
    }

    #[test]
    fn parse_command_maps_errors_and_never_panics() {
        assert!(
            matches!(parse_command(b"mail from:a@b\r\n"), Ok(Request::Mail { from }) if from.address == "a@b")
        );
        assert_code(
            &parse_command(b"HELLO\r\n").unwrap_err().to_string(),
            "500 5.5.2",
        );
        assert_code(
            &parse_command(b"MAIL TO:<a@b>\r\n").unwrap_err().to_string(),
            "501 5.5.4",
        );
        // Random lines over an SMTP-ish alphabet: an answer for each, never a panic.
        let alphabet = b"MAILFROMRCPTODBHEUSQ:<>@.= \r\x00\xc3\xa9aZ9\"\\,";
        let mut state = 0x853c_49e6_748f_ea9b_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as usize
        };
        for _ in 0..50_000 {
            let len = next() % 40;
            let verbs = [
                "MAIL FROM:",
                "rcpt to: ",
                "EHLO ",
                "AUTH PLAIN ",
                "BDAT 1",
                "VRFY ",
                "",
            ];
            let mut line = verbs[next() % verbs.len()].as_bytes().to_vec();
            line.extend((0..len).map(|_| alphabet[next() % alphabet.len()]));
            line.extend_from_slice(b"\r\n");
            let _ = parse_command(&line);
        }
    }

    #[test]
    fn quoted_local_parts_keep_their_quotes() {
        let address = |line: &str| match parse_command(line.as_bytes()) {
            Ok(Request::Mail { from }) => Ok(from.address),
            Ok(Request::Rcpt { to }) => Ok(to.address),
            Ok(other) => panic!("{line:?}: {other:?}"),
            Err(reply) => Err(reply.to_string()),
        };
        let cases = [
            (
                "RCPT TO:<\"john doe\"@x.org> NOTIFY=NEVER\r\n",
                "\"john doe\"@x.org",
            ),
            ("rcpt to: <\"eve@y,bob\"@x.org>\r\n", "\"eve@y,bob\"@x.org"),
            ("MAIL FROM:<\"alice\"@x.org> SIZE=10\r\n", "alice@x.org"),
            ("MAIL FROM:\"alice\"@x.org\r\n", "alice@x.org"),
            ("RCPT TO:<\"Postmaster\">\r\n", "Postmaster"),
        ];
        for (line, want) in cases {
            assert_eq!(address(line).as_deref(), Ok(want), "{line:?}");
        }
        assert_code(
            &address("MAIL FROM:<\"a>b\"@x.org>\r\n").unwrap_err(),
            "553 5.1.7",
        );
        assert_code(
            &address("RCPT TO:<\"a\x01b\"@x.org>\r\n").unwrap_err(),
            "501 5.5.4",
        );
    }

    #[test]
    fn postmaster_without_domain_is_kept_apart_from_the_null_path() {
        let rcpt = |line: &[u8]| match parse_command(line) {
            Ok(Request::Rcpt { to }) => to.address,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(line)),
        };
        assert_eq!(rcpt(b"RCPT TO:<Postmaster>\r\n"), "Postmaster");
        assert_eq!(
            rcpt(b"rcpt to: <postMASTER> NOTIFY=NEVER\r\n"),
            "postMASTER"
        );
        assert_eq!(rcpt(b"RCPT TO:postmaster\r\n"), "postmaster");
        assert_eq!(
            rcpt(b"RCPT TO:<@relay.example:Postmaster>\r\n"),
            "Postmaster"
        );
        assert_eq!(rcpt(b"RCPT TO:<>\r\n"), "");
        assert_eq!(
            rcpt(b"RCPT TO:<postmaster@example.org>\r\n"),
            "postmaster@example.org"
        );
    }
}
