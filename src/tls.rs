//! Server-side TLS (rustls) and `mailgate cert generate`.
