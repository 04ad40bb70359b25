#!/usr/bin/env bash
# Instructions per request of each profiled row, counted by callgrind (deterministic, so it does not
# need an idle machine, unlike scripts/bench.sh): each row runs N and 2N requests in process, and
# the difference divided by N is what one request costs, start-up cancelled out.
#
#   scripts/profile.sh [--metrics] [N]   (default N=300; installs valgrind and redis-server where
#                                         missing; --metrics installs the Prometheus recorder first)
#
# IDEM_PROFILE_ROWS="plain memory-first" picks rows of idem-profile (default: all five).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ "${#missing[@]}" -gt 0 ]; then
  as_root apt-get update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi

if [ "${1:-}" = "--metrics" ]; then export IDEM_PROFILE_METRICS=1; shift; fi
n="${1:-300}"
# shellcheck disable=SC2206 # the rows are words
ROWS=(${IDEM_PROFILE_ROWS:-plain memory-first memory-replay redis-first redis-replay})
cargo build --release --locked -p idem-bench --bin idem-profile >&2
bin="${CARGO_TARGET_DIR:-target}/release/idem-profile"

dir="$(mktemp -d)"
port=$(( 20000 + RANDOM % 20000 ))
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
  --maxmemory-policy noeviction --dir "$dir" --logfile "$dir/redis.log" >/dev/null
trap 'redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done

# Valgrind cannot run the CPU's SHA extensions (SHA-NI), so sha2 falls back to its software
# SHA-256 under callgrind, about ten times the instructions of the hardware path a real run takes.
# The second column leaves `sha2::sha256::compress256` out.
ir() { # row, requests -> "total sha256"
  valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" "$bin" "$1" "$2" \
    "redis://127.0.0.1:$port" >/dev/null 2>&1
  local total sha clock
  total="$(callgrind_annotate "$dir/cg.out" | sed -n 's/^ *\([0-9,]*\) .*PROGRAM TOTALS.*/\1/p' | tr -d ,)"
  # With --metrics, the recorder's clock (quanta) calibrates itself against the wall clock when it
  # starts, for a number of instructions that differs from run to run: left out, or the N and 2N
  # runs would not cancel out.
  clock="$(callgrind_annotate --inclusive=yes "$dir/cg.out" | sed -n 's/^ *\([0-9,]*\) .*quanta::Clock::new .*/\1/p' | head -1 | tr -d ,)"
  total=$(( total - ${clock:-0} ))
  sha="$(callgrind_annotate "$dir/cg.out" | sed -n 's/^ *\([0-9,]*\) .*sha256::compress256.*/\1/p' | head -1 | tr -d ,)"
  echo "$total ${sha:-0}"
}

printf '| row | instructions per request | without software SHA-256 |\n| --- | --: | --: |\n'
for row in "${ROWS[@]}"; do
  read -r a sa < <(ir "$row" "$n")
  read -r b sb < <(ir "$row" $(( 2 * n )))
  printf '| %s | %s | %s |\n' "$row" $(( (b - a) / n )) $(( (b - sb - a + sa) / n ))
done
