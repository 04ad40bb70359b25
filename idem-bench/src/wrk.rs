//! Drives load with `wrk` and reads its results.

use std::{path::Path, process::Command};

/// The Lua script every row runs: a payment POST with a bearer token and an `Idempotency-Key`
/// that is unique per request (`unique`) or the same for every request (`fixed`). Every row pays
/// the same load-generator cost, so the rows compare the server alone.
pub(crate) const SCRIPT: &str = r#"-- idem-bench: one payment POST per request.
-- wrk ... -- MODE PREFIX, MODE "unique" (a new key per request) or "fixed" (PREFIX as the key).
local counter = 0
local mode, key_prefix
local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  mode = args[1]
  if mode == "unique" then
    key_prefix = args[2] .. "-" .. tid .. "-"
  else
    key_prefix = args[2]
  end
  wrk.method = "POST"
  wrk.body = '{"amount":1999,"currency":"eur","customer":"cus_9s6XKzkNRiz8i3"}'
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer acct_1MbenchAccount"
end

function request()
  counter = counter + 1
  if mode == "unique" then
    wrk.headers["Idempotency-Key"] = key_prefix .. counter
  else
    wrk.headers["Idempotency-Key"] = key_prefix
  end
  return wrk.format()
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "IDEM_RESULT requests=%d duration_us=%d status=%d connect=%d read=%d write=%d timeout=%d p50_us=%.0f p99_us=%.0f\n",
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"#;

/// How keys vary between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keys {
    /// A new key per request: every request is a first request.
    Unique,
    /// One key: every request after the first is a replay.
    Fixed,
}

/// The load shape.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    pub(crate) threads: usize,
    pub(crate) connections: usize,
}

/// One wrk run's results.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct WrkResult {
    pub(crate) requests: u64,
    pub(crate) seconds: f64,
    /// Responses with a status of 400 or more, and socket errors.
    pub(crate) errors: u64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
}

impl WrkResult {
    pub(crate) fn rps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Runs wrk for `seconds` against `url` with `keys` under `key`.
pub(crate) fn run(
    script: &Path,
    url: &str,
    load: Load,
    seconds: u64,
    keys: Keys,
    key: &str,
) -> Result<WrkResult, String> {
    let mode = match keys {
        Keys::Unique => "unique",
        Keys::Fixed => "fixed",
    };
    let out = Command::new("wrk")
        .arg("-t")
        .arg(load.threads.to_string())
        .arg("-c")
        .arg(load.connections.to_string())
        .arg("-d")
        .arg(format!("{seconds}s"))
        .args(["--timeout", "5s"])
        .arg("-s")
        .arg(script)
        .arg(url)
        .args(["--", mode, key])
        .output()
        .map_err(|e| format!("wrk: {e} (install it with `apt-get install -y wrk`)"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "wrk failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    parse(&stdout).ok_or_else(|| format!("no IDEM_RESULT line in wrk's output:\n{stdout}"))
}

fn parse(out: &str) -> Option<WrkResult> {
    let line = out.lines().find_map(|l| l.strip_prefix("IDEM_RESULT "))?;
    let mut r = WrkResult::default();
    for field in line.split_whitespace() {
        let (name, value) = field.split_once('=')?;
        let value: f64 = value.parse().ok()?;
        match name {
            "requests" => r.requests = value as u64,
            "duration_us" => r.seconds = value / 1e6,
            "status" | "connect" | "read" | "write" | "timeout" => r.errors += value as u64,
            "p50_us" => r.p50_us = value,
            "p99_us" => r.p99_us = value,
            _ => {}
        }
    }
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_result_line() {
        let r = parse(
            "Running 1s test\nIDEM_RESULT requests=1000 duration_us=2000000 status=1 connect=0 read=2 write=0 timeout=0 p50_us=400 p99_us=1200\n",
        )
        .expect("parses");
        assert_eq!(r.requests, 1000);
        assert_eq!(r.errors, 3);
        assert!((r.rps() - 500.0).abs() < 1e-9);
        assert!((r.p99_us - 1200.0).abs() < 1e-9);
    }
}
