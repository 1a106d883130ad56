//! Test fixtures shared by unit tests and `tests/*.rs` (feature `testkit`): a fake SMTP
//! upstream, a local OAuth token endpoint, a Microsoft Graph stand-in, a test PKI, configuration builders.

pub mod config;
pub mod fake_smtp;
pub mod graph_api;
pub mod pki;
pub mod redis_server;
pub mod token_endpoint;
