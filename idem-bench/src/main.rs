//! The idem load benchmark: `scripts/bench.sh` (or `cargo run --release -p idem-bench`).
//!
//! Starts its own `redis-server` on a free loopback port and the app in-process on another, drives
//! each row with `wrk` for a bounded time, reads Redis's own `INFO commandstats` before and after
//! each row, and prints a Markdown table. Rows run interleaved, round after round, so that drift
//! (thermal, a noisy neighbour) hits every row alike; the table shows each row's median.

mod app;
mod pg;
mod probe;
mod wrk;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use idem_testkit::{command_stats, RedisServer};

use crate::wrk::{Keys, Load, WrkResult};

/// The bearer token the load carries (see `wrk::SCRIPT`), hence the scope of every record.
const ACCOUNT: &str = "acct_1MbenchAccount";

struct Options {
    seconds: u64,
    warmup: u64,
    rounds: usize,
    load: Load,
    workers: usize,
    lanes: usize,
    rows: Vec<String>,
    hold: bool,
    postgres: bool,
    preload: bool,
    metrics: bool,
    /// `--baseline FILE`: the report of a run without `--metrics`, and its app CPU per request
    /// by row number.
    baseline: Option<(String, BTreeMap<String, f64>)>,
}

impl Options {
    fn parse() -> Result<Self, String> {
        let mut o = Self {
            seconds: 4,
            warmup: 1,
            rounds: 3,
            load: Load {
                threads: 1,
                connections: 32,
            },
            workers: 1,
            lanes: idem::RedisStore::DEFAULT_LANES,
            rows: DEFAULT_ROWS.iter().map(|s| (*s).to_owned()).collect(),
            hold: false,
            postgres: false,
            preload: false,
            metrics: false,
            baseline: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
            let num = |v: String, name: &str| {
                v.parse::<u64>()
                    .map_err(|_| format!("{name}: `{v}` is not a number"))
            };
            match arg.as_str() {
                "--seconds" => o.seconds = num(value("--seconds")?, "--seconds")?.clamp(1, 60),
                "--warmup" => o.warmup = num(value("--warmup")?, "--warmup")?.min(30),
                "--rounds" => o.rounds = num(value("--rounds")?, "--rounds")?.clamp(1, 20) as usize,
                "--threads" => {
                    o.load.threads = num(value("--threads")?, "--threads")?.clamp(1, 16) as usize;
                }
                "--connections" => {
                    o.load.connections =
                        num(value("--connections")?, "--connections")?.clamp(1, 1024) as usize;
                }
                "--workers" => {
                    o.workers = num(value("--workers")?, "--workers")?.clamp(1, 16) as usize;
                }
                "--lanes" => o.lanes = num(value("--lanes")?, "--lanes")?.clamp(1, 16) as usize,
                "--rows" => {
                    o.rows = value("--rows")?
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect();
                }
                "--hold" => o.hold = true,
                "--postgres" => o.postgres = true,
                "--preload" => {
                    o.postgres = true;
                    o.preload = true;
                }
                "--metrics" => o.metrics = true,
                "--baseline" => {
                    let path = value("--baseline")?;
                    let report = std::fs::read_to_string(&path)
                        .map_err(|e| format!("--baseline {path}: {e}"))?;
                    let cpu = app_cpu_by_row(&report);
                    if cpu.is_empty() {
                        return Err(format!("--baseline {path}: no table of a run in it"));
                    }
                    o.baseline = Some((path, cpu));
                }
                "-h" | "--help" => {
                    println!("{HELP}");
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument `{other}`\n{HELP}")),
            }
        }
        if o.load.connections < o.load.threads {
            o.load.connections = o.load.threads;
        }
        for id in &o.rows {
            if !ROWS.iter().any(|r| r.id == id) {
                let known: Vec<_> = ROWS.iter().map(|r| r.id).collect();
                return Err(format!(
                    "unknown row `{id}`; known rows: {}",
                    known.join(", ")
                ));
            }
        }
        Ok(o)
    }
}

const HELP: &str = "idem-bench: load benchmark of idem (see idem-bench/RESULTS.md)

options:
  --seconds N      measured seconds per row and round (default 4)
  --warmup N       unmeasured seconds before each row (default 1)
  --rounds N       rounds over all rows, interleaved; the table shows medians (default 3)
  --threads N      wrk threads (default 1)
  --connections N  wrk connections (default 32)
  --workers N      actix workers (default 1)
  --lanes N        RedisStore lanes (default: the library's DEFAULT_LANES)
  --rows a,b,...   rows to run (default: all but the extra connection-setup rows)
  --hold           after the table, keep the servers up for a profiler until stdin closes
  --postgres       the Postgres rows instead: PostgresStore first requests and replays and the
                   transactional mode, each against a hand-written floor on the same pool, with
                   statements per request from pg_stat_statements (--seconds, --threads,
                   --connections and --workers apply)
  --preload        with --postgres: then load 10^6 live and 10^6 expired records, run the
                   first-request rows again, and measure the sweep's rate
  --metrics        install a metrics recorder (Prometheus with the README's buckets, never
                   rendered; upkeep every 5 s) for the whole run: compare with a run without it,
                   back to back, for the cost of idem's metrics
  --baseline FILE  with --metrics: the report of a run without it (scripts/bench.sh > FILE),
                   whose app CPU per request each row is compared with";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seed {
    None,
    /// One request through the endpoint itself (the first request; the rest replay it).
    Itself,
    /// One request through another endpoint with the same key (stores what this row reads).
    Via(&'static str),
}

struct RowDef {
    id: &'static str,
    num: &'static str,
    label: &'static str,
    path: &'static str,
    keys: Keys,
    baseline: Option<&'static str>,
    redis: bool,
    /// The commands the Lua scripts a request of this row sends run inside Redis, per request:
    /// `INFO commandstats` counts them too, but they are no round trips.
    inner: &'static [(&'static str, f64)],
    seed: Seed,
}

