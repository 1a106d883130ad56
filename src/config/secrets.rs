//! Secrets: the [`Secret`] newtype that never prints, and where a secret comes from
//! (`NAME_env`, `NAME_file` or a literal `NAME`, in that order of preference).

use std::fmt;
use std::path::{Path, PathBuf};

/// A secret value (password, token, hash). Prints as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself: only for the place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Which of the three forms of a secret was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Form {
    /// `NAME_env = "VARIABLE"`.
    Env,
    /// `NAME_file = "PATH"`.
    File,
    /// `NAME = "value"` in the file itself.
    Literal,
}

impl Form {
    /// Every form, in order of preference.
    pub(super) const ALL: [Form; 3] = [Form::Env, Form::File, Form::Literal];

    /// The key of this form for the secret called `name` (`password_env`, …).
    pub(super) fn key(self, name: &str) -> String {
        match self {
            Form::Env => format!("{name}_env"),
            Form::File => format!("{name}_file"),
            Form::Literal => name.to_owned(),
        }
    }
}

/// What reading a secret found.
#[derive(Debug)]
pub(super) enum Resolved {
    /// The value (never empty).
    Value(Secret),
    /// `NAME_file` names a file that does not exist (yet); allowed only where the caller says.
    Missing(PathBuf),
}

/// Reads the secret that `form` points at; `written` is the text of the key's value and
/// `base` the folder relative paths start from. The error explains, without the value.
pub(super) fn resolve(
    form: Form,
    written: &str,
    base: &Path,
    missing_file_ok: bool,
) -> Result<Resolved, String> {
    let value = match form {
        Form::Env => match std::env::var(written) {
            Ok(value) => value,
            Err(std::env::VarError::NotPresent) => {
                return Err(format!("environment variable {written:?} is not set"));
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(format!("environment variable {written:?} is not UTF-8"));
            }
        },
        Form::File => {
            let path = resolve_path(base, written);
            match std::fs::metadata(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && missing_file_ok => {
                    return Ok(Resolved::Missing(path));
                }
                Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
                // A FIFO or a device (/dev/stdin, /dev/zero) could block or never end.
                Ok(meta) if !meta.is_file() => {
                    return Err(format!(
                        "cannot read {}: not a regular file",
                        path.display()
                    ));
                }
                Ok(_) => {}
            }
            match std::fs::read_to_string(&path) {
                // The file is written by an editor or `echo`: its final newline is not the secret.
                Ok(text) => text.trim_end_matches(['\r', '\n']).to_owned(),
                Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
            }
        }
        Form::Literal => written.to_owned(),
    };
    if value.is_empty() {
        let what = match form {
            Form::Env => format!("environment variable {written:?}"),
            Form::File => format!("file {}", resolve_path(base, written).display()),
            Form::Literal => "the value".to_owned(),
        };
        return Err(format!("{what} is empty"));
    }
    Ok(Resolved::Value(Secret::new(value)))
}

/// `path` as written in the file, anchored at the file's folder when relative.
pub(super) fn resolve_path(base: &Path, path: &str) -> PathBuf {
    let path = Path::new(path);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// The three keys of one secret as written (`NAME_env`, `NAME_file`, `NAME`).
pub(super) struct RawSecret<'a> {
    /// `NAME_env`.
    pub(super) env: &'a Option<serde_spanned::Spanned<String>>,
    /// `NAME_file`.
    pub(super) file: &'a Option<serde_spanned::Spanned<String>>,
    /// `NAME`.
    pub(super) literal: &'a Option<serde_spanned::Spanned<String>>,
}

impl RawSecret<'_> {
    fn get(&self, form: Form) -> &Option<serde_spanned::Spanned<String>> {
        match form {
            Form::Env => self.env,
            Form::File => self.file,
            Form::Literal => self.literal,
        }
    }
}

/// The secret `name` of section `s`: the preferred form given, read. Giving more than one
/// form, an unset variable, an unreadable file or an empty value are problems.
/// `missing_file_ok`: a `NAME_file` that does not exist yet is [`Resolved::Missing`].
pub(super) fn read(
    r: &mut super::reader::Reader,
    s: &super::reader::Section,
    name: &str,
    raw: RawSecret,
    missing_file_ok: bool,
) -> Option<(Form, Resolved)> {
    let keys: Vec<String> = Form::ALL.iter().map(|f| f.key(name)).collect();
    let given: Vec<Form> = Form::ALL
        .into_iter()
        .filter(|f| s.has(&f.key(name)))
        .collect();
    if given.len() > 1 {
        let line = r.key_line(s, &given[1].key(name));
        let named: Vec<String> = given.iter().map(|f| f.key(name)).collect();
        let message = format!(
            "{} {}: give only one of {}, {} or {}",
            named.join(" and "),
            s.place,
            keys[0],
            keys[1],
            keys[2]
        );
        r.problem(line, message);
    }
    let form = *given.first()?;
    let at = raw.get(form).as_ref()?;
    let line = r.at(at);
    match resolve(form, at.get_ref(), &r.base, missing_file_ok) {
        Ok(resolved) => {
            if form == Form::Literal {
                r.literal_secrets = true;
            }
            Some((form, resolved))
        }
        Err(why) => {
            r.bad(s, &form.key(name), line, why);
            None
        }
    }
}
