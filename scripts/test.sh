#!/usr/bin/env bash
# The README's test command: unit tests, then the integration tests against
# real PostgreSQL clusters and MariaDB servers (started privately from the
# installed server binaries) and RabbitMQ (the local node, plus private nodes
# for the broker-restart tests).
set -euo pipefail
cd "$(dirname "$0")/.."

# Installs or starts what is missing (PostgreSQL and MariaDB server
# binaries, RabbitMQ with its management plugin); asks for nothing when
# everything is there.
./scripts/setup.sh test

# Two cores: a few integration tests at a time (each starts its own
# PostgreSQL cluster and a sidecar process).
threads="${SITESYNC_TEST_THREADS:-3}"
cargo build --locked --bins
cargo test --locked -- --test-threads="$threads" "$@"