const ROWS: &[RowDef] = &[
    RowDef {
        id: "plain",
        num: "1",
        label: "plain handler (no idempotency, no Redis): ceiling",
        path: "/plain/payments",
        keys: Keys::Unique,
        baseline: None,
        redis: false,
        inner: NONE,
        seed: Seed::None,
    },
    RowDef {
        id: "floor",
        num: "2",
        label: "hand-written `SET NX PX` + `SET`, one multiplexed connection per worker: floor",
        path: "/floor/worker",
        keys: Keys::Unique,
        baseline: None,
        redis: true,
        inner: NONE,
        seed: Seed::None,
    },
    RowDef {
        id: "floor-shared",
        num: "2b",
        label: "hand-written `SET NX PX` + `SET`, one multiplexed connection for all workers",
        path: "/floor/shared",
        keys: Keys::Unique,
        baseline: Some("floor"),
        redis: true,
        inner: NONE,
        seed: Seed::None,
    },
    RowDef {
        id: "floor-pool",
        num: "2c",
        label: "hand-written `SET NX PX` + `SET`, a deadpool-redis checkout per request",
        path: "/floor/pool",
        keys: Keys::Unique,
        baseline: Some("floor"),
        redis: true,
        inner: NONE,
        seed: Seed::None,
    },
    RowDef {
        id: "floor-lua",
        num: "2d",
        label: "hand-written, the library's claim (`SET ... NX GET`) and complete script (`EVALSHA`), one connection per worker",
        path: "/floor/lua",
        keys: Keys::Unique,
        baseline: Some("floor"),
        redis: true,
        inner: COMPLETE_SCRIPT,
        seed: Seed::None,
    },
    RowDef {
        id: "idem-redis-first",
        num: "3",
        label: "`#[idempotent]`, RedisStore, unique keys (every request a first request)",
        path: "/redis/payments",
        keys: Keys::Unique,
        baseline: Some("floor"),
        redis: true,
        inner: COMPLETE_SCRIPT,
        seed: Seed::None,
    },
    RowDef {
        id: "idem-redis-step",
        num: "3s",
        label: "`#[idempotent]`, RedisStore, unique keys, one journaled step (`Steps::run`)",
        path: "/redis/step",
        keys: Keys::Unique,
        baseline: Some("idem-redis-first"),
        redis: true,
        inner: STEP_AND_COMPLETE_SCRIPTS,
        seed: Seed::None,
    },
    RowDef {
        id: "get",
        num: "4a",
        label: "hand-written one `GET` per request, one multiplexed connection per worker",
        path: "/get/worker",
        keys: Keys::Fixed,
        baseline: None,
        redis: true,
        inner: NONE,
        seed: Seed::Via("/floor/worker"),
    },
    RowDef {
        id: "get-shared",
        num: "4a'",
        label: "hand-written one `GET` per request, one multiplexed connection for all workers",
        path: "/get/shared",
        keys: Keys::Fixed,
        baseline: Some("get"),
        redis: true,
        inner: NONE,
        seed: Seed::Via("/floor/worker"),
    },
    RowDef {
        id: "get-lua",
        num: "4b",
        label: "hand-written, the library's claim on a stored record (one `SET ... NX GET`: a replay's read), one connection per worker",
        path: "/get/lua",
        keys: Keys::Fixed,
        baseline: Some("get"),
        redis: true,
        inner: NONE,
        seed: Seed::Via("/floor/lua"),
    },
    RowDef {
        id: "idem-redis-replay",
        num: "4",
        label: "`#[idempotent]`, RedisStore, one key (every request a replay, from the replay cache)",
        path: "/redis/payments",
        keys: Keys::Fixed,
        baseline: Some("plain"),
        redis: true,
        inner: NONE,
        seed: Seed::Itself,
    },
    RowDef {
        id: "idem-redis-replay-store",
        num: "4u",
        label: "`#[idempotent]`, RedisStore with `replay_cache(0)`, one key (every replay reads the store)",
        path: "/redis-uncached/payments",
        keys: Keys::Fixed,
        baseline: Some("get"),
        redis: true,
        inner: NONE,
        seed: Seed::Itself,
    },
    RowDef {
        id: "idem-redis-step-replay",
        num: "4s",
        label: "`#[idempotent]` with one step, RedisStore, one key (replays: the journal is not read)",
        path: "/redis/step",
        keys: Keys::Fixed,
        baseline: Some("idem-redis-replay"),
        redis: true,
        inner: NONE,
        seed: Seed::Itself,
    },
    RowDef {
        id: "idem-memory-first",
        num: "5a",
        label: "`#[idempotent]`, MemoryStore, unique keys",
        path: "/memory/payments",
        keys: Keys::Unique,
        baseline: Some("plain"),
        redis: false,
        inner: NONE,
        seed: Seed::None,
    },
    RowDef {
        id: "idem-memory-replay",
        num: "5b",
        label: "`#[idempotent]`, MemoryStore, one key (replays)",
        path: "/memory/payments",
        keys: Keys::Fixed,
        baseline: Some("plain"),
        redis: false,
        inner: NONE,
        seed: Seed::Itself,
    },
];

