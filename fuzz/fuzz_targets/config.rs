//! `config::parse` on arbitrary UTF-8: never panics; an error lists at least one
//! problem; a valid configuration can be summarized.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A `*_file` key makes parse read the named file: an absolute path such as
    // /dev/zero or /dev/stdin would hang the run, so those inputs are left out.
    if text.contains("_file") {
        return;
    }
    // A folder that does not exist: relative paths in the input resolve to nothing.
    match mailgate::config::parse(text, Path::new("/nonexistent/mailgate-fuzz/proxy.toml")) {
        Ok(config) => {
            let _ = mailgate::cli::check::summary(&config);
        }
        Err(errors) => {
            assert!(!errors.problems.is_empty(), "an error without a problem");
            let _ = errors.to_string();
        }
    }
});
