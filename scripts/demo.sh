#!/usr/bin/env bash
# The README's first command: installs or starts what the demo needs
# (scripts/setup.sh), builds sitesync in release mode and runs
# `sitesync demo` with the arguments given (e.g. --engines postgres,mariadb,postgres).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ " $* " == *mariadb* ]]; then
  ./scripts/setup.sh mariadb
else
  ./scripts/setup.sh demo
fi
exec cargo run --locked --release -- demo "$@"
