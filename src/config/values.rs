//! Value forms: durations, sizes, rates, listeners, networks, domains, sender patterns.
//!
//! Each parser takes the text as written and explains the expected form when it is wrong;
//! the reader adds the key and the line.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use super::{Rate, Secret, SenderPattern, TlsMode};

/// One kilobyte. Sizes use binary units: 1KB = 1024 bytes, 1MB = 1024 KB, 1GB = 1024 MB
/// (providers quote limits like "35MB" loosely; the binary reading is the generous one).
pub(crate) const KB: u64 = 1024;
/// One megabyte (1024 × 1024 bytes), see [`KB`].
pub(crate) const MB: u64 = 1024 * KB;
/// One gigabyte (1024³ bytes), see [`KB`].
pub(crate) const GB: u64 = 1024 * MB;

/// The largest size accepted: far beyond any message, and far from overflowing
/// whatever a size is added to.
const MAX_SIZE: u64 = 1024 * GB;
/// The longest duration accepted (100 years): later than any retry or timeout means,
/// and far from overflowing a clock.
const MAX_DURATION: Duration = Duration::from_secs(36_500 * 86_400);

pub(super) const DURATION_FORMS: &str =
    r#"expected a whole number and a unit: "500ms", "30s", "5m", "1h" or "5d""#;

/// `"500ms"`, `"30s"`, `"5m"` (or `"5min"`), `"1h"`, `"5d"` (read by `humantime`, so
/// `"1h 30m"` works too); more than zero and at most 100 years.
pub(super) fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {text:?}: {DURATION_FORMS}");
    // Units are not case-sensitive here ("5M" is five minutes, as it always was), and
    // humantime reads "M" as months: lower-case first.
    let t = text.trim().to_ascii_lowercase();
    // humantime also takes fractions of nothing and signs in some forms; only digits lead.
    if !t.starts_with(|c: char| c.is_ascii_digit()) || t.contains(['.', '-', '+']) {
        return Err(bad());
    }
    let duration = humantime::parse_duration(&t).map_err(|e| match e {
        humantime::DurationError::NumberOverflow => {
            format!("invalid duration {text:?}: too long to use")
        }
        _ => bad(),
    })?;
    if duration.is_zero() {
        return Err(format!("invalid duration {text:?}: must be more than zero"));
    }
    if duration > MAX_DURATION {
        return Err(format!(
            "invalid duration {text:?}: too long to use (at most 36500d)"
        ));
    }
    Ok(duration)
}

/// Integer bytes as a string (`"1000"`), or a number with KB, MB or GB (binary, see [`KB`]).
pub(super) fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            r#"invalid size {text:?}: expected bytes, or a whole number with KB, MB or GB, e.g. "35MB""#
        )
    };
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    if number.is_empty() {
        return Err(bad());
    }
    let unit_len = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => KB,
        "M" | "MB" | "MIB" => MB,
        "G" | "GB" | "GIB" => GB,
        _ => return Err(bad()),
    };
    let too_large = || format!("invalid size {text:?}: too large to use (at most 1024GB)");
    // Digits only, so the one way to fail is a number beyond u64.
    let number: u64 = number.parse().map_err(|_| too_large())?;
    size_in_range(number.checked_mul(unit_len).ok_or_else(too_large)?)
        .map_err(|why| format!("invalid size {text:?}: {why}"))
}

/// A size in bytes: more than zero, at most 1024GB.
pub(super) fn size_in_range(bytes: u64) -> Result<u64, String> {
    if bytes == 0 {
        Err("must be more than zero".to_owned())
    } else if bytes > MAX_SIZE {
        Err("too large to use (at most 1024GB)".to_owned())
    } else {
        Ok(bytes)
    }
}

/// `"30/min"`, `"5/s"`, `"100/h"`, `"2000/day"`; the window may also be a duration (`"10/5m"`).
pub(super) fn parse_rate(text: &str) -> Result<Rate, String> {
    let bad = || {
        format!(
            r#"invalid rate {text:?}: expected a count per unit, e.g. "30/min", "5/s", "100/h" or "2000/day""#
        )
    };
    let (count, unit) = text.split_once('/').ok_or_else(bad)?;
    let count: u64 = count.trim().parse().map_err(|_| bad())?;
    if count == 0 {
        return Err(format!(
            "invalid rate {text:?}: the count must be more than zero"
        ));
    }
    let per = match unit.trim().to_ascii_lowercase().as_str() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        "d" | "day" => Duration::from_secs(86_400),
        other => parse_duration(other).map_err(|_| bad())?,
    };
    Ok(Rate { count, per })
}

