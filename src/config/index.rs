//! Lookup tables over the channels, built once per configuration, so that routing a
//! sender and finding a channel by name cost the same for 10 channels and 10,000
//! (an organisation with a mailbox login per user has one channel per mailbox).
//!
//! Keys are lower-cased with Unicode rules: the scope matching of `crate::scope` compares
//! case-insensitively in both parts (`a.to_lowercase() == b.to_lowercase()`), so equal
//! keys here are exactly the pairs it calls equal.

use std::collections::HashMap;

use super::model::{Channel, ChannelId, SenderPattern};

/// Where a sender-scope pattern sits: the channel and the pattern's place in its scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScopeEntry {
    /// The channel whose scope holds the pattern.
    pub channel: ChannelId,
    /// Index of the pattern in that channel's `scope`.
    pub pattern: usize,
}

/// The channels by name, by scope pattern and by fallback role.
#[derive(Debug, Clone, Default)]
pub struct ChannelIndex {
    by_name: HashMap<String, ChannelId>,
    exact: HashMap<String, ScopeEntry>,
    domain: HashMap<String, ScopeEntry>,
    any_at_domain: HashMap<String, ScopeEntry>,
    catch_all: Option<ScopeEntry>,
    is_fallback: Vec<bool>,
}

/// The key of an address or domain: lower case, Unicode rules.
pub fn key(text: &str) -> String {
    text.to_lowercase()
}

impl ChannelIndex {
    /// Indexes `channels`. Channels named as some channel's `fallback` are no routing
    /// candidates (SPEC §7) and are left out of the scope tables. Validation forbids two
    /// channels at the same specificity for one sender; should it happen anyway, the
    /// channel whose name sorts first wins, as it always has.
    pub fn build(channels: &[Channel]) -> Self {
        let mut index = ChannelIndex {
            by_name: HashMap::with_capacity(channels.len()),
            is_fallback: vec![false; channels.len()],
            ..ChannelIndex::default()
        };
        for (id, channel) in channels.iter().enumerate() {
            index.by_name.entry(channel.name.clone()).or_insert(id);
            if let Some(fallback) = channel.fallback
                && let Some(flag) = index.is_fallback.get_mut(fallback)
            {
                *flag = true;
            }
        }
        for (id, channel) in channels.iter().enumerate() {
            if index.is_fallback[id] {
                continue;
            }
            for (at, pattern) in channel.scope.iter().enumerate() {
                let entry = ScopeEntry {
                    channel: id,
                    pattern: at,
                };
                let table = match pattern {
                    SenderPattern::Exact(address) => Some((&mut index.exact, key(address))),
                    SenderPattern::Domain(domain) => Some((&mut index.domain, key(domain))),
                    SenderPattern::AnyAtDomain(pattern) => {
                        let domain = pattern.strip_prefix("*@").unwrap_or(pattern);
                        Some((&mut index.any_at_domain, key(domain)))
                    }
                    SenderPattern::Any => None,
                };
                match table {
                    Some((table, k)) => {
                        let slot = table.entry(k).or_insert(entry);
                        if first_by_name(channels, entry, *slot) {
                            *slot = entry;
                        }
                    }
                    None => {
                        if index
                            .catch_all
                            .is_none_or(|best| first_by_name(channels, entry, best))
                        {
                            index.catch_all = Some(entry);
                        }
                    }
                }
            }
        }
        index
    }

    /// The channel with this name.
    pub fn channel_id(&self, name: &str) -> Option<ChannelId> {
        self.by_name.get(name).copied()
    }

    /// Whether some channel names `id` as its `fallback`.
    pub fn is_fallback(&self, id: ChannelId) -> bool {
        self.is_fallback.get(id).copied().unwrap_or(false)
    }

    /// The most specific scope pattern of a routing candidate that takes `sender`
    /// (exact address > domain > `*@domain` > `*`); the null sender `""` only `*`.
    pub fn route(&self, sender: &str) -> Option<ScopeEntry> {
        if sender.is_empty() {
            return self.catch_all;
        }
        let domain = sender
            .rsplit_once('@')
            .filter(|(local, domain)| !local.is_empty() && !domain.is_empty())
            .map(|(_, domain)| key(domain));
        self.exact
            .get(&key(sender))
            .or_else(|| self.domain.get(domain.as_deref()?))
            .or_else(|| self.any_at_domain.get(domain.as_deref()?))
            .copied()
            .or(self.catch_all)
    }
}

/// Whether `candidate`'s channel name sorts before `current`'s (ties: the first wins).
fn first_by_name(channels: &[Channel], candidate: ScopeEntry, current: ScopeEntry) -> bool {
    channels[candidate.channel].name < channels[current.channel].name
}
