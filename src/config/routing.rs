//! `[routing]`: where bulk mail goes.

use serde_spanned::Spanned;

use super::reader::{Expect, Keys, Reader, Section};
use super::{Channel, Routing};

/// `[routing]` as written.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    bulk_channel: Option<Spanned<String>>,
    bulk_recipients: Option<Spanned<i64>>,
}

pub(super) const ROUTING_KEYS: Keys = &[
    ("bulk_channel", Expect::Str),
    ("bulk_recipients", Expect::Count),
];

/// Reads and validates `[routing]` against the channels already read.
pub(super) fn read(r: &mut Reader, s: &Section, channels: &[Channel]) -> Routing {
    let raw: RawRouting = r.read(s, ROUTING_KEYS);
    let bulk_channel = raw.bulk_channel.as_ref().and_then(|at| {
        let name = at.get_ref();
        let line = r.at(at);
        let id = channels.iter().position(|c| &c.name == name);
        match id {
            None => r.bad(
                s,
                "bulk_channel",
                line,
                format!("there is no channel {name:?}"),
            ),
            Some(i) if channels[i].address_scoped => {
                let why =
                    format!("channel {name:?} is address-scoped; bulk mail needs a shared channel");
                r.bad(s, "bulk_channel", line, why);
            }
            Some(_) => {}
        }
        id
    });
    let bulk_recipients = r.count_usize(s, "bulk_recipients", &raw.bulk_recipients, u64::MAX);
    if bulk_recipients.is_some() && !s.has("bulk_channel") {
        let line = r.key_line(s, "bulk_recipients");
        r.problem(line, "\"bulk_recipients\" in [routing] needs bulk_channel");
    }
    Routing {
        bulk_channel,
        bulk_recipients,
    }
}
