//! AUTH: the session's side of a client login (the SASL exchange is [`crate::smtp::auth`]).

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
            Err(refusal) => self.reply(&refusal),
            Ok(Progress::Challenge(exchange, challenge)) => {
                self.auth = Some(exchange);
                self.reply(&challenge)
            }
            Ok(Progress::Done(credentials)) => {
                let username = credentials.username.clone();
                match auth::verify(&self.config.users, credentials).await {
                    Some(user) => {
                        info!(peer = %self.peer, user, "client authenticated");
                        self.user = Some(user);
                        self.reply(&Reply::auth_ok())
                    }
                    None => {
                        warn!(peer = %self.peer, user = username, "client authentication failed");
                        self.reply(&Reply::auth_failed())
                    }
                }
            }
        }
    }
}