const DEFAULT_ROWS: &[&str] = &[
    "plain",
    "floor",
    "floor-pool",
    "floor-lua",
    "idem-redis-first",
    "idem-redis-step",
    "get",
    "get-lua",
    "idem-redis-replay",
    "idem-redis-replay-store",
    "idem-redis-step-replay",
    "idem-memory-first",
    "idem-memory-replay",
];

/// No script runs.
const NONE: &[(&str, f64)] = &[];
/// The completion script runs a `GET` and a `SET` inside its `EVALSHA`.
const COMPLETE_SCRIPT: &[(&str, f64)] = &[("get", 1.0), ("set", 1.0)];

/// One step's script (`GET` of the record, `HGET` of the journal's fingerprint, `HSET`,
/// `PEXPIRE`) inside its `EVALSHA`, then the completion's; the journal's `HGETALL` is a round
/// trip of its own.
const STEP_AND_COMPLETE_SCRIPTS: &[(&str, f64)] = &[
    ("get", 2.0),
    ("set", 1.0),
    ("hget", 1.0),
    ("hset", 1.0),
    ("pexpire", 1.0),
];

/// Calls per request, by command name.
type PerRequest = Vec<(String, f64)>;

#[derive(Default)]
struct RowStats {
    runs: Vec<WrkResult>,
    commands: BTreeMap<String, u64>,
    requests: u64,
    app_cpu: f64,
    redis_cpu: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl RowStats {
    fn rps(&self) -> f64 {
        median(self.runs.iter().map(WrkResult::rps).collect())
    }
    fn p50_ms(&self) -> f64 {
        median(self.runs.iter().map(|r| r.p50_us / 1000.0).collect())
    }
    fn p99_ms(&self) -> f64 {
        median(self.runs.iter().map(|r| r.p99_us / 1000.0).collect())
    }
    fn spread(&self) -> (f64, f64) {
        let rps = self.runs.iter().map(WrkResult::rps);
        let lo = rps.clone().fold(f64::INFINITY, f64::min);
        let hi = rps.fold(0.0, f64::max);
        (lo, hi)
    }
    /// Commands per request: (sent by the app, run inside the scripts the app sent).
    fn per_request(&self, inner: &[(&str, f64)]) -> (PerRequest, PerRequest) {
        if self.requests == 0 {
            return (Vec::new(), Vec::new());
        }
        let (mut sent, mut inside) = (Vec::new(), Vec::new());
        for (name, calls) in &self.commands {
            let per = *calls as f64 / self.requests as f64;
            let run_inside = inner
                .iter()
                .find_map(|(n, c)| (n == name).then_some(*c))
                .unwrap_or(0.0)
                .min(per);
            if per - run_inside >= 0.005 {
                sent.push((name.clone(), per - run_inside));
            }
            if run_inside >= 0.005 {
                inside.push((name.clone(), run_inside));
            }
        }
        (sent, inside)
    }
    /// Commands the app sent per request: its Redis round trips.
    fn sent_per_request(&self, inner: &[(&str, f64)]) -> f64 {
        // An empty sum is -0.0 (the float sum starts there): shown as 0.
        let sum: f64 = self.per_request(inner).0.iter().map(|(_, n)| n).sum();
        if sum > 0.0 {
            sum
        } else {
            0.0
        }
    }
    fn cpu_us(&self, seconds: f64) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            seconds * 1e6 / self.requests as f64
        }
    }
}

fn commands(redis: &RedisServer) -> BTreeMap<String, u64> {
    command_stats(&redis.cli(&["INFO", "commandstats"]))
        .into_iter()
        .collect()
}

/// CPU seconds (user + system) a process has used so far, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32, tick: f64) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The fields after the command name, which is in parentheses: state is field 3, utime 14,
    // stime 15.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / tick
}

