//! The reader: TOML text → raw section structs (serde, `deny_unknown_fields`), with every
//! problem kept and placed on its line.
//!
//! serde stops at the first error of a struct, and `check` must list them all. So each
//! section (each channel, each `[[users]]` entry, each `oauth` table) is deserialized on
//! its own, and when serde refuses a key, that key becomes a problem and is dropped, and
//! the section is read again without it. The validation passes then work on the spanned
//! raw structs.

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::de::IntoDeserializer;
use serde_spanned::Spanned;
use toml_edit::{InlineTable, Item, TableLike, Value};

use super::Problem;
use super::values::{DURATION_FORMS, nearest, parse_size, size_in_range};

/// What a key's value should be: the problem's wording when serde refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expect {
    /// A string.
    Str,
    /// `true` or `false`.
    Bool,
    /// A whole number.
    Count,
    /// Bytes (integer) or a size string.
    Size,
    /// A duration string.
    Duration,
    /// An array of strings.
    Strings,
    /// A table (read as a section of its own).
    Table,
}

/// The keys a section allows, each with what its value should be.
pub(super) type Keys = &'static [(&'static str, Expect)];

/// `max_message_size`: bytes as an integer, or a string like `"35MB"`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub(super) enum RawSize {
    /// `1000`.
    Bytes(i64),
    /// `"35MB"`.
    Text(String),
}

/// A string array whose entries keep their lines.
pub(super) type Strings = Spanned<Vec<Spanned<String>>>;

/// One table of the document, with the phrase problems use to place it.
pub(super) struct Section<'t> {
    /// The table.
    pub(super) table: &'t dyn TableLike,
    /// "in [server]", "in [channels.alice]", "at the top level".
    pub(super) place: String,
    /// Line of the table's header (or of its key, for an inline table), if it has one.
    pub(super) line: Option<usize>,
}

impl Section<'_> {
    /// The key is present.
    pub(super) fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    /// The key holds an array with at least one entry (valid or not).
    pub(super) fn has_nonempty_list(&self, key: &str) -> bool {
        self.table
            .get(key)
            .and_then(Item::as_array)
            .is_some_and(|a| !a.is_empty())
    }
}

/// One validation: where lines start, where relative paths point, what is wrong so far.
pub(super) struct Reader {
    line_starts: Vec<usize>,
    /// The configuration file's folder: relative paths start there.
    pub(super) base: PathBuf,
    /// Every problem found so far.
    pub(super) problems: Vec<Problem>,
    /// A literal secret was read.
    pub(super) literal_secrets: bool,
}

impl Reader {
    /// A reader for `text`, the file at `path`.
    pub(super) fn new(text: &str, path: &Path) -> Reader {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Reader {
            line_starts,
            base: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            problems: Vec::new(),
            literal_secrets: false,
        }
    }

    /// 1-based line of a byte span.
    pub(super) fn line(&self, span: Option<Range<usize>>) -> Option<usize> {
        let start = span?.start;
        Some(self.line_starts.partition_point(|&s| s <= start))
    }

    /// Line of a spanned raw value.
    pub(super) fn at<T>(&self, value: &Spanned<T>) -> Option<usize> {
        self.line(Some(value.span()))
    }

    /// Records a problem.
    pub(super) fn problem(&mut self, line: Option<usize>, message: impl Into<String>) {
        self.problems.push(Problem {
            line,
            message: message.into(),
        });
    }

    /// A problem with the value of `key`.
    pub(super) fn bad(
        &mut self,
        s: &Section,
        key: &str,
        line: Option<usize>,
        why: impl std::fmt::Display,
    ) {
        self.problem(line, format!("{key:?} {}: {why}", s.place));
    }

    /// Line of `key` in the section.
    pub(super) fn key_line(&self, s: &Section, key: &str) -> Option<usize> {
        let (k, item) = s.table.get_key_value(key)?;
        self.line(k.span()).or_else(|| self.line(item.span()))
    }

    /// `path` resolved against the configuration file's folder.
    pub(super) fn resolve(&self, path: &str) -> PathBuf {
        super::secrets::resolve_path(&self.base, path)
    }

