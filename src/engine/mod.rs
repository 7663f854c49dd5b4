//! The database engines: each folder holds everything about one engine
//! (its settings, connection, change-log source, sink target and status).

pub mod oracle;
pub mod postgres;
pub mod sqlserver;
