//! SPEC §9: whatever the umask, mailgate's folders are 0700 and its files 0600 (spool,
//! channel state, the `file` channel's folder), and folders left wider by an older run
//! are narrowed at start.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn send(port: u16) {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut expect = |code: &str| loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with(code), "expected {code}, got {line:?}");
        if line.as_bytes().get(3) != Some(&b'-') {
            break;
        }
    };
    expect("220");
    for (command, code) in [
        ("EHLO client.test\r\n", "250"),
        ("MAIL FROM:<a@example.com>\r\n", "250"),
        ("RCPT TO:<b@example.org>\r\n", "250"),
        ("DATA\r\n", "354"),
        ("Subject: modes\r\n\r\nhello\r\n.\r\n", "250"),
        ("QUIT\r\n", "221"),
    ] {
        writer.write_all(command.as_bytes()).unwrap();
        expect(code);
    }
}

#[test]
fn umask_000_still_gives_private_folders_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, outbox) = (dir.path().join("spool"), dir.path().join("outbox"));
    // A spool folder an older run left world-readable.
    std::fs::create_dir_all(spool.join("queue")).unwrap();
    std::fs::set_permissions(spool.join("queue"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\ndelivery = \"queue\"\nspool_dir = \"{}\"\n\
             check_header_from = false\n\n[channels.out]\nkind = \"file\"\ndir = \"{}\"\nsenders = [\"*\"]\n\
             rate = \"100/minute\"\n",
            spool.display(),
            outbox.display()
        ),
    )
    .unwrap();
    let child = Command::new("sh")
        .arg("-c")
        .arg("umask 000 && exec \"$0\" -c \"$1\" run")
        .arg(env!("CARGO_BIN_EXE_mailgate"))
        .arg(&config)
        .spawn()
        .unwrap();
    let _proxy = Proxy(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "mailgate did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    send(port);
    let delivered = || {
        std::fs::read_dir(&outbox)
            .map(|d| {
                d.flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == "eml"))
            })
            .unwrap_or(false)
    };
    while !delivered() {
        assert!(Instant::now() < deadline, "the message was not delivered");
        std::thread::sleep(Duration::from_millis(50));
    }
    for folder in [
        &spool,
        &spool.join("queue"),
        &spool.join("tmp"),
        &spool.join("state"),
        &outbox,
    ] {
        assert_eq!(mode(folder), 0o700, "{}", folder.display());
    }
    let mut files = vec![spool.join("lock")];
    for folder in [spool.join("state"), outbox.clone()] {
        files.extend(
            std::fs::read_dir(folder)
                .unwrap()
                .flatten()
                .map(|e| e.path()),
        );
    }
    assert!(
        files
            .iter()
            .any(|f| f.extension().is_some_and(|x| x == "events")),
        "{files:?}"
    );
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
}
