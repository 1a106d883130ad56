//! The metrics listener's HTTP side (SPEC §8 status page, §9 who is answered): the
//! server on port 0 and a raw HTTP/1.1 client, so every header is seen as sent.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mailgate::config::Metrics;
use mailgate::metrics::server::{Health, MetricsServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

const CONFIG: &str = r#"
[server]
spool_dir = "spool"
[channels.outbox]
kind = "file"
dir = "out"
senders = ["*"]
rate = "30/min"
"#;

/// One answer: status code, header lines (lower-cased names), body.
struct Answer {
    code: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One request from `from` (a local address to bind, or any) to `to`.
async fn request(from: Option<IpAddr>, to: SocketAddr, method: &str, path: &str) -> Answer {
    let socket = if to.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .unwrap();
    if let Some(ip) = from {
        socket.bind(SocketAddr::new(ip, 0)).unwrap();
    }
    let mut stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(to))
        .await
        .unwrap()
        .unwrap();
    let head =
        format!("{method} {path} HTTP/1.1\r\nHost: status.test\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.split("\r\n");
    let code = lines.next().unwrap()[9..12].parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(n, v)| (n.to_ascii_lowercase(), v.to_string()))
        .collect();
    Answer {
        code,
        headers,
        body: body.to_string(),
    }
}

async fn serve(
    listen: &str,
    allow: &[&str],
    status_page: bool,
) -> (MetricsServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = mailgate::config::parse(CONFIG, &dir.path().join("proxy.toml")).unwrap();
    mailgate::metrics::status::configure(&Arc::new(config));
    let settings = Metrics {
        listen: vec![listen.parse().unwrap()],
        allow_networks: allow.iter().map(|n| n.parse().unwrap()).collect(),
        status_page,
    };
    let health = Arc::new(Health::new(&dir.path().join("spool")));
    (MetricsServer::start(&settings, health).await.unwrap(), dir)
}

#[tokio::test]
async fn the_page_and_its_json_are_served_read_only_with_a_strict_policy() {
    let (server, _dir) = serve("127.0.0.1:0", &[], true).await;
    let at = server.local_addrs()[0];
    let page = request(None, at, "GET", "/").await;
    assert_eq!(page.code, 200, "{}", page.body);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(
        page.header("content-security-policy"),
        Some("default-src 'none'; style-src 'unsafe-inline'")
    );
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    assert!(
        page.body.contains("data-channel=\"outbox\""),
        "{}",
        page.body
    );
    assert!(
        page.body
            .contains(r#"<meta http-equiv="refresh" content="10">"#)
    );

    let json = request(None, at, "GET", "/status.json").await;
    assert_eq!(json.code, 200);
    assert_eq!(json.header("content-type"), Some("application/json"));
    assert_eq!(
        json.header("content-security-policy"),
        Some("default-src 'none'; style-src 'unsafe-inline'")
    );
    assert_eq!(json.header("x-content-type-options"), Some("nosniff"));
    let facts: serde_json::Value = serde_json::from_str(&json.body).unwrap();
    assert_eq!(facts["channels"][0]["name"], "outbox");
    assert_eq!(facts["channels"][0]["state"], "ok");
    assert_eq!(facts["channels"][0]["rate"]["limit"], 30);
    assert_eq!(facts["delivery"], "queue");
    assert_eq!(facts["state_backend"]["kind"], "local");

    let head = request(None, at, "HEAD", "/").await;
    assert_eq!(head.code, 200);
    assert!(head.body.is_empty());
    // No action over HTTP.
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        for path in ["/", "/status.json"] {
            let refused = request(None, at, method, path).await;
            assert_eq!(refused.code, 405, "{method} {path}");
            assert_eq!(refused.header("allow"), Some("GET, HEAD"));
        }
    }
    assert_eq!(request(None, at, "GET", "/index.html").await.code, 404);
    server.stop().await;
}

#[tokio::test]
async fn status_page_false_serves_metrics_and_health_only() {
    let (server, _dir) = serve("127.0.0.1:0", &[], false).await;
    let at = server.local_addrs()[0];
    assert_eq!(request(None, at, "GET", "/").await.code, 404);
    assert_eq!(request(None, at, "GET", "/status.json").await.code, 404);
    assert_eq!(request(None, at, "GET", "/metrics").await.code, 200);
    // Not listening yet: unhealthy, but answered.
    assert_eq!(request(None, at, "GET", "/healthz").await.code, 503);
    server.stop().await;
}

/// A non-loopback address of this host: where a connection to a documentation-range
/// address would leave from (a UDP "connect" sends nothing). `None`: no such route.
fn outside_address() -> Option<IpAddr> {
    for (bind, target) in [("0.0.0.0:0", "192.0.2.1:9"), ("[::]:0", "[2001:db8::1]:9")] {
        let Ok(socket) = std::net::UdpSocket::bind(bind) else {
            continue;
        };
        if socket.connect(target).is_ok()
            && let Ok(local) = socket.local_addr()
            && !local.ip().is_loopback()
            && !local.ip().is_unspecified()
        {
            return Some(local.ip());
        }
    }
    None
}

/// SPEC §9: loopback is always answered; a client from another address only when
/// `allow_networks` holds it, and 403 on every path otherwise (the pure decision is
/// unit-tested in `metrics::status`; this is the same decision on a real socket).
#[tokio::test]
async fn a_client_outside_allow_networks_gets_403_on_every_path() {
    let Some(outside) = outside_address() else {
        eprintln!(
            "skipped: this host has no non-loopback address to connect from (no route to a documentation-range address)"
        );
        return;
    };
    let any = if outside.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let (server, _dir) = serve(any, &["198.51.100.0/24"], true).await;
    let port = server.local_addrs()[0].port();
    let to_outside = SocketAddr::new(outside, port);
    for path in ["/", "/status.json", "/metrics", "/healthz", "/nowhere"] {
        let answer = request(Some(outside), to_outside, "GET", path).await;
        assert_eq!(answer.code, 403, "{path} from {outside}: {}", answer.body);
        assert!(!answer.body.contains("outbox"), "{}", answer.body);
    }
    assert_eq!(
        request(Some(outside), to_outside, "POST", "/").await.code,
        403
    );
    let loopback: IpAddr = if outside.is_ipv4() {
        "127.0.0.1".parse().unwrap()
    } else {
        "::1".parse().unwrap()
    };
    let to_loopback = SocketAddr::new(loopback, port);
    assert_eq!(
        request(None, to_loopback, "GET", "/metrics").await.code,
        200
    );
    assert_eq!(request(None, to_loopback, "GET", "/").await.code, 200);
    server.stop().await;

    // The same client, now in allow_networks.
    let net = format!("{outside}/{}", if outside.is_ipv4() { 32 } else { 128 });
    let (server, _dir) = serve(any, &[&net], true).await;
    let to_outside = SocketAddr::new(outside, server.local_addrs()[0].port());
    assert_eq!(
        request(Some(outside), to_outside, "GET", "/").await.code,
        200
    );
    assert_eq!(
        request(Some(outside), to_outside, "GET", "/metrics")
            .await
            .code,
        200
    );
    server.stop().await;
}