/// `"127.0.0.1:2525"`, `"[::1]:2525"`; `"localhost:PORT"` means both loopback addresses.
pub fn parse_listen(text: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    if let Some(port) = text.strip_prefix("localhost:")
        && let Ok(port) = port.parse::<u16>()
    {
        return Ok(vec![
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
        ]);
    }
    Err(format!(
        r#"invalid listener {text:?}: expected an IP address and port, e.g. "127.0.0.1:2525" or "[::1]:2525""#
    ))
}

/// Binding an IPv6 address failed because the host has no IPv6 there: the address is
/// missing (`EADDRNOTAVAIL`, e.g. IPv6 disabled on the interface) or the kernel has no
/// IPv6 at all (`EAFNOSUPPORT`, which std does not map to an `ErrorKind`).
pub fn host_lacks_ipv6(addr: &SocketAddr, e: &std::io::Error) -> bool {
    addr.is_ipv6()
        && (e.kind() == std::io::ErrorKind::AddrNotAvailable
            || e.raw_os_error() == Some(libc::EAFNOSUPPORT))
}

/// A network in CIDR form, or a single address.
pub(super) fn parse_network(text: &str) -> Result<ipnet::IpNet, String> {
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| {
            format!(r#"invalid network {text:?}: expected e.g. "10.0.0.0/8" or "192.168.1.7""#)
        })
}

/// A domain name, lower-cased.
pub(super) fn parse_domain(text: &str) -> Result<String, String> {
    let well_formed = !text.is_empty()
        && !text.starts_with(['.', '-'])
        && !text.ends_with('.')
        && !text.contains("..")
        && text
            .chars()
            .all(|c| c.is_alphanumeric() || c == '-' || c == '.');
    if well_formed {
        Ok(text.to_lowercase())
    } else {
        Err(format!("{text:?} is not a domain name"))
    }
}

/// A `senders` entry: `*`, `*@domain` or `local@domain` (domain lower-cased).
pub(super) fn parse_sender_pattern(text: &str) -> Result<SenderPattern, String> {
    if text == "*" {
        return Ok(SenderPattern::Any);
    }
    let Some((local, domain)) = text.rsplit_once('@') else {
        return Err(format!(
            r#"invalid sender {text:?}: expected an address ("alice@example.com"), "*@example.com" or "*"; a whole domain goes in domains = [...]"#
        ));
    };
    let domain = parse_domain(domain).map_err(|why| format!("invalid sender {text:?}: {why}"))?;
    if local == "*" {
        return Ok(SenderPattern::AnyAtDomain(domain));
    }
    let bad_char = |c: char| c.is_whitespace() || c.is_control() || matches!(c, '*' | '<' | '>');
    // An `@` in the local part is a mailbox only inside a quoted local part.
    let quoted = local.len() >= 2 && local.starts_with('"') && local.ends_with('"');
    if local.is_empty() || local.chars().any(bad_char) || (local.contains('@') && !quoted) {
        return Err(format!(
            r#"invalid sender {text:?}: the part before @ must be a mailbox name or "*" alone"#
        ));
    }
    Ok(SenderPattern::Exact(format!("{local}@{domain}")))
}

/// A `[[users]]` password hash: an argon2 PHC string. The value is never echoed.
pub(super) fn parse_password_hash(text: &str) -> Result<Secret, String> {
    match argon2::PasswordHash::new(text) {
        Ok(hash) if hash.algorithm.as_str().starts_with("argon2") && hash.hash.is_some() => {
            Ok(Secret::new(text))
        }
        _ => Err(
            "not an argon2 hash (a PHC string starting with $argon2id$); make one with `mailgate hash-password`"
                .to_owned(),
        ),
    }
}