fn clock_tick() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let first_line = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| {
                let text = if o.stdout.is_empty() {
                    o.stderr
                } else {
                    o.stdout
                };
                String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            })
            .unwrap_or_else(|| "unknown".into())
    };
    let redis = first_line(&idem_testkit::redis_server_binary(), &["--version"]);
    let redis = redis
        .split_whitespace()
        .find_map(|w| w.strip_prefix("v="))
        .map_or(redis.clone(), |v| format!("redis-server {v}"));
    format!(
        "- machine: {cores} cores ({cpu}), kernel {kernel}\n- {rustc}, release profile\n- {redis}, {wrk}",
        kernel = first_line("uname", &["-r"]),
        rustc = env!("IDEM_BENCH_RUSTC"),
        wrk = first_line("wrk", &["-v"])
            .split(" [")
            .next()
            .unwrap_or("wrk")
            .to_owned(),
    )
}

fn script_file() -> Result<PathBuf, String> {
    let path = std::env::temp_dir().join(format!("idem-bench-{}.lua", std::process::id()));
    std::fs::write(&path, wrk::SCRIPT).map_err(|e| format!("writing the wrk script: {e}"))?;
    Ok(path)
}

/// The store key of the idempotent endpoint's record for `key`.
fn record_key(key: &str) -> Result<String, String> {
    if key.is_empty() || !key.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(format!("{key:?} is not a valid idempotency key"));
    }
    let record = idem_runtime::testing::record_key(ACCOUNT, key);
    Ok(idem_runtime::testing::redis_key(
        idem::RedisStore::DEFAULT_PREFIX,
        &record,
    ))
}

struct Memory {
    usage: u64,
    value_len: u64,
    floor_usage: u64,
    used_memory_per_record: Option<f64>,
}

fn info_field(redis: &RedisServer, section: &str, field: &str) -> Option<u64> {
    redis.cli(&["INFO", section]).lines().find_map(|l| {
        l.strip_prefix(field)?
            .strip_prefix(':')?
            .trim()
            .parse()
            .ok()
    })
}

/// `MEMORY USAGE` of one record of the payments response, through the idempotent endpoint and
/// through the floor, and Redis's `used_memory` growth per record over many records.
fn measure_memory(redis: &RedisServer, port: u16) -> Result<Memory, String> {
    let cli_num = |args: &[&str]| -> Result<u64, String> {
        let out = redis.cli(args);
        out.parse()
            .map_err(|_| format!("redis-cli {args:?} answered `{out}`"))
    };
    redis.cli(&["FLUSHALL"]);
    let resp = probe::post(port, "/redis/payments", "memory-probe")?;
    if resp.status != 201 {
        return Err(format!("memory probe answered {}", resp.status));
    }
    let key = record_key("memory-probe")?;
    let usage = cli_num(&["MEMORY", "USAGE", &key, "SAMPLES", "0"])?;
    let value_len = cli_num(&["STRLEN", &key])?;
    probe::post(port, "/floor/worker", "memory-probe")?;
    let floor_key = format!("floor:{ACCOUNT}:memory-probe");
    let floor_usage = cli_num(&["MEMORY", "USAGE", &floor_key, "SAMPLES", "0"])?;

    // Many records: what a record costs Redis in all (value, key, expiry entry, dict slots).
    const N: usize = 2000;
    let before = info_field(redis, "memory", "used_memory");
    let keys_before = cli_num(&["DBSIZE"])?;
    for i in 0..N {
        let resp = probe::post(port, "/redis/payments", &format!("mem-{i}"))?;
        if resp.status != 201 {
            return Err(format!("memory fill answered {}", resp.status));
        }
    }
    let after = info_field(redis, "memory", "used_memory");
    let added = cli_num(&["DBSIZE"])?.saturating_sub(keys_before);
    let used_memory_per_record = match (before, after) {
        (Some(b), Some(a)) if added > 0 => Some(a.saturating_sub(b) as f64 / added as f64),
        _ => None,
    };
    Ok(Memory {
        usage,
        value_len,
        floor_usage,
        used_memory_per_record,
    })
}

