//! Oracle source: LogMiner over SCN windows.

pub mod redo;
