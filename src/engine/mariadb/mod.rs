//! MariaDB and MySQL sites, read from the binary log over the replication
//! protocol (issue 18). Not in the `engines!` list yet: so far there are
//! its positions ([`position`]), the binlog reader ([`binlog`]), its
//! `[database]` keys ([`settings`]) and its connections ([`conn`]).

pub mod binlog;
pub mod conn;
pub mod position;
pub mod settings;
pub mod target;
