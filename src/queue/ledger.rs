//! Where a queued message's Microsoft Graph draft is recorded (SPEC §7 "Large messages
//! over Graph"): its spool entry's state (`graph_draft` in `queue/<id>.json`), written
//! before the first attachment goes up, so that the attempt after a crash finds the
//! draft and deletes it before making a new one.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Mutex;

use super::spool::Spool;
use crate::upstream::DraftLedger;

/// The draft record of one queued message during one attempt.
pub struct SpoolLedger {
    spool: Spool,
    id: String,
    /// What the state file says now (the attempt's in-memory state is stale after it).
    current: Mutex<Option<String>>,
}

impl SpoolLedger {
    /// The record of message `id`, whose state says `left` (a draft an earlier attempt left).
    pub fn new(spool: &Spool, id: &str, left: Option<String>) -> Self {
        SpoolLedger {
            spool: spool.clone(),
            id: id.to_string(),
            current: Mutex::new(left),
        }
    }

    /// What the state file holds now, for the attempt's own copy of the state.
    pub fn current(&self) -> Option<String> {
        self.current.lock().map(|c| c.clone()).unwrap_or(None)
    }
}

impl DraftLedger for SpoolLedger {
    fn left(&self) -> Option<String> {
        self.current()
    }

    fn record<'a>(
        &'a self,
        draft: Option<&'a str>,
    ) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'a>> {
        let draft = draft.map(str::to_string);
        Box::pin(async move {
            let (spool, id, value) = (self.spool.clone(), self.id.clone(), draft.clone());
            tokio::task::spawn_blocking(move || {
                let Some(mut state) = spool.read_state(&id)? else {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("message {id} is no longer queued"),
                    ));
                };
                state.graph_draft = value;
                spool.write_state(&state)
            })
            .await
            .map_err(io::Error::other)??;
            if let Ok(mut current) = self.current.lock() {
                *current = draft;
            }
            Ok(())
        })
    }
}
