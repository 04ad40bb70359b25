#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need where it is missing
# (redis-server and redis-cli, and Postgres: the tests start their own servers on free loopback
# ports), then checks formatting and lints and runs every test with every feature.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  echo "== installing redis-server and redis-cli"
  as_root apt-get update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server
fi
redis-server --version

# Debian and Ubuntu put initdb and postgres in /usr/lib/postgresql/<version>/bin, off PATH; the
# testkit looks there too (and runs them as the `postgres` user when the tests run as root).
pg_bin_dir() {
  if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return; fi
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true
}
if [ -z "$(pg_bin_dir)" ] || [ ! -x "$(pg_bin_dir)/initdb" ]; then
  echo "== installing postgresql"
  as_root apt-get update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql
fi
"$(pg_bin_dir)/postgres" --version

# The OpenAPI test (tests/observability.rs) checks the payments example's document against the
# OpenAPI 3.1 schema with Python's openapi-spec-validator (PyPI).
if ! python3 -c 'import openapi_spec_validator' >/dev/null 2>&1; then
  echo "== installing openapi-spec-validator"
  if ! python3 -m pip --version >/dev/null 2>&1; then
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y python3-pip
  fi
  # A distribution's Python refuses a plain install (PEP 668): then install past that marker.
  python3 -m pip install --quiet openapi-spec-validator \
    || python3 -m pip install --quiet --break-system-packages openapi-spec-validator
fi
python3 -c 'import openapi_spec_validator' && echo "openapi-spec-validator: ok"

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy --all-features -D warnings"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

echo "== cargo build --examples"
# The crash test (tests/reliability_crash.rs) runs the `orders` example as a child process and
# SIGKILLs it; tests/observability.rs runs `payments` (built with every feature: `/openapi.json`). `cargo test --all-targets` builds examples only as test harnesses, never the runnable
# binary, and a test must not run cargo itself: build them here.
cargo build --workspace --examples --all-features --locked

log="$(mktemp)"
trap 'rm -f "$log"' EXIT

echo "== cargo test"
cargo test --workspace --all-targets --all-features --locked 2>&1 | tee -a "$log"

echo "== doctests"
cargo test --workspace --doc --all-features --locked 2>&1 | tee -a "$log"

# One closing line for the whole run (every `test result:` line summed), so that the last line says
# what ran rather than whichever crate happened to run last.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
