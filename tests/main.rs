//! Integration tests: real PostgreSQL clusters (private, from the installed
//! server binaries), the machine's RabbitMQ with per-test names, private
//! RabbitMQ nodes for broker restarts, and the `sitesync` binary as a process.

mod flows;
mod support;
