//! Tooling beside the product: `sitesync demo`, `sitesync bench`, the
//! private PostgreSQL clusters they start ([`pg`]), private MariaDB servers
//! ([`mariadb`], the tests' for now) and the helpers those need of the
//! machine ([`host`]: users, free ports, processes, the `/tmp` directories
//! of runs that were killed).
//!
//! Nothing of the product depends on this module: only the command line
//! reaches it, and the integration tests' harness (`tests/support/`) reuses
//! its clusters and helpers rather than repeating them. It may name engines
//! (the demo and the benchmark run PostgreSQL sites).

pub mod bench;
pub mod demo;
pub mod host;
pub mod mariadb;
pub mod pg;

use clap::Args;

/// The broker of `sitesync demo` and `sitesync bench`.
#[derive(Args, Debug, Clone)]
pub struct BrokerArgs {
    /// The RabbitMQ broker the three sites share (the command declares and deletes queues of its own there).
    #[arg(
        long,
        value_name = "URL",
        env = "SITESYNC_BROKER_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub broker: String,
    /// RabbitMQ's management API, to verify bindings as the shipped connectors do (left out, with a note, when it does not answer).
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:15672")]
    pub management_url: String,
    /// Do not use the management API.
    #[arg(long, conflicts_with = "management_url")]
    pub no_management: bool,
}
