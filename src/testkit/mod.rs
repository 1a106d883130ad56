//! Test helpers shared by this crate's tests and the integration tests (feature `testkit`).

pub mod token_endpoint;
