//! SQL Server: Change Tracking on the outbox as the source, and a target
//! that applies batches with `MERGE … WITH (HOLDLOCK)`.

pub mod conn;
pub mod source;
pub mod target;
pub mod types;

pub use source::SqlServerSource;
pub use target::SqlServerTarget;