/// Watches Redis with `MONITOR` while one first request and then one replay go through the
/// idempotent endpoint; answers what each sent, as "N (COMMAND, ...)". `MONITOR` tells the app's
/// commands from those run inside a script (`[0 lua]`), which `INFO commandstats` does not.
fn monitor_check(redis: &RedisServer, port: u16) -> Result<(String, String), String> {
    use std::io::{BufRead as _, BufReader};
    let mut child = Command::new(idem_testkit::redis_cli_binary())
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &redis.port().to_string(),
            "MONITOR",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("redis-cli MONITOR: {e}"))?;
    let stdout = child.stdout.take().ok_or("redis-cli MONITOR: no stdout")?;
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    // MONITOR answers OK once it is attached; give it a moment, then mark the start.
    std::thread::sleep(Duration::from_millis(300));
    redis.cli(&["ECHO", "idem-bench-first"]);
    // Both through the store without the replay cache (with it, the replay would send nothing;
    // the first request's commands are the same either way). One path for both: the path is
    // part of the fingerprint.
    let first = probe::post(port, "/redis-uncached/payments", "monitor-probe")?;
    redis.cli(&["ECHO", "idem-bench-replay"]);
    let replay = probe::post(port, "/redis-uncached/payments", "monitor-probe")?;
    redis.cli(&["ECHO", "idem-bench-end"]);
    std::thread::sleep(Duration::from_millis(300));
    let _ = child.kill();
    let _ = child.wait();
    let lines = reader.join().map_err(|_| "MONITOR reader panicked")?;
    if first.status != 201 || replay.header("idempotent-replayed") != Some("true") {
        return Err("MONITOR probe: unexpected responses".into());
    }
    let between = |from: &str, to: &str| {
        let sent: Vec<String> = lines
            .iter()
            .skip_while(|l| !l.contains(from))
            .skip(1)
            .take_while(|l| !l.contains(to))
            // The app's commands name its client address; a script's calls show `[0 lua]`.
            .filter(|l| l.contains("127.0.0.1:") && !l.contains("\"ECHO\""))
            .filter_map(|l| l.split('"').nth(1).map(str::to_uppercase))
            .collect();
        format!("{} ({})", sent.len(), sent.join(", "))
    };
    Ok((
        between("idem-bench-first", "idem-bench-replay"),
        between("idem-bench-replay", "idem-bench-end"),
    ))
}

/// Whether the bench's copy of the complete script (row 2d) is the library's: Redis knows it by
/// its hash once the library alone has loaded its scripts (a first request loads the complete
/// script; the claim is a native command, built by the library's own builder in rows 2d and 4b).
fn scripts_match(redis: &RedisServer, port: u16) -> Result<bool, String> {
    redis.cli(&["SCRIPT", "FLUSH"]);
    let r = probe::post(port, "/redis/payments", "scripts-probe")?;
    if r.status != 201 {
        return Err(format!("scripts probe answered {}", r.status));
    }
    let complete = idem::redis::Script::new(app::library_script("complete"));
    let out = redis.cli(&["SCRIPT", "EXISTS", complete.get_hash()]);
    Ok(out.split_whitespace().filter(|w| *w == "1").count() == 1)
}

fn seed(row: &RowDef, port: u16, key: &str) -> Result<(), String> {
    let path = match row.seed {
        Seed::None => return Ok(()),
        Seed::Itself => row.path,
        Seed::Via(path) => path,
    };
    let resp = probe::post(port, path, key)?;
    if resp.status != 201 {
        return Err(format!("seeding {path} answered {}", resp.status));
    }
    Ok(())
}

/// Checks every endpoint does what its row claims before measuring it.
fn check_endpoints(port: u16) -> Result<(), String> {
    for path in [
        "/plain/payments",
        "/floor/worker",
        "/floor/shared",
        "/floor/pool",
        "/floor/lua",
    ] {
        let r = probe::post(port, path, &format!("check{}", path.replace('/', "-")))?;
        if r.status != 201 || !r.body.starts_with(b"{\"id\":\"pay_") {
            return Err(format!("{path} answered {}", r.status));
        }
    }
    for (get, key) in [
        ("/get/worker", "check-floor-worker"),
        ("/get/shared", "check-floor-worker"),
        ("/get/lua", "check-floor-lua"),
    ] {
        let r = probe::post(port, get, key)?;
        if r.status != 201 {
            return Err(format!("{get} answered {}", r.status));
        }
    }
    for path in ["/redis/payments", "/redis/step", "/memory/payments"] {
        // A key per endpoint: two endpoints are two requests (another fingerprint).
        let key = format!("check-idem{}", path.replace('/', "-"));
        let first = probe::post(port, path, &key)?;
        let again = probe::post(port, path, &key)?;
        let replayed = again.header("idempotent-replayed") == Some("true");
        if first.status != 201
            || first.header("location").is_none()
            || again.status != 201
            || again.body != first.body
            || !replayed
            || first.header("idempotent-replayed").is_some()
        {
            return Err(format!(
                "{path}: first {} then {} (replayed: {replayed})",
                first.status, again.status
            ));
        }
        let missing = probe::post_without_key(port, path)?;
        if missing != 400 {
            return Err(format!("{path} without a key answered {missing}, not 400"));
        }
    }
    Ok(())
}

/// Installs the Prometheus recorder as the global one, the way the README tells an application
/// to (buckets for idem's histograms), so that every metric idem emits is recorded; nothing
/// renders it during the run. Its upkeep (draining the histograms) runs every 5 s on a thread of
/// its own, as an exporter's would.
fn install_recorder() -> Result<(), String> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("idem_store_operation_seconds".into()),
            &[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5,
            ],
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("idem_wait_seconds".into()),
                &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            )
        })
        .map_err(|e| format!("the metrics buckets: {e}"))?
        .install_recorder()
        .map_err(|e| format!("installing the metrics recorder: {e}"))?;
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(5));
        handle.run_upkeep();
    });
    Ok(())
}

