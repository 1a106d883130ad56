//! Hands an accepted message to its channel and turns the outcome into the client's reply.
//!
//! The session streams a message into a [`Draft`] as it arrives, then calls
//! [`Delivery::finish`] with the routed channel and envelope.
//! Relay mode: the message goes upstream during the client's session and the client
//! gets the upstream's answer (SPEC §5, §6).

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::config::{ChannelId, Config};
use crate::message::Envelope;
use crate::ratelimit::ChannelLimiter;
use crate::smtp::reply::Reply;
use crate::upstream::{Body, Upstreams};

/// The delivery side of a running proxy.
pub struct Delivery {
    config: Arc<Config>,
    upstreams: Upstreams,
    /// One per channel, indexed by [`ChannelId`].
    limiters: Vec<Mutex<ChannelLimiter>>,
}

/// A message being received: written to as the data streams in.
/// Dropping a draft without [`Delivery::finish`] discards it.
///
/// Held in memory (relay mode: the session is bounded by `max_message_size`); queue mode
/// can turn this into a spool file behind the same methods.
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
        let upstreams = Upstreams::new(&config)?;
        let limiters = config
            .channels
            .iter()
            .map(|c| Mutex::new(ChannelLimiter::new(&c.limits)))
            .collect();
        Ok(Delivery {
            config,
            upstreams,
            limiters,
        })
    }

    /// Builds on transports made elsewhere (tests: shorter timeouts).
    pub fn with_upstreams(config: Arc<Config>, upstreams: Upstreams) -> Self {
        let limiters = config
            .channels
            .iter()
            .map(|c| Mutex::new(ChannelLimiter::new(&c.limits)))
            .collect();
        Delivery {
            config,
            upstreams,
            limiters,
        }
    }

    /// The channels' transports (`test-channel`).
    pub fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    /// Starts a new message (assigns its id).
    pub async fn begin(&self) -> Result<Draft, Reply> {
        Ok(Draft {
            id: crate::message::new_id(),
            bytes: Vec::new(),
        })
    }

    /// Delivers (relay) or stores (queue) a complete message; returns what the client should hear.
    pub async fn finish(&self, draft: Draft, channel: ChannelId, envelope: &Envelope) -> Reply {
        let started = Instant::now();
        let reply = self.relay(&draft, channel, envelope).await;
        let name = self
            .config
            .channels
            .get(channel)
            .map_or("?", |c| c.name.as_str());
        let duration_ms = started.elapsed().as_millis() as u64;
        let (id, sender, rcpts, size) = (
            draft.id(),
            &envelope.sender,
            envelope.recipients.len(),
            draft.len(),
        );
        if reply.is_positive() {
            tracing::info!(id, %sender, rcpts, size, channel = name, %reply, duration_ms, "message accepted");
        } else {
            tracing::info!(id, %sender, rcpts, size, channel = name, %reply, duration_ms, "message refused");
        }
        reply
    }

    /// Relay mode: limits, then the upstream's answer.
    async fn relay(&self, draft: &Draft, channel: ChannelId, envelope: &Envelope) -> Reply {
        let (Some(ch), Some(limiter)) = (
            self.config.channels.get(channel),
            self.limiters.get(channel),
        ) else {
            tracing::error!(id = draft.id(), channel, "no such channel");
            return Reply::local_error();
        };
        if let Some(max) = ch.limits.max_message_size
            && draft.len() > max
        {
            return Reply::too_big(max);
        }
        if let Some(max) = ch.limits.max_recipients
            && envelope.recipients.len() > max
        {
            return Reply::too_many_recipients(max);
        }
        let rcpts = envelope.recipients.len() as u64;
        // Checked before and recorded after the send: concurrent messages on one channel
        // can overshoot a limit by at most the channel's connection count.
        if let Err(until) = lock(limiter).check(now_ms(), rcpts) {
            tracing::info!(id = draft.id(), channel = %ch.name, until_ms = until, "channel limit reached");
            return Reply::channel_limited(&ch.name);
        }
        let outcome = self
            .upstreams
            .send_with_id(
                channel,
                Some(draft.id()),
                envelope,
                Body::Bytes(&draft.bytes),
                true,
            )
            .await;
        match outcome.result {
            Ok(reply) => {
                lock(limiter).record(now_ms(), rcpts);
                reply
            }
            Err(error) => error.client_reply(&ch.name),
        }
    }
}

fn lock(limiter: &Mutex<ChannelLimiter>) -> std::sync::MutexGuard<'_, ChannelLimiter> {
    limiter.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}
