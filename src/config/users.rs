//! `[[users]]`: accounts for clients that AUTH to mailgate.

use serde_spanned::Spanned;
use toml_edit::Item;

use super::reader::{Expect, Keys, Reader, Section, Strings};
use super::values::{parse_password_hash, parse_sender_pattern};
use super::{Secret, User};

/// One `[[users]]` entry as written.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: Option<Spanned<String>>,
    password_hash: Option<Spanned<String>>,
    senders: Option<Strings>,
}

pub(super) const USER_KEYS: Keys = &[
    ("name", Expect::Str),
    ("password_hash", Expect::Str),
    ("senders", Expect::Strings),
];

/// Reads and validates every `[[users]]` entry of the document.
pub(super) fn read(r: &mut Reader, root: &Section) -> Vec<User> {
    let Some(item) = root.table.get("users") else {
        return Vec::new();
    };
    let Some(entries) = item.as_array_of_tables() else {
        let line = r.key_line(root, "users");
        r.problem(line, "users must be written as [[users]] tables");
        return Vec::new();
    };
    let mut users: Vec<User> = Vec::new();
    for table in entries.iter() {
        let label = match table.get("name").and_then(Item::as_str) {
            Some(name) => format!("[[users]] {name:?}"),
            None => "[[users]]".to_owned(),
        };
        let s = Section {
            table,
            place: format!("in {label}"),
            line: r.line(table.span()),
        };
        let raw: RawUser = r.read(&s, USER_KEYS);
        let name = r.word(&s, "name", &raw.name);
        if !s.has("name") {
            r.problem(s.line, "[[users]] entry needs a name");
        }
        if let Some(name) = &name
            && users.iter().any(|u| &u.name == name)
        {
            let line = raw.name.as_ref().and_then(|at| r.at(at));
            r.problem(line, format!("user {name:?} is defined twice"));
        }
        let password_hash = r.parsed(&s, "password_hash", &raw.password_hash, parse_password_hash);
        if !s.has("password_hash") {
            r.problem(
                s.line,
                format!("{label} needs password_hash (from `mailgate hash-password`)"),
            );
        }
        let senders = r.list_of(&s, "senders", &raw.senders, parse_sender_pattern);
        if senders.is_empty() && !s.has_nonempty_list("senders") {
            r.problem(
                s.line,
                format!("{label} needs senders = [...], the envelope senders it may use"),
            );
        }
        users.push(User {
            name: name.unwrap_or_default(),
            password_hash: password_hash.unwrap_or_else(|| Secret::new("")),
            senders: senders.into_iter().map(|(p, _)| p).collect(),
        });
    }
    users
}
