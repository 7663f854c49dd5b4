//! PostgreSQL: logical replication (pgoutput) as the source, and a target
//! that applies batches with set-based statements.

pub mod pgoutput;
pub mod source;
pub mod status;
pub mod target;

pub use source::PostgresSource;
pub use target::PostgresTarget;
