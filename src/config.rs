//! `proxy.toml` → one validated, compiled [`Config`].
//!
//! Nothing downstream re-validates or re-parses configuration: every other module
//! takes the types defined here as given.
//!
//! [`parse`] reads each section with serde into raw structs that keep the spans of their
//! values ([`reader`]), then validates each section ([`server`], [`users`], [`channels`],
//! [`oauth`], [`routing`], [`rewrite`]): every problem is reported at once, each with its line.
//!
//! Value forms ([`values`]): durations `"500ms"`, `"30s"`, `"5m"`, `"1h"`, `"5d"`; sizes in
//! bytes (integer) or `"10KB"`, `"35MB"`, `"1GB"` with **binary** units (1MB = 1024 × 1024
//! bytes); rates `"5/s"`, `"30/min"`, `"100/h"`, `"2000/day"`. Relative paths resolve
//! against the configuration file's folder.

mod channels;
pub mod index;
mod metrics;
mod model;
pub mod oauth;
pub mod presets;
mod reader;
mod rewrite;
mod routing;
mod secrets;
mod server;
pub mod state;
mod users;
mod values;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};

use toml_edit::ImDocument;

pub use model::*;
pub use secrets::Secret;
pub use values::{host_lacks_ipv6, parse_listen};

use reader::{Expect, Keys, Reader, Section};

/// One problem found in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line in the file, when the problem has a place.
    pub line: Option<usize>,
    /// What is wrong, naming the key or channel.
    pub message: String,
}

/// Every problem found in a configuration (never empty).
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    /// The file.
    pub path: PathBuf,
    /// The problems, in file order.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match p.line {
                Some(line) => write!(f, "{}:{}: {}", self.path.display(), line, p.message)?,
                None => write!(f, "{}: {}", self.path.display(), p.message)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, path),
        Err(e) => Err(ConfigErrors {
            path: path.to_path_buf(),
            problems: vec![Problem {
                line: None,
                message: format!("cannot read the configuration file: {e}"),
            }],
        }),
    }
}

/// Validates configuration text; `path` names the file in problems and anchors relative paths.
///
/// Every problem is collected (not only the first) and returned in file order.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    let mut reader = Reader::new(text, path);
    let config = match ImDocument::parse(text) {
        Ok(doc) => Some(read_config(&mut reader, doc.as_table(), path)),
        Err(e) => {
            let line = reader.line(e.span());
            // toml_edit puts "expected ..." on a second line; a problem is one line.
            let message: Vec<&str> = e.message().lines().map(str::trim).collect();
            reader.problem(line, format!("TOML syntax error: {}", message.join("; ")));
            None
        }
    };
    match config {
        Some(config) if reader.problems.is_empty() => Ok(config),
        _ => {
            let mut problems = reader.problems;
            // Stable: problems on one line keep the order they were found in.
            problems.sort_by_key(|p| (p.line.is_none(), p.line));
            Err(ConfigErrors {
                path: path.to_path_buf(),
                problems,
            })
        }
    }
}

/// The top level holds sections only; each is read on its own.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTop {}

const TOP_KEYS: Keys = &[
    ("server", Expect::Table),
    ("users", Expect::Table),
    ("channels", Expect::Table),
    ("routing", Expect::Table),
    ("state", Expect::Table),
    ("metrics", Expect::Table),
    ("rewrite", Expect::Table),
];

fn read_config(r: &mut Reader, root: &toml_edit::Table, path: &Path) -> Config {
    let root = Section {
        table: root,
        place: "at the top level".to_owned(),
        line: None,
    };
    let RawTop {} = r.read(&root, TOP_KEYS);

    let empty = toml_edit::Table::new();
    let blank = |label: &str| Section {
        table: &empty,
        place: format!("in {label}"),
        line: None,
    };
    let server_section = r
        .section(&root, "server", "[server]")
        .unwrap_or_else(|| blank("[server]"));
    let server = server::read(r, &server_section);
    let users = users::read(r, &root);
    if server.require_auth && users.is_empty() {
        let line = r.key_line(&server_section, "require_auth");
        r.problem(
            line,
            "require_auth = true in [server] but there is no [[users]] entry: no client could send",
        );
    }

    let channels = channels::read(r, &root);

    let routing_section = r
        .section(&root, "routing", "[routing]")
        .unwrap_or_else(|| blank("[routing]"));
    let routing = routing::read(r, &routing_section, &channels);
    let (rewrites, warnings) = rewrite::read(r, &root, &channels, &users);

    let smtp_listeners: Vec<_> = server
        .listen
        .iter()
        .chain(&server.tls_listen)
        .copied()
        .collect();
    let metrics = r
        .section(&root, "metrics", "[metrics]")
        .and_then(|section| metrics::read(r, &section, &smtp_listeners));

    let state = match r.section(&root, "state", "[state]") {
        Some(section) => state::read(r, &section),
        None => StateBackend::Local,
    };

    Config {
        path: path.to_path_buf(),
        server,
        users,
        channels,
        routing,
        metrics,
        has_literal_secrets: r.literal_secrets,
        state,
        index: Default::default(),
        rewrites,
        warnings,
    }
}
