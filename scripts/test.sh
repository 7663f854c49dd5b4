#!/usr/bin/env bash
# The whole test suite: unit tests, then the integration tests against real
# PostgreSQL clusters (started privately from the installed server binaries)
# and RabbitMQ (the local node, plus private nodes for broker-restart tests).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! ls -d /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  echo "PostgreSQL server binaries not found: apt-get install postgresql (initdb, pg_ctl, postgres), or add their directory to PATH" >&2
  exit 1
fi
if [ -z "${SITESYNC_TEST_AMQP_URL:-}" ]; then
  ./scripts/ensure-rabbitmq.sh
fi

# Two cores: a few integration tests at a time (each starts its own
# PostgreSQL cluster and a sidecar process).
threads="${SITESYNC_TEST_THREADS:-3}"
cargo build --locked --bins
cargo test --locked -- --test-threads="$threads" "$@"
