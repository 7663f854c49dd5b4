#!/usr/bin/env bash
# One-site quick start: a private PostgreSQL cluster for PARIS, the broker
# topology, a sidecar, sample writes from three concurrent writers, and a
# count of the events published and confirmed. Leaves nothing running.
set -euo pipefail
cd "$(dirname "$0")/.."

pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
if [ -z "$pg_bin" ] || [ ! -x "$pg_bin/initdb" ]; then
  echo "PostgreSQL server binaries not found: apt-get install postgresql" >&2
  exit 1
fi
./scripts/ensure-rabbitmq.sh

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sitesync/target}"
echo "== building sitesync (release)"
cargo build --release --locked --quiet
sitesync="$CARGO_TARGET_DIR/release/sitesync"

work=$(mktemp -d /tmp/sitesync-demo-XXXXXX)
chmod 755 "$work"
as_pg=()
if [ "$(id -u)" = 0 ]; then
  chown postgres "$work"
  as_pg=(runuser -u postgres --)
fi
port=$(( 20000 + RANDOM % 10000 ))
sidecar_pid=""
cleanup() {
  [ -n "$sidecar_pid" ] && kill -TERM "$sidecar_pid" 2>/dev/null && wait "$sidecar_pid" 2>/dev/null || true
  "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== private PostgreSQL cluster on port $port ($work)"
"${as_pg[@]}" "$pg_bin/initdb" -D "$work/data" -A trust -U postgres --no-sync >/dev/null
cat >> "$work/data/postgresql.conf" <<CONF
wal_level = logical
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work'
CONF
"${as_pg[@]}" "$pg_bin/pg_ctl" -D "$work/data" -l "$work/postgres.log" -w start >/dev/null
psql="psql -X -q -h 127.0.0.1 -p $port -U postgres"
$psql -c "CREATE DATABASE paris" postgres

export PARIS_DATABASE_URL="postgres://postgres@127.0.0.1:$port/paris"
export SITESYNC_CHECKPOINTS="$work/checkpoints"
connector=connectors/paris.toml

echo "== sitesync init"
"$sitesync" init --connector "$connector"
echo "== sitesync topology declare"
"$sitesync" topology declare --connector "$connector"
$psql paris -c "CREATE TABLE customer (id int PRIMARY KEY, name text, updated_at timestamptz)"

echo "== sitesync run (log: $work/sidecar.log)"
"$sitesync" run --connector "$connector" >"$work/sidecar.log" 2>&1 &
sidecar_pid=$!

writers=3 txs=20 rows=50
total=$(( writers * txs * rows ))
echo "== $writers writers x $txs transactions x $rows rows: business change + outbox row in one transaction"
for w in $(seq 1 $writers); do
  (
    for t in $(seq 1 $txs); do
      base=$(( (w * 1000 + t) * 100 ))
      $psql paris -c "BEGIN;
        INSERT INTO customer SELECT $base + g, 'customer ' || ($base + g), now() FROM generate_series(1, $rows) g;
        INSERT INTO outbox (type, entity_key, data)
          SELECT 'customer.upsert', ($base + g)::text, jsonb_build_object('id', $base + g, 'name', 'customer ' || ($base + g))
          FROM generate_series(1, $rows) g;
        COMMIT;"
    done
  ) &
done
wait $(jobs -p | grep -v "^$sidecar_pid$") 2>/dev/null || true

echo "== waiting for the broker to confirm all $total events"
confirmed=0
for _ in $(seq 1 600); do
  next=$("$sitesync" checkpoint show --connector "$connector" 2>/dev/null | awk '/^next seq/ {print $3}')
  confirmed=$(( ${next:-1} - 1 ))
  [ "$confirmed" -ge "$total" ] && break
  sleep 0.2
done
"$sitesync" checkpoint show --connector "$connector"
echo
echo "events written: $total, published and confirmed: $confirmed"
echo "each is in SITE_PARIS, SITE_LONDON, SITE_MADRID and SITE_PARIS_HISTO (they grow with each demo run until sinks consume them)"
kill -TERM "$sidecar_pid"
wait "$sidecar_pid" && echo "sidecar drained and exited cleanly"
sidecar_pid=""
[ "$confirmed" -ge "$total" ]
