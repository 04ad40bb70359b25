#!/usr/bin/env bash
# The load benchmark (issue 5): one command, bounded in time (about 2.5 minutes on 2 cores).
#
# Installs what it needs where it is missing (wrk, redis-server, postgresql), builds the bench in release mode,
# and runs it: it starts its own redis-server and the app on free loopback ports, drives every row
# with wrk, and prints a Markdown table (requests/s, p50/p99, ratios, Redis commands per request,
# CPU per request, Redis memory per record) with the machine it ran on.
#
# Options are passed on to the bench: scripts/bench.sh --help. `scripts/bench.sh --postgres` runs
# the Postgres rows instead (PostgresStore, the transactional mode, their hand-written floors,
# statements per request from pg_stat_statements); `--preload` adds 10^6 live and 10^6 expired
# records and the sweep's rate.
# Run it on an otherwise idle machine: every row shares the same cores with wrk and Redis.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
{ command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; } || missing+=(redis-server)
# The Postgres rows (--postgres) start their own server: Debian and Ubuntu put initdb and postgres
# in /usr/lib/postgresql/<version>/bin, off PATH (the testkit looks there too).
pg_bin_dir() {
  if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return; fi
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true
}
if [ -z "$(pg_bin_dir)" ] || [ ! -x "$(pg_bin_dir)/initdb" ]; then missing+=(postgresql); fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing ${missing[*]}" >&2
  as_root apt-get update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi

echo "== building idem-bench (release)" >&2
cargo build --release --locked -p idem-bench >&2

load="$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo 0)"
echo "== running (1-minute load average before: $load; other work on the machine skews the figures)" >&2
exec cargo run --quiet --release --locked -p idem-bench -- "$@"
