//! MariaDB and MySQL sites, read from the binary log over the replication
//! protocol (issue 18). Not in the `engines!` list yet: so far there are
//! its positions ([`position`]) and the binlog reader ([`binlog`]).

pub mod binlog;
pub mod position;
