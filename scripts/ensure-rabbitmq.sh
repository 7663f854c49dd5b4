#!/usr/bin/env bash
# Starts the local RabbitMQ node if it is installed but not answering, and
# waits until it accepts AMQP connections on 127.0.0.1:5672.
set -euo pipefail
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "RabbitMQ is not installed: apt-get install rabbitmq-server (or set SITESYNC_TEST_AMQP_URL to a broker you run)" >&2
  exit 1
fi
amqp_open() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! amqp_open; then
  echo "starting RabbitMQ (rabbitmq-server -detached)"
  rabbitmq-server -detached
  for _ in $(seq 1 120); do
    amqp_open && break
    sleep 0.5
  done
fi
amqp_open || { echo "RabbitMQ did not start listening on 127.0.0.1:5672" >&2; exit 1; }
rabbitmqctl await_startup >/dev/null 2>&1 || true

# The management plugin: sitesync verifies bindings through its HTTP API
# (broker.management_url), and the tests exercise that.
mgmt_open() { (exec 3<>/dev/tcp/127.0.0.1/15672) 2>/dev/null; }
if ! mgmt_open; then
  echo "enabling the RabbitMQ management plugin"
  rabbitmq-plugins enable rabbitmq_management >/dev/null
  for _ in $(seq 1 120); do
    mgmt_open && break
    sleep 0.5
  done
fi
mgmt_open || { echo "the RabbitMQ management API did not start listening on 127.0.0.1:15672" >&2; exit 1; }
