#!/usr/bin/env bash
# Installs and starts what sitesync's demo and tests need, and nothing more:
#
#   scripts/setup.sh demo     PostgreSQL server binaries, RabbitMQ (+ management)
#   scripts/setup.sh mariadb  the above, and the MariaDB server binaries
#   scripts/setup.sh test     the above, and runuser (util-linux)
#
# scripts/demo.sh, scripts/test.sh and .ci/run call it; run it by hand to
# prepare a machine. On Debian or Ubuntu it installs what is missing with
# apt-get (through sudo when not root) and asks for nothing when everything
# is there. Elsewhere it says what to install by hand and stops.
#
# Set SITESYNC_TEST_AMQP_URL to a broker of your own to leave the local
# RabbitMQ alone (it is then neither installed nor started).
set -euo pipefail

want="${1:-test}"
case "$want" in
  demo | mariadb | test) ;;
  *)
    echo "usage: scripts/setup.sh [demo|mariadb|test]" >&2
    exit 2
    ;;
esac

say() { echo "setup: $*"; }

# What is missing, as (Debian package, what it provides) pairs.
missing_pkgs=()
missing_what=()
need() { missing_pkgs+=("$1"); missing_what+=("$2"); }

have_pg() {
  ls -d /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1
}
have_mariadb() {
  command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || command -v mysqld >/dev/null 2>&1
}
own_broker=""
[ -n "${SITESYNC_TEST_AMQP_URL:-}" ] && own_broker=yes

have_pg || need postgresql "the PostgreSQL server binaries (initdb, pg_ctl, postgres)"
if [ -z "$own_broker" ]; then
  command -v rabbitmq-server >/dev/null 2>&1 || need rabbitmq-server "RabbitMQ (rabbitmq-server, rabbitmqctl, rabbitmq-plugins)"
fi
if [ "$want" != demo ]; then
  have_mariadb || need mariadb-server "the MariaDB server binaries (mariadbd, mariadb-install-db)"
fi
if [ "$want" = test ]; then
  command -v runuser >/dev/null 2>&1 || need util-linux "runuser (PostgreSQL refuses to run as root; the tests start it as postgres)"
  command -v chromium >/dev/null 2>&1 || need chromium "Chromium (the dashboard's test drives it headless)"
  command -v chromedriver >/dev/null 2>&1 || need chromium-driver "ChromeDriver (WebDriver for the dashboard's test)"
fi

# Runs a command as root: directly, or through sudo.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    echo "setup: this needs root and sudo is not installed: run as root: $*" >&2
    exit 1
  fi
}

if [ ${#missing_pkgs[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: this is not a Debian or Ubuntu system; install by hand, then run this again:" >&2
    for what in "${missing_what[@]}"; do echo "  - $what" >&2; done
    echo "  (the tests run on PostgreSQL 15, MariaDB 10.11 and RabbitMQ 3.10 or later; put the PostgreSQL" >&2
    echo "   server binaries' directory on PATH if initdb is not found)" >&2
    exit 1
  fi
  say "installing ${missing_pkgs[*]}"
  for what in "${missing_what[@]}"; do say "  for $what"; done
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing_pkgs[@]}"
fi

# promtool (Debian's prometheus package) checks the metrics exposition and
# config/alerts.yml in the tests; without recommends, and its services are
# not started (policy-rc.d refuses them while it installs).
if [ "$want" = test ] && ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  say "installing prometheus (for promtool; its services are not started)"
  policy=/usr/sbin/policy-rc.d
  placed=""
  if [ ! -e "$policy" ]; then
    as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
    placed=yes
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
  [ -n "$placed" ] && as_root rm -f "$policy"
fi

[ -n "$own_broker" ] && exit 0

# The local RabbitMQ node: started if installed but not answering, then its
# management plugin, which sitesync uses to verify bindings
# (broker.management_url) and the tests exercise.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  for _ in $(seq 1 240); do
    port_open "$1" && return 0
    sleep 0.5
  done
  return 1
}

start_rabbitmq() {
  say "starting RabbitMQ"
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    as_root systemctl start rabbitmq-server
  else
    as_root rabbitmq-server -detached
  fi
  wait_port 5672 || {
    echo "setup: RabbitMQ did not start listening on 127.0.0.1:5672 (see /var/log/rabbitmq/)" >&2
    exit 1
  }
}

# Whether the node answers AMQP: the protocol header gets a Connection.Start
# frame (type 1) back. A node can keep its port open and stop answering
# (seen on a machine whose broker had served many earlier runs).
amqp_answers() {
  timeout 10 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5672 && printf "AMQP\x00\x00\x09\x01" >&3 && head -c 1 <&3 | od -An -tx1 | grep -q 01' 2>/dev/null
}

if ! port_open 5672; then
  start_rabbitmq
fi
as_root timeout 120 rabbitmqctl await_startup >/dev/null 2>&1 || true
if ! amqp_answers; then
  say "RabbitMQ listens on 5672 but does not answer AMQP within 10 s: restarting it"
  as_root timeout 30 rabbitmqctl stop >/dev/null 2>&1 || as_root pkill -9 -u rabbitmq beam.smp || true
  for _ in $(seq 1 60); do port_open 5672 || break; sleep 0.5; done
  start_rabbitmq
  as_root timeout 120 rabbitmqctl await_startup >/dev/null 2>&1 || true
  amqp_answers || {
    echo "setup: RabbitMQ does not answer AMQP on 127.0.0.1:5672 after a restart (see /var/log/rabbitmq/)" >&2
    exit 1
  }
fi

if ! port_open 15672; then
  say "enabling the RabbitMQ management plugin"
  as_root rabbitmq-plugins enable rabbitmq_management >/dev/null
  wait_port 15672 || {
    echo "setup: the RabbitMQ management API did not start listening on 127.0.0.1:15672" >&2
    exit 1
  }
fi

# Before the tests: the queues that earlier runs of the tests or the bench
# left on this broker (a run killed before its cleanup; older versions
# that did not delete the archive's request queue). Each is a quorum
# queue, a Raft member the node keeps running: hundreds of them slow it
# down. Only names of the tests' and bench's pattern, without consumers
# (so do not start the tests while another run of them uses this broker).
if [ "$want" = test ] && command -v curl >/dev/null 2>&1; then
  left=$(curl -s -m 20 -u guest:guest 'http://127.0.0.1:15672/api/queues?columns=name,consumers' |
    python3 -c 'import json, re, sys
for q in json.load(sys.stdin):
    if not q.get("consumers") and re.match(r"^(t|bench-)[0-9a-f]{8}[._]", q["name"]):
        print(q["name"])' 2>/dev/null || true)
  if [ -n "$left" ]; then
    say "deleting $(echo "$left" | wc -l) queue(s) earlier test or bench runs left on the broker"
    while read -r q; do
      curl -s -m 20 -o /dev/null -u guest:guest -X DELETE "http://127.0.0.1:15672/api/queues/%2F/$q" || true
    done <<<"$left"
  fi
fi
