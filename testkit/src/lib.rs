//! Test support for idem: real `redis-server` processes on free loopback ports, started and stopped
//! by the tests themselves, and throwaway Postgres servers ([`postgres::PostgresServer`]). Never a
//! mock, and never the machine's own Redis or Postgres.
//!
//! A test that needs Redis and cannot find `redis-server` fails with a message saying how to install
//! it; it never passes by skipping.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

pub mod cluster;
pub mod postgres;
pub mod processor;
pub mod proxy;
const INSTALL_HINT: &str = "redis-server was not found on PATH. Install it with \
    `apt-get update && apt-get install -y redis-server` (Debian/Ubuntu) or `brew install redis` \
    (macOS), or run `scripts/test.sh`, which installs it. Set REDIS_SERVER to use another binary.";

/// The `redis-server` binary: `$REDIS_SERVER`, else `redis-server` on PATH.
pub fn redis_server_binary() -> String {
    std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned())
}

/// The `redis-cli` binary: `$REDIS_CLI`, else `redis-cli` on PATH.
pub fn redis_cli_binary() -> String {
    std::env::var("REDIS_CLI").unwrap_or_else(|_| "redis-cli".to_owned())
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("the OS hands out a free loopback port")
}

/// A `redis-server` child process listening on 127.0.0.1. Killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a server with no persistence on a free port.
    ///
    /// # Panics
    ///
    /// When `redis-server` is missing (with an install hint) or does not come up.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra command-line arguments (e.g. `["--cluster-enabled", "yes"]`).
    ///
    /// # Panics
    ///
    /// As [`RedisServer::start`].
    pub fn start_with(extra: &[&str]) -> Self {
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut server = Self {
                child: None,
                port,
                dir: scratch_dir(port),
                extra: extra.clone(),
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => last_err = e,
            }
        }
        panic!("redis-server did not start: {last_err}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("scratch dir: {e}"))?;
        let bin = redis_server_binary();
        let mut cmd = Command::new(&bin);
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{INSTALL_HINT}"),
            Err(e) => return Err(format!("spawning {bin}: {e}")),
        };
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "redis-server exited with {status} on port {}",
                        self.port
                    ));
                }
            }
            if ping(self.port) {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        Err(format!(
            "redis-server on port {} did not answer PING",
            self.port
        ))
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Stops the server (SIGKILL) and waits for it to exit. Its data is gone.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts the server again on the same port, empty.
    ///
    /// # Panics
    ///
    /// When it does not come up.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("redis-server did not restart: {e}"),
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers. Models a hung Redis.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let status = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(pid.to_string())
                .status()
                .expect("kill(1) runs");
            assert!(status.success(), "kill -{sig} {pid} failed");
        }
    }

    /// Runs `redis-cli -p PORT ARGS...` and returns its trimmed standard output.
    ///
    /// # Panics
    ///
    /// When `redis-cli` is missing or fails.
    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args)
    }

    /// Sends one command over RESP and returns the raw reply (no redis-cli needed).
    pub fn raw(&self, args: &[&[u8]]) -> Vec<u8> {
        raw_command(self.port, args)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGCONT first, in case it was paused: a stopped process still dies on SIGKILL, but
            // this keeps the order of events obvious.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn scratch_dir(port: u16) -> PathBuf {
    std::env::temp_dir().join(format!("idem-redis-{}-{port}", std::process::id()))
}

/// Runs `redis-cli -p PORT ARGS...` and returns its trimmed standard output.
///
/// # Panics
///
/// When `redis-cli` is missing or exits non-zero.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new(redis_cli_binary())
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("redis-cli: {e}. {INSTALL_HINT}"));
    assert!(
        out.status.success(),
        "redis-cli {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Whether a server on `port` answers PING.
pub fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// Sends one RESP command and returns the raw reply bytes (one read; enough for short replies).
///
/// # Panics
///
/// When the server cannot be reached.
pub fn raw_command(port: u16, args: &[&[u8]]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set timeout");
    let mut req = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        req.extend_from_slice(a);
        req.extend_from_slice(b"\r\n");
    }
    s.write_all(&req).expect("write to redis");
    let mut buf = vec![0u8; 64 * 1024];
    let n = s.read(&mut buf).expect("read from redis");
    buf.truncate(n);
    buf
}

