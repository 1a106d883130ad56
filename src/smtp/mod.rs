//! The SMTP server side: what clients talk to.

pub mod auth;
pub mod data;
pub mod reply;
pub mod session;
