//! Hands an accepted message to its channel and turns the outcome into the client's reply.
//!
//! The session streams a message into a [`Draft`] as it arrives, then calls
//! [`Delivery::finish`] with the routed channel and envelope.
//! Relay mode: the message goes upstream during the client's session and the client
//! gets the upstream's answer (SPEC §5, §6).

use std::io;
use std::sync::Arc;

use crate::config::{ChannelId, Config};
use crate::message::Envelope;
use crate::smtp::reply::Reply;

/// The delivery side of a running proxy.
pub struct Delivery {}

/// A message being received: written to as the data streams in.
/// Dropping a draft without [`Delivery::finish`] discards it.
pub struct Draft {
    id: String,
    bytes: Vec<u8>,
}

impl Draft {
    /// The message id, for every log line about this message.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Appends decoded message bytes.
    pub async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.bytes.extend_from_slice(data);
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Nothing written yet.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

impl Delivery {
    /// Sets up the channels' transports and limiters.
    pub fn new(config: Arc<Config>) -> Result<Self, String> {
        todo!()
    }

    /// Starts a new message (assigns its id).
    pub async fn begin(&self) -> Result<Draft, Reply> {
        Ok(Draft { id: crate::message::new_id(), bytes: Vec::new() })
    }

    /// Delivers (relay) or stores (queue) a complete message; returns what the client should hear.
    pub async fn finish(&self, draft: Draft, channel: ChannelId, envelope: &Envelope) -> Reply {
        todo!()
    }
}
