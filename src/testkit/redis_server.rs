//! A real `redis-server` for tests: started on a free loopback port without persistence,
//! stopped by PID (drop).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::{RedisSettings, Secret};

/// A running `redis-server`.
pub struct RedisServer {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// `--tls-port` instead of `--port`: its certificate and key files.
    tls: Option<(String, String)>,
}

impl RedisServer {
    /// Starts one on a free port and waits (bounded) until it accepts connections.
    /// Panics when `redis-server` is not installed (scripts/test.sh installs it).
    pub fn start() -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut server = RedisServer {
            child: None,
            port,
            tls: None,
        };
        server.restart();
        server
    }

    /// As [`RedisServer::start`], speaking TLS only (`rediss://`) with this certificate
    /// and key (PEM files); clients need no certificate.
    pub fn start_tls(cert_file: &str, key_file: &str) -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut server = RedisServer {
            child: None,
            port,
            tls: Some((cert_file.into(), key_file.into())),
        };
        server.restart();
        server
    }

    /// Starts it again on the same port after [`RedisServer::stop`] (empty: no persistence).
    pub fn restart(&mut self) {
        let mut command = Command::new("redis-server");
        match &self.tls {
            None => command.args(["--port", &self.port.to_string()]),
            Some((cert, key)) => command
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .args(["--tls-cert-file", cert, "--tls-key-file", key])
                .args(["--tls-auth-clients", "no"]),
        };
        let child = command
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops it (SIGKILL by PID) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `[state]` settings pointing at it, with this key prefix.
    pub fn settings(&self, key_prefix: &str) -> RedisSettings {
        RedisSettings {
            url: Secret::new(format!("redis://127.0.0.1:{}/0", self.port)),
            display: format!("redis://127.0.0.1:{}/0", self.port),
            key_prefix: key_prefix.into(),
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
