//! MariaDB and MySQL sites, read from the binary log over the replication
//! protocol (issue 18). Not in the `engines!` list yet: so far there are
//! its positions ([`position`]), its `[database]` keys ([`settings`]), its
//! connections ([`conn`]) and its sink dialect ([`target`]).

pub mod conn;
pub mod position;
pub mod settings;
pub mod target;
