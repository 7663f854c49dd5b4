//! Oracle: LogMiner over SCN windows as the source, and a target that
//! applies batches with `MERGE` on a blocking connection.

pub mod conn;
pub mod logs;
pub mod miner;
pub mod redo;
pub mod source;
pub mod target;
pub mod transactions;
pub mod types;

pub use source::OracleSource;
pub use target::OracleTarget;