fn run() -> Result<(), String> {
    let opts = Options::parse()?;
    if opts.postgres {
        let script = script_file()?;
        let report = pg::run(
            &pg::PgOptions {
                seconds: opts.seconds,
                load: opts.load,
                workers: opts.workers,
                preload: opts.preload,
            },
            &script,
        );
        let _ = std::fs::remove_file(&script);
        print!("{}", report?);
        return Ok(());
    }
    let started = Instant::now();
    if opts.metrics {
        install_recorder()?;
    }
    let redis = RedisServer::start();
    let server = app::start(&app::AppConfig {
        redis_url: redis.url(),
        workers: opts.workers,
        lanes: opts.lanes,
    })?;
    let port = server.port;
    let script = script_file()?;
    check_endpoints(port)?;

    let rows: Vec<&RowDef> = ROWS
        .iter()
        .filter(|r| opts.rows.iter().any(|id| id == r.id))
        .collect();
    let mut stats: BTreeMap<&str, RowStats> = BTreeMap::new();
    let tick = clock_tick();
    let redis_pid = redis.pid().unwrap_or(0);
    for round in 0..opts.rounds {
        for row in &rows {
            let url = format!("http://127.0.0.1:{port}{}", row.path);
            let key = format!("r{round}-{}-{}", row.id, std::process::id());
            if row.redis {
                redis.cli(&["FLUSHALL"]);
            }
            seed(row, port, &key)?;
            if opts.warmup > 0 {
                wrk::run(
                    &script,
                    &url,
                    opts.load,
                    opts.warmup,
                    row.keys,
                    &format!("w{key}"),
                )?;
            }
            let before = commands(&redis);
            let app_before = cpu_seconds(std::process::id(), tick);
            let redis_before = cpu_seconds(redis_pid, tick);
            let result = wrk::run(&script, &url, opts.load, opts.seconds, row.keys, &key)?;
            let app_cpu = cpu_seconds(std::process::id(), tick) - app_before;
            let redis_cpu = cpu_seconds(redis_pid, tick) - redis_before;
            let after = commands(&redis);
            if result.errors > 0 {
                return Err(format!(
                    "row {}: {} of {} responses were errors (status >= 400 or socket errors)",
                    row.id, result.errors, result.requests
                ));
            }
            eprintln!(
                "round {}/{} {:<20} {:>9.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms",
                round + 1,
                opts.rounds,
                row.id,
                result.rps(),
                result.p50_us / 1000.0,
                result.p99_us / 1000.0
            );
            let s = stats.entry(row.id).or_default();
            s.runs.push(result);
            s.requests += result.requests;
            s.app_cpu += app_cpu;
            s.redis_cpu += redis_cpu;
            for (name, calls) in after {
                let delta = calls.saturating_sub(before.get(&name).copied().unwrap_or(0));
                // The `INFO` that took the first snapshot is not the load's.
                let delta = if name == "info" {
                    delta.saturating_sub(1)
                } else {
                    delta
                };
                if delta > 0 {
                    *s.commands.entry(name).or_default() += delta;
                }
            }
        }
    }
    let memory = measure_memory(&redis, port)?;
    let _ = std::fs::remove_file(&script);

    let monitor = monitor_check(&redis, port)?;
    let same_scripts = scripts_match(&redis, port)?;
    // What the replay cache holds after every row ran: the unique-key rows completed hundreds of
    // thousands of records through it.
    let cache_bytes = actix_rt::System::new()
        .block_on(idem_runtime::testing::replay_cache_weight(&server.cached));
    print!(
        "{}",
        report(
            &opts,
            &rows,
            &stats,
            &memory,
            &Checks {
                monitor: Some((monitor.0.as_str(), monitor.1.as_str())),
                same_scripts,
                cache_bytes,
            },
            started.elapsed()
        )
    );

    if opts.hold {
        eprintln!(
            "holding: app on 127.0.0.1:{port}, redis on {}; close stdin to stop",
            redis.url()
        );
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
    }
    server.stop();
    drop(redis);
    Ok(())
}

fn ratio(stats: &BTreeMap<&str, RowStats>, row: &RowDef) -> Option<f64> {
    let base = stats.get(row.baseline?)?.rps();
    let own = stats.get(row.id)?.rps();
    (base > 0.0).then(|| own / base)
}

/// What the run checked besides the rows' figures.
#[derive(Clone, Copy)]
struct Checks<'a> {
    /// The commands MONITOR saw for one first request and one uncached replay.
    monitor: Option<(&'a str, &'a str)>,
    /// Whether the server's scripts are the bench's copy.
    same_scripts: bool,
    /// What the replay cache held after every row ran, in bytes.
    cache_bytes: u64,
}