    /// The table under `key` of `parent`, called `label` in problems.
    pub(super) fn section<'t>(
        &mut self,
        parent: &Section<'t>,
        key: &str,
        label: &str,
    ) -> Option<Section<'t>> {
        let (k, item) = parent.table.get_key_value(key)?;
        let key_line = self.line(k.span()).or_else(|| self.line(item.span()));
        match item.as_table_like() {
            Some(table) => Some(Section {
                table,
                place: format!("in {label}"),
                line: self.line(item.span()).or(key_line),
            }),
            None => {
                let found = type_name(item);
                self.bad(
                    parent,
                    key,
                    key_line,
                    format!("expected a table, found {found}"),
                );
                None
            }
        }
    }

    /// Deserializes section `s` into `T`. Keys of kind [`Expect::Table`] are left out
    /// (the caller reads them as sections of their own). Every key serde refuses, unknown
    /// or of the wrong type, becomes a problem and is left out of `T`.
    pub(super) fn read<T: DeserializeOwned + Default>(&mut self, s: &Section, keys: Keys) -> T {
        let mut table = InlineTable::new();
        for (name, item) in s.table.iter() {
            if keys.contains(&(name, Expect::Table)) {
                continue;
            }
            let Some((key, _)) = s.table.get_key_value(name) else {
                continue;
            };
            if let Ok(value) = item.clone().into_value() {
                table.insert_formatted(key, value);
            }
        }
        loop {
            let value = Value::InlineTable(table.clone());
            let error = match T::deserialize(value.into_deserializer()) {
                Ok(raw) => return raw,
                Err(error) => error,
            };
            let start = error.span().map(|span| span.start);
            let culprit = start.and_then(|start| {
                table.iter().find_map(|(name, value)| {
                    let (key, _) = table.get_key_value(name)?;
                    let in_key = key.span().is_some_and(|span| span.contains(&start));
                    let in_value = value.span().is_some_and(|span| span.contains(&start));
                    (in_key || in_value).then(|| (name.to_owned(), in_key))
                })
            });
            // Without a span, serde stopped at the first key it does not know, if any.
            let culprit = culprit.or_else(|| {
                table
                    .iter()
                    .find(|(name, _)| !keys.iter().any(|(k, _)| k == name))
                    .map(|(name, _)| (name.to_owned(), true))
            });
            let Some((name, unknown)) = culprit else {
                // Not a key's fault: one problem, and none of the section's values.
                let line = self.line(error.span()).or(s.line);
                self.problem(line, format!("{} {}", error.message(), s.place));
                return T::default();
            };
            let line = self.line(error.span()).or_else(|| self.key_line(s, &name));
            if unknown || !keys.iter().any(|(k, _)| *k == name) {
                let hint = nearest(&name, keys.iter().map(|(k, _)| *k))
                    .map(|k| format!(" (did you mean {k:?}?)"))
                    .unwrap_or_default();
                self.problem(line, format!("unknown key {name:?} {}{hint}", s.place));
            } else if let Some(value) = table.get(&name) {
                let expect = keys
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map_or(Expect::Str, |(_, e)| *e);
                let why = wrong_type(expect, value, start.unwrap_or_default());
                let line = line.or_else(|| self.line(value.span()));
                self.bad(s, &name, line, why);
            }
            table.remove(&name);
        }
    }

    /// A whole number above zero and at most `max`.
    pub(super) fn count(
        &mut self,
        s: &Section,
        key: &str,
        raw: &Option<Spanned<i64>>,
        max: u64,
    ) -> Option<u64> {
        let raw = raw.as_ref()?;
        let n = *raw.get_ref();
        let line = self.at(raw);
        match u64::try_from(n) {
            Ok(n) if n > 0 && n <= max => Some(n),
            Ok(n) if n > 0 => {
                self.bad(s, key, line, format!("{n} is too large (at most {max})"));
                None
            }
            _ => {
                self.bad(s, key, line, format!("must be more than zero, not {n}"));
                None
            }
        }
    }

    /// [`Self::count`] as a `usize`.
    pub(super) fn count_usize(
        &mut self,
        s: &Section,
        key: &str,
        raw: &Option<Spanned<i64>>,
        max: u64,
    ) -> Option<usize> {
        self.count(s, key, raw, max)
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// A size in bytes.
    pub(super) fn size(
        &mut self,
        s: &Section,
        key: &str,
        raw: &Option<Spanned<RawSize>>,
    ) -> Option<u64> {
        let raw = raw.as_ref()?;
        let line = self.at(raw);
        let result = match raw.get_ref() {
            RawSize::Bytes(n) => u64::try_from(*n)
                .map_err(|_| format!("must be more than zero, not {n}"))
                .and_then(size_in_range),
            RawSize::Text(text) => parse_size(text),
        };
        self.ok_or_bad(s, key, line, result)
    }

    /// A string turned into `T` by `convert`, whose error explains the expected form.
    pub(super) fn parsed<T>(
        &mut self,
        s: &Section,
        key: &str,
        raw: &Option<Spanned<String>>,
        convert: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let raw = raw.as_ref()?;
        let line = self.at(raw);
        let result = convert(raw.get_ref());
        self.ok_or_bad(s, key, line, result)
    }

    /// One of the named `options`.
    pub(super) fn choice<T: Copy>(
        &mut self,
        s: &Section,
        key: &str,
        raw: &Option<Spanned<String>>,
        options: &[(&str, T)],
    ) -> Option<T> {
        self.parsed(s, key, raw, |text| {
            options
                .iter()
                .find(|(name, _)| *name == text)
                .map(|(_, value)| *value)
                .ok_or_else(|| {
                    let names: Vec<String> =
                        options.iter().map(|(n, _)| format!("{n:?}")).collect();
                    format!("{text:?} is not one of {}", names.join(", "))
                })
        })
    }

    /// A string that must not be empty or hold white space (names, hosts).
    pub(super) fn word(
        &mut self,
        s: &Section,
        key: &str,
        raw: &Option<Spanned<String>>,
    ) -> Option<String> {
        self.parsed(s, key, raw, |text| {
            if text.is_empty() || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
                Err(format!("{text:?} must be one word, not empty"))
            } else {
                Ok(text.to_owned())
            }
        })
    }

    /// A file path (resolved) that must name an existing file.
    pub(super) fn existing_file(
        &mut self,
        s: &Section,
        key: &str,
        raw: &Option<Spanned<String>>,
    ) -> Option<PathBuf> {
        let base = self.base.clone();
        self.parsed(s, key, raw, |text| {
            let path = super::secrets::resolve_path(&base, text);
            if path.is_file() {
                Ok(path)
            } else {
                Err(format!(
                    "{} does not exist or is not a file",
                    path.display()
                ))
            }
        })
    }

    /// Each entry of a string array, converted, with its line; bad entries become problems.
    pub(super) fn list_of<T>(
        &mut self,
        s: &Section,
        key: &str,
        raw: &Option<Strings>,
        convert: impl Fn(&str) -> Result<T, String>,
    ) -> Vec<(T, Option<usize>)> {
        let Some(raw) = raw else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(raw.get_ref().len());
        for entry in raw.get_ref() {
            let line = self.at(entry);
            match convert(entry.get_ref()) {
                Ok(value) => out.push((value, line)),
                Err(why) => self.bad(s, key, line, why),
            }
        }
        out
    }

    fn ok_or_bad<T>(
        &mut self,
        s: &Section,
        key: &str,
        line: Option<usize>,
        result: Result<T, String>,
    ) -> Option<T> {
        result.map_err(|why| self.bad(s, key, line, why)).ok()
    }
}

