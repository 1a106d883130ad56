//! STARTTLS.

use super::*;

fn tls_pair() -> (tokio_rustls::TlsAcceptor, tokio_rustls::TlsConnector) {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certified = rcgen::generate_simple_self_signed(vec!["mx.test".to_string()]).unwrap();
    let cert = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        tokio_rustls::TlsConnector::from(Arc::new(client)),
    )
}

#[tokio::test]
async fn starttls_discards_pipelined_commands_and_resets_state() {
    let (acceptor, connector) = tls_pair();
    let dir = tempfile::tempdir().unwrap();
    let config = with_user(test_config(dir.path(), ""));
    let h = Harness::from_config(dir, config, Some(acceptor));
    let mut c = h.connect_from(REMOTE, false).await;
    let ehlo = c.cmd("EHLO a").await;
    assert!(
        ehlo.contains("250-STARTTLS") || ehlo.ends_with("250 STARTTLS"),
        "{ehlo}"
    );
    assert!(
        !ehlo.contains("AUTH"),
        "no AUTH in plaintext off loopback: {ehlo}"
    );
    // An injected command rides behind STARTTLS: it must never run.
    c.send("STARTTLS\r\nMAIL FROM:<alice@example.com>\r\n")
        .await;
    assert_code(&c.reply().await, "220 2.0.0");
    let Client { read, write, task } = c;
    let plain = read.into_inner().unsplit(write);
    let name = rustls::pki_types::ServerName::try_from("mx.test").unwrap();
    let tls = connector.connect(name, plain).await.expect("TLS handshake");
    let (read, write) = tokio::io::split(Box::new(tls) as BoxStream);
    let mut c = Client {
        read: BufReader::new(read),
        write,
        task,
    };
    // State was reset: no transaction, no EHLO.
    assert_code(&c.cmd("RCPT TO:<bob@example.org>").await, "503 5.5.1");
    assert_code(&c.cmd("MAIL FROM:<alice@example.com>").await, "503 5.5.1");
    let ehlo = c.cmd("EHLO a").await;
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert!(ehlo.ends_with("250 AUTH PLAIN LOGIN"), "{ehlo}");
    assert_code(&c.cmd("STARTTLS").await, "454 4.7.0");
    assert_code(&c.cmd("MAIL FROM:<alice@example.com>").await, "250 2.1.0");
    assert_code(&c.cmd("RCPT TO:<bob@example.org>").await, "250 2.1.5");
    assert_code(&c.cmd("DATA").await, "354");
    c.send(&format!("{MESSAGE}.\r\n")).await;
    assert_code(&c.reply().await, "250");
    assert_code(&c.cmd("QUIT").await, "221");
    assert_eq!(h.delivered().len(), 1);
}

#[tokio::test]
async fn starttls_without_certificate_is_unavailable() {
    let h = Harness::new("");
    let mut c = h.connect().await;
    c.cmd("EHLO a").await;
    assert_code(&c.cmd("STARTTLS").await, "454 4.7.0");
}
