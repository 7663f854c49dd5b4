//! MariaDB and MySQL sites, read from the binary log over the replication
//! protocol (issue 18). Not in the `engines!` list yet: so far only its
//! positions exist.

pub mod position;
