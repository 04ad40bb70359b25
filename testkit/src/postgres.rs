//! A throwaway Postgres server per test: `initdb` into a fresh directory, `postgres` on a free
//! loopback port with its unix socket in that directory, tuned for speed over durability (`fsync`
//! off), stopped (fast shutdown) and deleted when dropped. Never the machine's own cluster.
//!
//! `initdb` and `postgres` refuse to run as root: when the tests run as root, the server runs as
//! the `postgres` system user (created by the distribution's package) through `setpriv`, and its
//! directory is handed to that user.
//!
//! The binaries are taken from `$PG_BIN` (a directory), else from `PATH`, else from the newest
//! `/usr/lib/postgresql/<version>/bin` (where Debian and Ubuntu put them, off `PATH`). A test that
//! needs Postgres and finds none fails with a message saying how to install it; it never skips.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::free_port;

const INSTALL_HINT: &str = "Postgres (initdb, postgres) was not found on PATH nor under \
    /usr/lib/postgresql/*/bin. Install it with `apt-get update && apt-get install -y postgresql` \
    (Debian/Ubuntu) or `brew install postgresql` (macOS), or run `scripts/test.sh`, which installs \
    it. Set PG_BIN to the directory holding initdb and postgres to use another build.";

/// The database every [`PostgresServer`] creates for its test.
pub const DATABASE: &str = "idem";
/// The superuser every [`PostgresServer`] creates (trust authentication on loopback).
pub const USER: &str = "postgres";

/// The directory holding `initdb`, `postgres` and `psql`.
///
/// # Panics
///
/// When none is found, with an install hint.
pub fn bin_dir() -> PathBuf {
    let has_all = |dir: &Path| {
        ["initdb", "postgres", "psql"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    if let Some(dir) = std::env::var_os("PG_BIN").map(PathBuf::from) {
        assert!(
            has_all(&dir),
            "PG_BIN={} has no initdb, postgres and psql",
            dir.display()
        );
        return dir;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_all(&dir) {
                return dir;
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, dir)| has_all(dir))
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, dir)| dir)
        .unwrap_or_else(|| panic!("{INSTALL_HINT}"))
}

/// A `postgres` server listening on 127.0.0.1 with one database, [`DATABASE`]. Stopped and deleted
/// when dropped.
#[derive(Debug)]
pub struct PostgresServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
    /// `Some(user)` when the server runs as another user (the tests run as root).
    run_as: Option<String>,
}

