//! The command line (SPEC §2).

use std::process::ExitCode;

/// Parses the command line, runs the subcommand, returns the exit code.
pub fn main() -> ExitCode {
    todo!()
}