fn report(
    opts: &Options,
    rows: &[&RowDef],
    stats: &BTreeMap<&str, RowStats>,
    memory: &Memory,
    checks: &Checks<'_>,
    elapsed: Duration,
) -> String {
    let Checks {
        monitor,
        same_scripts,
        cache_bytes,
    } = *checks;
    let mut out = String::new();
    let _ = writeln!(out, "\n## idem-bench\n");
    let _ = writeln!(out, "{}", machine());
    let _ = writeln!(
        out,
        "- load: wrk -t{} -c{}, {} s per row after {} s warm-up, {} round(s) interleaved, medians shown; app: {} actix worker(s), RedisStore lanes {}, metrics recorder {}; total {:.0} s\n",
        opts.load.threads,
        opts.load.connections,
        opts.seconds,
        opts.warmup,
        opts.rounds,
        opts.workers,
        opts.lanes,
        if opts.metrics {
            "installed (--metrics)"
        } else {
            "none"
        },
        elapsed.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "| # | row | req/s | (min–max) | p50 ms | p99 ms | ratio | vs | Redis commands sent / request | app CPU µs/req | Redis CPU µs/req |"
    );
    let _ = writeln!(out, "|---|---|--:|--:|--:|--:|--:|---|---|--:|--:|");
    for row in rows {
        let Some(s) = stats.get(row.id) else { continue };
        let (lo, hi) = s.spread();
        let ratio = ratio(stats, row).map_or("—".into(), |r| format!("{r:.2}×"));
        let vs = row
            .baseline
            .and_then(|b| ROWS.iter().find(|r| r.id == b))
            .map_or("baseline".into(), |b| format!("row {}", b.num));
        let list = |v: &[(String, f64)]| {
            v.iter()
                .map(|(n, c)| format!("{} {c:.2}", n.to_uppercase()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (cmds, redis_cpu) = if row.redis {
            let (sent, inner) = s.per_request(row.inner);
            let mut cmds = format!("**{:.2}**: {}", s.sent_per_request(row.inner), list(&sent));
            if !inner.is_empty() {
                let _ = write!(cmds, " (inside the scripts: {})", list(&inner));
            }
            (cmds, format!("{:.1}", s.cpu_us(s.redis_cpu)))
        } else {
            ("—".into(), "—".into())
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.0}–{:.0} | {:.2} | {:.2} | {} | {} | {} | {:.1} | {} |",
            row.num,
            row.label,
            s.rps(),
            lo,
            hi,
            s.p50_ms(),
            s.p99_ms(),
            ratio,
            vs,
            cmds,
            s.cpu_us(s.app_cpu),
            redis_cpu,
        );
    }
    if rows
        .iter()
        .any(|r| r.id == "floor-lua" || r.id == "get-lua")
    {
        let _ = writeln!(
            out,
            "\nRows 2d and 4b send the claim the library's own builder makes; row 2d runs {} complete script as the library (checked with `SCRIPT EXISTS` after the library loaded its own).",
            if same_scripts { "the same" } else { "**a different** (the bench's copy is stale)" }
        );
    }
    let _ = writeln!(
        out,
        "\nRedis memory per record, the payments response (201, ~200-byte JSON body, `Location`, `Content-Type`):"
    );
    let _ = writeln!(
        out,
        "- `#[idempotent]` record: `MEMORY USAGE` {} bytes (value {} bytes: fingerprint, status, headers, body)",
        memory.usage, memory.value_len
    );
    let _ = writeln!(
        out,
        "- the floor's bare body under a plain key: `MEMORY USAGE` {} bytes",
        memory.floor_usage
    );
    if let Some(per) = memory.used_memory_per_record {
        let _ = writeln!(
            out,
            "- Redis `used_memory` growth over 2000 records: {per:.0} bytes per record (key, value, expiry, table slots)"
        );
    }

    let _ = writeln!(out, "\nTargets (issues 5, 11 and 22):");
    let get = |id: &str| stats.get(id);
    let mut check = |name: String, ok: bool| {
        let _ = writeln!(out, "- [{}] {name}", if ok { "x" } else { " " });
    };
    for (id, name, target, inner) in [
        ("idem-redis-first", "first request", 2.0, COMPLETE_SCRIPT),
        (
            "idem-redis-replay-store",
            "replay without the cache",
            1.0,
            NONE,
        ),
    ] {
        if let Some(s) = get(id) {
            let per = s.sent_per_request(inner);
            check(
                format!("{name}: {per:.2} Redis commands sent per request under load (target {target:.0}; no PING, UNWATCH or SCRIPT)"),
                (per - target).abs() < 0.01,
            );
        }
    }
    if let Some((first, replay)) = monitor {
        check(
            format!(
                "MONITOR, one request at a time: a first request sends {first}, a replay {replay}"
            ),
            first.starts_with("2 ") && replay.starts_with("1 "),
        );
    }
    let pairs = [
        (
            "idem-redis-first",
            "floor",
            0.85,
            "`#[idempotent]` first requests vs floor",
        ),
        (
            "idem-redis-replay",
            "plain",
            0.9,
            "`#[idempotent]` RedisStore replays (replay cache) vs the plain handler (issue 22)",
        ),
        (
            "idem-redis-replay-store",
            "get",
            0.9,
            "`#[idempotent]` RedisStore replays without the cache vs one-`GET` handler",
        ),
        (
            "idem-memory-first",
            "plain",
            0.8,
            "MemoryStore first requests vs plain (issue 22)",
        ),
        (
            "idem-memory-replay",
            "plain",
            0.8,
            "MemoryStore replays vs plain",
        ),
    ];
    for (id, base, target, name) in pairs {
        if let (Some(a), Some(b)) = (get(id), get(base)) {
            let r = a.rps() / b.rps();
            check(format!("{name}: {r:.2}× (target ≥ {target}×)"), r >= target);
        }
    }
    if let Some(s) = get("idem-redis-replay") {
        // Each round replays a key of its own (seeded by one first request before the
        // measurement): one read of each is the most the cache may make.
        let keys = s.runs.len() as u64;
        let reads: u64 = s.commands.values().sum();
        let names: Vec<String> = s
            .commands
            .iter()
            .map(|(name, calls)| format!("{} {calls}", name.to_uppercase()))
            .collect();
        check(
            format!(
                "retry storm: {} replays of {keys} completed keys (one per round) sent {reads} Redis commands ({}) (target: at most 1 read per key and instance; issue 22)",
                s.requests,
                names.join(", ")
            ),
            reads <= keys,
        );
    }
    if stats.contains_key("idem-redis-first") {
        let capacity = idem::Idempotency::DEFAULT_REPLAY_CACHE as u64;
        check(
            format!(
                "replay cache after every row: {:.3} MiB of copies (a copy is made by a retry's read, so the unique-key rows add none; the flood of retried unique keys is `tests/replay_cache.rs`), capacity {:.0} MiB (target: within it; issue 22)",
                cache_bytes as f64 / 1048576.0,
                capacity as f64 / 1048576.0
            ),
            cache_bytes <= capacity,
        );
    }
    if let (Some(a), Some(b)) = (get("idem-redis-first"), get("floor")) {
        let r = a.p99_ms() / b.p99_ms();
        check(
            format!(
                "p99 of first requests: {:.2} ms vs floor {:.2} ms = {r:.2}× (target ≤ 1.5×)",
                a.p99_ms(),
                b.p99_ms()
            ),
            r <= 1.5,
        );
    }
    if opts.metrics {
        match metrics_cost(opts, rows, stats) {
            Some((line, ok)) => check(line, ok),
            None => {
                let _ = writeln!(
                    out,
                    "- [?] metrics: compare each row's app CPU µs/req with a run without `--metrics`, back to back: `scripts/bench.sh > without.md && scripts/bench.sh --metrics --baseline without.md` (target: at most +2%; issue 22)"
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "\nRun: `scripts/bench.sh` (any option is passed on, see `scripts/bench.sh --help`)."
    );
    out
}

/// The app CPU µs per request of each row of a report's table, by row number (`| 3 | ... |`, the
/// next-to-last column).
fn app_cpu_by_row(report: &str) -> BTreeMap<String, f64> {
    report
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            // "| # | row | req/s | ... | app CPU µs/req | Redis CPU µs/req |": 11 columns.
            if cells.len() != 13 || cells[1].is_empty() || cells[1] == "#" {
                return None;
            }
            let cpu = cells[10].parse::<f64>().ok()?;
            Some((cells[1].to_owned(), cpu))
        })
        .collect()
}

/// The metrics' cost against `--baseline`: each row's app CPU per request against the same row
/// there. The rows without idem emit no metric: their mean change is the drift between the two
/// runs, and the target is judged on the rows of idem's mean change net of it. `None` without a
/// baseline or a row of idem in common.
fn metrics_cost(
    opts: &Options,
    rows: &[&RowDef],
    stats: &BTreeMap<&str, RowStats>,
) -> Option<(String, bool)> {
    let (path, base) = opts.baseline.as_ref()?;
    let (mut idem, mut other) = (Vec::new(), Vec::new());
    for row in rows {
        let (Some(s), Some(b)) = (stats.get(row.id), base.get(row.num)) else {
            continue;
        };
        let change = s.cpu_us(s.app_cpu) / b - 1.0;
        if row.label.contains("#[idempotent]") {
            idem.push((row.num, change));
        } else {
            other.push((row.num, change));
        }
    }
    let mean = |v: &[(&str, f64)]| v.iter().map(|(_, c)| c).sum::<f64>() / v.len().max(1) as f64;
    let list = |v: &[(&str, f64)]| {
        v.iter()
            .map(|(num, change)| format!("{num} {:+.1}%", change * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if idem.is_empty() {
        return None;
    }
    let (with_metrics, drift) = (mean(&idem), mean(&other));
    let net = ((1.0 + with_metrics) / (1.0 + drift) - 1.0) * 100.0;
    Some((
        format!(
            "metrics: app CPU µs/req against {path} (a run without `--metrics`): rows of idem {} (mean {:+.1}%), rows without idem {} (mean {:+.1}%: the drift between the two runs); the metrics' share, net of the drift: {net:+.1}% (target: at most +2%; issue 22)",
            list(&idem),
            with_metrics * 100.0,
            list(&other),
            drift * 100.0
        ),
        net <= 2.0,
    ))
}

fn main() {
    if let Err(e) = run() {
        eprintln!("idem-bench: {e}");
        std::process::exit(1);
    }
}
