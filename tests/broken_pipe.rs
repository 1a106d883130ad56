//! A reader that stops early (`mailgate check | head -1`) ends the CLI quietly with exit
//! status 0 (docs/configuration.md, "Command line"), never a panic (exit 101): the real
//! binary, its stdout a pipe closed after the first line, with output well over the 64 KiB
//! a pipe buffers, so that the binary is still writing when the reader goes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const CHANNELS: usize = 3000;

/// A queue-mode config with [`CHANNELS`] file channels under long names: `check` prints
/// each twice (channels, routing table), `queue list` once.
fn big_config(dir: &Path) -> PathBuf {
    let mut text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\ndelivery = \"queue\"\nspool_dir = \"{}\"\n",
        dir.join("spool").display()
    );
    for i in 0..CHANNELS {
        text.push_str(&format!(
            "\n[channels.a-channel-with-a-rather-long-name-{i}]\nkind = \"file\"\ndir = \"{}\"\n\
             senders = [\"user{i}@example.com\", \"*@department-{i}.example.com\"]\n",
            dir.join(format!("out{i}")).display()
        ));
    }
    let path = dir.join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs mailgate with `args`, reads one line of its stdout, closes the pipe; returns the
/// line, the exit status and stderr.
fn first_line_then_close(args: &[&str]) -> (String, Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailgate"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    drop(reader);
    let output = child.wait_with_output().unwrap();
    (
        line,
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs mailgate with `args` and its stdout a pipe whose reader is already gone.
fn into_a_closed_pipe(args: &[&str], dir: &Path) -> (Option<i32>, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = Command::new(env!("CARGO_BIN_EXE_mailgate"))
        .args(args)
        .current_dir(dir)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn check_route_and_queue_list_end_quietly_when_the_reader_goes() {
    let dir = tempfile::tempdir().unwrap();
    let config = big_config(dir.path());
    let config = config.to_str().unwrap();
    // Two lines of 100 KB each: the second cannot fit in the pipe.
    let sender = format!("{}@department-7.example.com", "x".repeat(100_000));
    for (args, first) in [
        (vec!["-c", config, "check"], "channels:"),
        (vec!["-c", config, "queue", "list"], "CHANNEL"),
        (vec!["-c", config, "route", &sender], "MAIL FROM:<xxx"),
    ] {
        let (line, status, stderr) = first_line_then_close(&args);
        let what = &args[2..].join(" ")[..20.min(args[2..].join(" ").len())];
        assert!(line.starts_with(first), "{what}: {line:.80}");
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        assert_eq!(status, Some(0), "{what}: {stderr}");
        assert_eq!(stderr, "", "{what}: quiet");
    }
}

#[test]
fn small_outputs_into_a_closed_pipe_end_quietly_too() {
    let dir = tempfile::tempdir().unwrap();
    let config = big_config(dir.path());
    let config = config.to_str().unwrap();
    // Argument dispatch: as /usr/sbin/sendmail.
    let sendmail = dir.path().join("sendmail");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_mailgate"), &sendmail).unwrap();
    for args in [
        vec!["-c", config, "route", "user5@example.com"],
        vec!["-c", config, "state", "export"],
        vec!["-c", config, "cert", "generate", "--dir", "certs"],
        vec!["--help"],
        vec!["check", "--help"],
    ] {
        let (status, stderr) = into_a_closed_pipe(&args, dir.path());
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(!stderr.contains("Broken pipe"), "{args:?}: {stderr}");
        assert_eq!(status, Some(0), "{args:?}: {stderr}");
    }
    let output = Command::new(&sendmail)
        .arg("--help")
        .env("RUST_BACKTRACE", "0")
        .stdout(std::io::pipe().map(|(_, w)| w).unwrap())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "sendmail --help: {stderr}");
    assert_eq!(output.status.code(), Some(0), "sendmail --help: {stderr}");
}
