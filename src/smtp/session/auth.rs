//! AUTH: the session's side of a client login (the SASL exchange is [`crate::smtp::auth`]).

use std::time::Instant;

use tracing::{info, warn};

use super::{Session, Stop};
use crate::smtp::auth::{self, Mechanism, Progress};
use crate::smtp::reply::{Reply, Sequence};

impl Session {
    /// AUTH: starts an exchange if this session may authenticate now.
    pub(super) async fn auth(
        &mut self,
        mechanism: u64,
        initial_response: &str,
    ) -> Result<(), Stop> {
        let refusal = if self.config.users.is_empty() {
            Some(Reply::bad_sequence(Sequence::AuthNotEnabled))
        } else if !self.auth_offered() {
            Some(Reply::encryption_required())
        } else if self.helo.is_none() {
            Some(Reply::bad_sequence(Sequence::NeedEhlo))
        } else if self.user.is_some() {
            Some(Reply::bad_sequence(Sequence::AlreadyAuthenticated))
        } else if self.tx.is_some() {
            Some(Reply::bad_sequence(Sequence::AuthInTransaction))
        } else if self.locked_out() {
            Some(Reply::auth_locked_out())
        } else {
            None
        };
        if let Some(refusal) = refusal {
            return self.reply(&refusal);
        }
        match Mechanism::from_flag(mechanism) {
            Some(mechanism) => {
                self.auth_progress(auth::start(mechanism, initial_response))
                    .await
            }
            None => self.reply(&Reply::auth_mechanism_unsupported()),
        }
    }

    /// Answers one step of an exchange; the last one checks the credentials.
    pub(super) async fn auth_progress(
        &mut self,
        progress: Result<Progress, Reply>,
    ) -> Result<(), Stop> {
        match progress {
            Err(refusal) if refusal == Reply::auth_failed() => self.auth_failed(None).await,
            Err(refusal) => self.reply(&refusal),
            Ok(Progress::Challenge(exchange, challenge)) => {
                self.auth = Some(exchange);
                self.reply(&challenge)
            }
            Ok(Progress::Done(_)) if self.locked_out() => self.reply(&Reply::auth_locked_out()),
            Ok(Progress::Done(credentials)) => {
                let username = credentials.username.clone();
                match auth::verify(&self.config.users, credentials).await {
                    Some(user) => {
                        info!(peer = %self.peer, user, "client authenticated");
                        self.user = Some(user);
                        self.reply(&Reply::auth_ok())
                    }
                    None => self.auth_failed(Some(&username)).await,
                }
            }
        }
    }

    /// Whether this client's address may not AUTH now (too many recent failures).
    fn locked_out(&self) -> bool {
        self.ctx
            .failed_logins
            .locked(self.peer.ip(), Instant::now())
    }

    /// A failed login: counted for the address, and answered late (SPEC §5), so that
    /// guessing over one session is slow.
    async fn auth_failed(&mut self, username: Option<&str>) -> Result<(), Stop> {
        self.auth_failures = self.auth_failures.saturating_add(1);
        self.ctx
            .failed_logins
            .failed(self.peer.ip(), Instant::now());
        warn!(
            peer = %self.peer,
            user = username.unwrap_or("(foreign authzid)"),
            failures = self.auth_failures,
            "client authentication failed"
        );
        self.flush().await?;
        tokio::time::sleep(auth::failure_delay(self.auth_failures)).await;
        self.reply(&Reply::auth_failed())
    }
}