/// The TOML type of an item, as problems name it.
fn type_name(item: &Item) -> &'static str {
    match item {
        Item::Value(v) => v.type_name(),
        other => other.type_name(),
    }
}

/// Why `value` is not what `expect` asks for; `at` is where serde stopped (inside an
/// array, the entry at fault).
fn wrong_type(expect: Expect, value: &Value, at: usize) -> String {
    let found = value.type_name();
    match expect {
        Expect::Strings => match value.as_array() {
            Some(array) => {
                let entry = array
                    .iter()
                    .find(|v| v.span().is_some_and(|span| span.contains(&at)))
                    .or_else(|| array.iter().find(|v| !v.is_str()));
                let found = entry.map_or("something else", Value::type_name);
                format!("expected strings in the array, found {found}")
            }
            None => format!("expected an array of strings, found {found}"),
        },
        Expect::Duration if value.is_integer() => {
            format!("{DURATION_FORMS}; a bare number has no unit")
        }
        Expect::Str | Expect::Duration => format!("expected a string, found {found}"),
        Expect::Bool => format!("expected true or false, found {found}"),
        Expect::Count => format!("expected a whole number, found {found}"),
        Expect::Size => format!(r#"expected bytes or a size like "35MB", found {found}"#),
        Expect::Table => format!("expected a table, found {found}"),
    }
}
