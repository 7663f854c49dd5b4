//! Oracle source: LogMiner over SCN windows.

pub mod redo;
pub mod transactions;
pub mod types;
