//! The CLI's standard output. Every subcommand prints through here rather than with
//! `println!`, which panics when the reader has gone (`mailgate check | head -1`): Rust
//! ignores SIGPIPE, so the write fails with EPIPE, and restoring the signal would take
//! `unsafe`. A reader that has gone ends the process at once, quietly, with
//! [`READER_GONE`]; any other write error (a full disk behind `>`) is an error like any
//! other.
//!
//! Diagnostics on stderr go through `errln!`, which never panics either.
//! `mailgate run` logs to stderr through tracing, which drops what it cannot write.

use std::fmt;
use std::io::{self, Write};

/// The exit status when stdout's reader stopped reading: 0, as for ripgrep and fd. The
/// reader took what it wanted; `set -o pipefail` scripts are not failed by `| head`.
pub const READER_GONE: u8 = 0;

/// Writes `args` to stdout and flushes it (a closed pipe shows at once, not at exit).
pub fn print(args: fmt::Arguments<'_>) -> Result<(), String> {
    let mut stdout = io::stdout().lock();
    settle(stdout.write_fmt(args).and_then(|()| stdout.flush()))
}

/// Writes `bytes` to stdout and flushes it.
pub fn bytes(bytes: &[u8]) -> Result<(), String> {
    let mut stdout = io::stdout().lock();
    settle(stdout.write_all(bytes).and_then(|()| stdout.flush()))
}

/// Writes one line to stderr. Never fails: a diagnostic stderr cannot take (its reader
/// gone too, `2>&1 | head`) is dropped, and the exit status still tells.
pub fn diagnostic(args: fmt::Arguments<'_>) {
    let mut stderr = io::stderr().lock();
    let _ = stderr
        .write_fmt(args)
        .and_then(|()| stderr.write_all(b"\n"));
}

fn settle(written: io::Result<()>) -> Result<(), String> {
    match outcome(written) {
        Outcome::Written => Ok(()),
        Outcome::ReaderGone => std::process::exit(i32::from(READER_GONE)),
        Outcome::Failed(e) => Err(e),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Written,
    ReaderGone,
    Failed(String),
}

fn outcome(written: io::Result<()>) -> Outcome {
    match written {
        Ok(()) => Outcome::Written,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Outcome::ReaderGone,
        Err(e) => Outcome::Failed(format!("cannot write to standard output: {e}")),
    }
}

/// `println!` through [`print`]: `Result<(), String>`, for `?`.
macro_rules! outln {
    () => {
        $crate::cli::out::print(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::out::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` through [`print`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::out::print(format_args!($($arg)*))
    };
}

/// `eprintln!` through [`diagnostic`].
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::cli::out::diagnostic(format_args!($($arg)*))
    };
}

pub(crate) use {errln, out, outln};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_closed_pipe_is_a_quiet_end() {
        assert_eq!(outcome(Ok(())), Outcome::Written);
        assert_eq!(
            outcome(Err(io::Error::from(io::ErrorKind::BrokenPipe))),
            Outcome::ReaderGone
        );
        match outcome(Err(io::Error::from_raw_os_error(28))) {
            Outcome::Failed(e) => {
                assert!(e.starts_with("cannot write to standard output: "), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }
}