impl PostgresServer {
    /// Initialises a fresh cluster, starts it on a free port and creates [`DATABASE`], with
    /// `pg_stat_statements` loaded and created where the build ships it.
    ///
    /// # Panics
    ///
    /// When Postgres is missing (with an install hint) or does not come up.
    pub fn start() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let bin = bin_dir();
        let run_as = is_root().then(|| USER.to_owned());
        if let Some(user) = &run_as {
            let exists = Command::new("id")
                .arg("-u")
                .arg(user)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                exists,
                "the tests run as root, and initdb refuses root: the server runs as the `{user}` \
                 user, which does not exist. The distribution's postgresql package creates it; \
                 else `useradd --system {user}`."
            );
        }
        let mut last_err = String::new();
        for _ in 0..5 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("idem-pg-{}-{n}", std::process::id()));
            let mut server = Self {
                child: None,
                port: free_port(),
                dir,
                bin: bin.clone(),
                run_as: run_as.clone(),
            };
            if let Err(e) = server.init() {
                panic!("initdb failed: {e}");
            }
            match server.spawn() {
                Ok(()) => {
                    server.create_database();
                    return server;
                }
                // Most likely the port was taken between choosing and binding it.
                Err(e) => last_err = e,
            }
        }
        panic!("postgres did not start: {last_err}");
    }

    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        let mut cmd = match &self.run_as {
            Some(user) => {
                // setpriv execs the program itself (no fork, unlike runuser or su): the child is
                // the server, so signals reach it.
                let mut cmd = Command::new("setpriv");
                cmd.arg(format!("--reuid={user}"))
                    .arg(format!("--regid={user}"))
                    .arg("--init-groups")
                    .arg(program);
                cmd
            }
            None => Command::new(program),
        };
        cmd.stdin(Stdio::null()).env("LC_ALL", "C");
        cmd
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn init(&self) -> Result<(), String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("scratch dir: {e}"))?;
        if let Some(user) = &self.run_as {
            run(Command::new("chown").arg(user).arg(&self.dir), "chown")?;
        }
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(self.data())
            .args([
                "-U",
                USER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .map_err(|e| format!("spawning initdb: {e}. {INSTALL_HINT}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.data())
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()))
            // Speed over durability: the data is thrown away.
            .args(["-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"])
            .args(["-c", "max_connections=200"])
            .args(["-c", "shared_buffers=32MB"])
            .args(["-c", "logging_collector=off"])
            .stdout(Stdio::null())
            .stderr(self.log_file()?);
        if self.has_pg_stat_statements() {
            cmd.args(["-c", "shared_preload_libraries=pg_stat_statements"]);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawning postgres: {e}. {INSTALL_HINT}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "postgres exited with {status} on port {}: {}",
                        self.port,
                        self.log_tail()
                    ));
                }
            }
            if self.psql_on("postgres", "SELECT 1").is_ok() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(25));
        }
        self.kill();
        Err(format!(
            "postgres on port {} did not accept connections",
            self.port
        ))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    fn log_file(&self) -> Result<std::fs::File, String> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("opening the server log: {e}"))
    }

    /// The last lines of the server's log, for error messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn has_pg_stat_statements(&self) -> bool {
        // <prefix>/bin/postgres next to <prefix>/lib/pg_stat_statements.so (Debian's layout), or
        // pg_config's answer.
        let sibling = self
            .bin
            .parent()
            .map(|p| p.join("lib/pg_stat_statements.so"));
        if sibling.is_some_and(|p| p.is_file()) {
            return true;
        }
        Command::new(self.bin.join("pg_config"))
            .arg("--pkglibdir")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
            .is_some_and(|dir| dir.join("pg_stat_statements.so").is_file())
    }

    fn create_database(&self) {
        self.psql_on("postgres", &format!("CREATE DATABASE {DATABASE}"))
            .unwrap_or_else(|e| panic!("creating the test database: {e}"));
        if self.has_pg_stat_statements() {
            self.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements");
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:PORT/idem`.
    pub fn url(&self) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{DATABASE}", self.port)
    }

    /// The process id of the postmaster, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the server is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Whether `pg_stat_statements` is loaded and created in [`DATABASE`].
    pub fn pg_stat_statements(&self) -> bool {
        self.has_pg_stat_statements()
    }

    /// Stops the server (fast shutdown: open transactions roll back, clients are disconnected) and
    /// waits for it to exit. The data stays: [`PostgresServer::restart`] brings it back.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts a stopped server again, on the same port with the same data.
    ///
    /// # Panics
    ///
    /// When it does not come up.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("postgres did not restart: {e}"),
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Runs `sql` in [`DATABASE`] with `psql` and returns its unaligned, tuples-only output,
    /// trimmed (one line per row, columns separated by `|`).
    ///
    /// # Panics
    ///
    /// When `psql` fails.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_on(DATABASE, sql)
            .unwrap_or_else(|e| panic!("psql {sql:?} failed: {e}"))
    }

    fn psql_on(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                USER,
                "-d",
                db,
            ])
            .args(["-c", sql])
            .stdin(Stdio::null())
            .env("PGCONNECT_TIMEOUT", "5")
            .output()
            .map_err(|e| format!("psql: {e}. {INSTALL_HINT}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let status = cmd.status().map_err(|e| format!("{what}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} exited with {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_stops_and_restarts_with_its_data() {
        let mut server = PostgresServer::start();
        server.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (42)");
        assert_eq!(server.psql("SELECT x FROM t"), "42");
        if server.pg_stat_statements() {
            assert_eq!(
                server.psql("SELECT count(*) > 0 FROM pg_stat_statements"),
                "t"
            );
        }
        server.stop();
        assert!(!server.is_running());
        assert!(server.psql_on(DATABASE, "SELECT 1").is_err());
        server.restart();
        assert_eq!(server.psql("SELECT x FROM t"), "42");
        let dir = server.dir.clone();
        drop(server);
        assert!(!dir.exists());
    }
}