pub(super) fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The port a channel uses when neither it nor its preset names one.
pub(super) fn default_port(tls: TlsMode) -> u16 {
    match tls {
        TlsMode::Starttls => 587,
        TlsMode::Implicit => 465,
        TlsMode::None => 25,
    }
}

/// The allowed key nearest to a misspelt one, if it is close enough to be a typo.
pub(super) fn nearest<'k>(
    key: &str,
    allowed: impl IntoIterator<Item = &'k str>,
) -> Option<&'k str> {
    allowed
        .into_iter()
        .map(|k| (strsim::levenshtein(key, k), k))
        .filter(|(d, _)| *d <= 2 && *d < key.chars().count())
        .min()
        .map(|(_, k)| k)
}

/// An `http(s)://` URL's host, when the URL is one.
fn url_host(url: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(bracketed) = host_port.strip_prefix('[') {
        bracketed.split_once(']')?.0
    } else {
        host_port.split(':').next()?
    };
    Some((scheme, host))
}

/// An endpoint URL: `https://`, or `http://` to a loopback host (local test servers).
pub(super) fn parse_endpoint(text: &str) -> Result<String, String> {
    let well_formed = !text.chars().any(|c| c.is_whitespace() || c.is_control());
    match url_host(text) {
        Some((_, "")) | None => Err(format!(
            "{text:?} is not a URL like \"https://login.example.com/token\""
        )),
        _ if !well_formed => Err(format!("{text:?} is not a URL: it holds white space")),
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => Ok(text.to_owned()),
        Some((scheme, host)) if scheme.eq_ignore_ascii_case("http") && is_loopback_host(host) => {
            Ok(text.to_owned())
        }
        Some(_) => Err(format!(
            "{text:?} must be https:// (plain http:// only to loopback hosts): tokens never travel in plaintext"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_the_spec_forms() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("5min"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("5d"), Ok(Duration::from_secs(5 * 86_400)));
        for bad in [
            "",
            "30",
            "s",
            "5x",
            "-5m",
            "1.5h",
            "0s",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sizes_are_bytes_or_binary_units() {
        assert_eq!(parse_size("35MB"), Ok(35 * 1024 * 1024));
        assert_eq!(parse_size("10KB"), Ok(10 * 1024));
        assert_eq!(parse_size("1GB"), Ok(1024 * 1024 * 1024));
        assert_eq!(parse_size("10kb"), Ok(10 * 1024));
        assert_eq!(parse_size("1000"), Ok(1000));
        for bad in ["", "MB", "35XB", "0MB", "3.5MB", "-1"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn rates_are_a_count_per_window() {
        let rate = |count, secs| {
            Ok(Rate {
                count,
                per: Duration::from_secs(secs),
            })
        };
        assert_eq!(parse_rate("30/min"), rate(30, 60));
        assert_eq!(parse_rate("5/s"), rate(5, 1));
        assert_eq!(parse_rate("100/h"), rate(100, 3600));
        assert_eq!(parse_rate("2000/day"), rate(2000, 86_400));
        assert_eq!(parse_rate("10/5m"), rate(10, 300));
        for bad in ["30", "/min", "0/min", "30/fortnight", "x/min", "30/"] {
            assert!(parse_rate(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sender_patterns_are_parsed_and_malformed_ones_refused() {
        use SenderPattern::*;
        assert_eq!(parse_sender_pattern("*"), Ok(Any));
        assert_eq!(
            parse_sender_pattern("*@Example.COM"),
            Ok(AnyAtDomain("example.com".into()))
        );
        assert_eq!(
            parse_sender_pattern("Alice@Example.COM"),
            Ok(Exact("Alice@example.com".into()))
        );
        assert_eq!(
            parse_sender_pattern("\"a@b\"@c.com"),
            Ok(Exact("\"a@b\"@c.com".into()))
        );
        for bad in [
            "",
            "alice",
            "example.com",
            "@example.com",
            "alice@",
            "a*@example.com",
            "a b@x.org",
            "a@x..org",
            "**",
            "@@bad",
            "a@b@c.com",
        ] {
            assert!(parse_sender_pattern(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_domain("Example.COM"), Ok("example.com".into()));
        assert!(parse_domain("*.example.com").is_err());
    }
}