/// Parses `INFO commandstats` output into `(command, calls)` pairs, e.g. `("evalsha", 12)`.
pub fn command_stats(info: &str) -> Vec<(String, u64)> {
    info.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("cmdstat_")?;
            let (name, fields) = rest.split_once(':')?;
            let calls = fields
                .split(',')
                .find_map(|f| f.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// The binary of example `name`, built next to the running test: `cargo test` puts test binaries
/// in `target/<profile>/deps/` and example binaries in `target/<profile>/examples/`.
///
/// # Panics
///
/// When it is not there, with the command that builds it.
pub fn example_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("the test binary lives in target/<profile>/deps");
    let path = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "the `{name}` example is not built: {} is missing. Build it with `cargo build --examples` \
         (scripts/test.sh does this before `cargo test`; `cargo test --all-targets` alone builds \
         examples only as test harnesses)",
        path.display()
    );
    path
}

/// The environment variables that choose an example's store and processor, and the crash test's
/// key mode: [`example_command`] starts a child without them (whatever the developer's shell
/// has), so a test runs the mode it sets and no other.
pub const EXAMPLE_MODE_VARS: &[&str] = &[
    "REDIS_URL",
    "REDIS_CLUSTER_URLS",
    "DATABASE_URL",
    "PROCESSOR_URL",
    "PAYMENTS_DOWNSTREAM_KEY",
];

/// The command that runs the example `name` ([`example_binary`]) on `addr` (`BIND`), logging at
/// `warn`, with none of [`EXAMPLE_MODE_VARS`] inherited and then `env` set (so `env` may also
/// override `RUST_LOG`); standard input and output null, standard error inherited (a caller may
/// change any of this before it spawns).
pub fn example_command(name: &str, addr: std::net::SocketAddr, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(example_binary(name));
    cmd.env("BIND", addr.to_string())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for var in EXAMPLE_MODE_VARS {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd
}

/// Spawns [`example_command`] on a free loopback port and waits until it listens.
///
/// # Panics
///
/// When the example is not built, does not start, or does not listen within 20 s.
pub fn spawn_example(name: &str, env: &[(&str, &str)]) -> (Child, std::net::SocketAddr) {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut child = example_command(name, addr, env)
        .spawn()
        .unwrap_or_else(|e| panic!("the `{name}` example: {e}"));
    wait_until_listening(&mut child, addr, &format!("{name} example"));
    (child, addr)
}

/// Waits (at most 20 s) until the child process `what` accepts connections on `addr`.
///
/// # Panics
///
/// When the child exits first, or does not listen in time.
pub fn wait_until_listening(child: &mut Child, addr: std::net::SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the {what} exited with {status} before it listened on {addr}");
        }
        assert!(
            Instant::now() < deadline,
            "the {what} did not listen on {addr}"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commandstats() {
        let info = "# Commandstats\r\ncmdstat_evalsha:calls=12,usec=40,usec_per_call=3.33,rejected_calls=0,failed_calls=0\r\ncmdstat_ping:calls=1,usec=0\r\n";
        assert_eq!(
            command_stats(info),
            vec![("evalsha".to_owned(), 12), ("ping".to_owned(), 1)]
        );
    }

    #[test]
    fn starts_answers_and_stops() {
        let mut server = RedisServer::start();
        assert!(ping(server.port()));
        assert_eq!(server.cli(&["SET", "a", "1"]), "OK");
        assert_eq!(server.cli(&["GET", "a"]), "1");
        server.stop();
        assert!(!ping(server.port()));
        server.restart();
        assert!(ping(server.port()));
        assert_eq!(server.cli(&["EXISTS", "a"]), "0");
    }
}
