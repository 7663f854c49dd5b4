//! Connections to MariaDB and MySQL (a mysql_async pool), identifier
//! quoting, and what the servers' errors mean: for the sink, per batch
//! ([`Fault`]); for everyone, transient or operator ([`classify`]).
//!
//! # Error numbers, and why each goes where it does
//!
//! | numbers | [`Fault`] | why |
//! |---|---|---|
//! | 1213 deadlock | `Busy` | InnoDB rolled the whole transaction back (its savepoints with it): the batch is redone from the start, which [`crate::sink::batch`] does for `Busy` whatever the mode |
//! | 1205 lock wait timeout | `Busy` | an application holds a row; only the statement is undone (the whole transaction with `innodb_rollback_on_timeout`): the batch is redone either way |
//! | 1062 duplicate key, 1452/1451 foreign key, 1048 null, 1263 null in a multi-row insert, 1264/1690 out of range, 1265/1406 truncated, 1292 bad datetime, 1365 division by zero, 1366 incorrect value, 1411 bad value for a function, 1367 illegal value, 4025/3819 check constraint, 3140 invalid JSON (MySQL), 4038 JSON syntax (MariaDB) | `Data` | a value of one message: InnoDB undoes the statement only, the transaction (and the savepoint before the message) stays |
//! | 1054 unknown column | `Data` | the event carries a field the table does not have: its own column set, its own statement, its own message (a column missing from the sink's own tables is an operator error, see the target) |
//! | 1146 no such table | `Data` | a route's table is missing: its messages fail (and end in the dead-letter queue, to be requeued once the table exists) while other routes flow; a missing sink table is an operator error, see the target |
//! | 1644 a trigger's `SIGNAL SQLSTATE '45000'` (and any SQLSTATE 45xxx) | `Data` | the application refused this row; the statement is undone with the trigger's work |
//! | 1305 savepoint does not exist | (the target: `Gone`) | only after an error that ended the transaction |
//! | everything else | `Batch` | [`classify`]: the connection, the server, a grant |
//!
//! Transient ([`classify`]): the connection (I/O, the driver, 1053 server
//! shutdown, 1927 connection killed, 4031 MySQL's idle disconnect, 1040
//! and 1203 too many connections), the lock manager (1206 lock table full,
//! 1637 too many transactions) and busy errors. Operator: 1045 login
//! refused (the password), 1044/1142/1143/1227 a grant missing (the
//! message says which `GRANT` to run), 1049 unknown database, 1290/1836 a
//! read-only server, TLS.

use super::settings::Settings;
use crate::config::redact_url;
use crate::error::{Cause, SourceError};
use mysql_async::{Error, Opts, OptsBuilder, Pool};

/// The connection options of a connector's `[database]`.
pub fn opts(db: &Settings) -> Result<Opts, SourceError> {
    let opts = Opts::from_url(&db.url).map_err(|e| {
        SourceError::operator(
            Cause::Config,
            format!("database.url `{}`: {e}", redact_url(&db.url)),
        )
    })?;
    // The sink's statements vary with the batch (rows per statement,
    // columns per route): room for more of them than the default 32.
    Ok(OptsBuilder::from_opts(opts).stmt_cache_size(256).into())
}

/// A pool of connections to the connector's database.
pub fn pool(db: &Settings) -> Result<Pool, SourceError> {
    Ok(Pool::new(opts(db)?))
}

/// Who the connector logs in as, for the `GRANT` statements its errors
/// suggest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub user: String,
    pub database: String,
}

impl Account {
    pub fn of(opts: &Opts) -> Account {
        Account {
            user: opts.user().unwrap_or("").to_string(),
            database: opts.db_name().unwrap_or("").to_string(),
        }
    }

    /// `GRANT <privileges> ON `db`.* TO 'user'@'<its host>'`.
    pub fn grant(&self, privileges: &str) -> String {
        format!(
            "GRANT {privileges} ON {}.* TO {}@'<its host>'",
            quote(&self.database),
            literal(&self.user)
        )
    }
}

/// Quotes one identifier as `` `name` `` (a backtick doubled).
pub fn quote(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// Quotes `[database.]name` as `` `database`.`name` ``.
pub fn quote_table(name: &str) -> String {
    name.split('.').map(quote).collect::<Vec<_>>().join(".")
}

/// A string literal (`'` doubled, `\` doubled), for the few statements
/// that take no parameters (DDL). Doubling the backslash is right in the
/// default SQL mode; under `NO_BACKSLASH_ESCAPES` it would double it in
/// the value, so this is only for text without backslashes (site names).
pub fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

/// The server's error number, when the server raised the error.
pub fn code(e: &Error) -> Option<u16> {
    match e {
        Error::Server(s) => Some(s.code),
        _ => None,
    }
}

/// What a failed statement of a batch means for the batch (see the module
/// doc for each number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// An application holds a row, or a deadlock: the batch again.
    Busy,
    /// One message's data: that message fails alone.
    Data,
    /// The batch as a whole: [`classify`].
    Batch,
}

/// Numbers of errors that belong to one message's data.
pub const DATA_ERRORS: &[u16] = &[
    1048, // column cannot be null
    1054, // unknown column
    1062, // duplicate entry for a unique key
    1146, // table does not exist
    1263, // NULL supplied to a NOT NULL column (multi-row INSERT)
    1264, // out of range
    1265, // data truncated
    1292, // incorrect / truncated datetime value
    1365, // division by 0
    1366, // incorrect value for a column
    1367, // illegal value
    1406, // data too long
    1411, // incorrect value for a function (STR_TO_DATE…)
    1451, // a foreign key's child rows exist (delete / update of a parent)
    1452, // a foreign key's parent row is missing
    1644, // a trigger's SIGNAL (SQLSTATE 45000)
    1690, // BIGINT value out of range
    3140, // invalid JSON text (MySQL's JSON type)
    3819, // check constraint violated (MySQL)
    4025, // check constraint violated (MariaDB; JSON_VALID included)
    4038, // syntax error in JSON text (MariaDB)
];

/// What a server error of a batch statement means for the batch.
pub fn fault(e: &Error) -> Fault {
    match e {
        Error::Server(s) if s.code == 1213 || s.code == 1205 => Fault::Busy,
        Error::Server(s) if DATA_ERRORS.contains(&s.code) || s.state.starts_with("45") => {
            Fault::Data
        }
        _ => Fault::Batch,
    }
}

/// Server error numbers worth retrying (the server, the network or the
/// lock manager, not our SQL).
const TRANSIENT: &[u16] = &[
    1040, // too many connections
    1053, // server shutdown in progress
    1203, // max_user_connections
    1205, // lock wait timeout
    1206, // lock table full
    1213, // deadlock
    1637, // too many active concurrent transactions
    1927, // connection killed (MariaDB)
    4031, // disconnected by the server for inactivity (MySQL 8.0.24+)
];

/// The text of an error: the server's number, SQLSTATE and message, or
/// the client's.
pub fn describe(e: &Error) -> String {
    match e {
        Error::Server(s) => format!("{} (error {}, SQLSTATE {})", s.message, s.code, s.state),
        other => other.to_string(),
    }
}

/// Whether an error is worth retrying, with what to do when it is not.
pub fn classify(context: &str, account: &Account, e: &Error) -> SourceError {
    let text = format!("{context}: {}", describe(e));
    match e {
        Error::Server(s) => {
            let cause = cause_of(s.code);
            if TRANSIENT.contains(&s.code) {
                SourceError::transient(cause, text)
            } else if let Some(fix) = operator_fix(s.code, account) {
                SourceError::operator(cause, format!("{text}: {fix}"))
            } else {
                SourceError::operator(cause, text)
            }
        }
        Error::Io(mysql_async::IoError::Tls(_)) => SourceError::operator(
            Cause::AuthRefused,
            format!("{text}: check the TLS settings of database.url"),
        ),
        Error::Io(_) | Error::Driver(_) => SourceError::transient(Cause::Unreachable, text),
        Error::Url(_) => SourceError::operator(Cause::Config, text),
        Error::Other(_) => SourceError::transient(Cause::Query, text),
    }
}

/// What the operator does about an error number.
fn operator_fix(code: u16, account: &Account) -> Option<String> {
    Some(match code {
        1045 => "login refused: check the user and the password in database.url".into(),
        1044 | 1142 | 1143 => format!(
            "permission denied: {} (`sitesync check` lists what is missing)",
            account.grant("SELECT, INSERT, UPDATE, DELETE, CREATE, INDEX")
        ),
        1227 => format!(
            "permission denied: the statement needs a global privilege; {}",
            account
                .grant("REPLICATION SLAVE, REPLICATION CLIENT")
                .replace(&format!("{}.*", quote(&account.database)), "*.*")
        ),
        1049 => "the database of database.url does not exist: create it, or fix the URL".into(),
        1290 | 1836 => {
            "the server is read-only (read_only / super_read_only): point database.url at the primary".into()
        }
        _ => return None,
    })
}

/// What a server error number says went wrong.
fn cause_of(code: u16) -> Cause {
    match code {
        1045 => Cause::AuthRefused,
        1044 | 1142 | 1143 | 1227 => Cause::PermissionDenied,
        1146 => Cause::NotInitialised,
        1049 => Cause::Config,
        1290 | 1836 => Cause::ServerSettings,
        1205 | 1213 => Cause::Busy,
        1206 | 1637 | 1040 | 1203 => Cause::Limit,
        1053 | 1927 | 4031 => Cause::Unreachable,
        _ => Cause::Query,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use mysql_async::{DriverError, ServerError};

    fn server(code: u16, state: &str) -> Error {
        Error::Server(ServerError {
            code,
            message: format!("error {code}"),
            state: state.into(),
        })
    }

    fn account() -> Account {
        Account {
            user: "sitesync".into(),
            database: "shop".into(),
        }
    }

    #[test]
    fn identifiers_are_backticked_and_escaped() {
        assert_eq!(quote("outbox"), "`outbox`");
        assert_eq!(quote("we`ird"), "`we``ird`");
        assert_eq!(quote_table("shop.outbox"), "`shop`.`outbox`");
        assert_eq!(quote_table("outbox"), "`outbox`");
        assert_eq!(literal("O'Brien"), "'O''Brien'");
    }

    #[test]
    fn each_number_goes_to_its_fault() {
        assert_eq!(fault(&server(1213, "40001")), Fault::Busy);
        assert_eq!(fault(&server(1205, "HY000")), Fault::Busy);
        for n in DATA_ERRORS {
            assert_eq!(fault(&server(*n, "HY000")), Fault::Data, "{n}");
        }
        // Any SIGNAL of class 45, whatever number the application chose.
        assert_eq!(fault(&server(1001, "45123")), Fault::Data);
        for n in [1045, 1044, 1142, 1053, 1927, 1064, 1305] {
            assert_eq!(fault(&server(n, "HY000")), Fault::Batch, "{n}");
        }
        let closed = Error::Driver(DriverError::ConnectionClosed);
        assert_eq!(fault(&closed), Fault::Batch);
    }

    #[test]
    fn connection_losses_are_transient_and_grants_need_a_person() {
        let a = account();
        let closed = Error::Driver(DriverError::ConnectionClosed);
        let e = classify("writing the inbox", &a, &closed);
        assert_eq!(
            (e.kind(), e.cause()),
            (ErrorKind::Transient, Cause::Unreachable)
        );
        assert!(
            e.message().starts_with("writing the inbox: "),
            "{}",
            e.message()
        );
        let io = Error::Io(mysql_async::IoError::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert_eq!(classify("x", &a, &io).kind(), ErrorKind::Transient);
        for n in [1053, 1927, 4031, 1040, 1213, 1205] {
            assert_eq!(
                classify("x", &a, &server(n, "HY000")).kind(),
                ErrorKind::Transient,
                "{n}"
            );
        }

        let e = classify("connecting", &a, &server(1045, "28000"));
        assert_eq!(
            (e.kind(), e.cause()),
            (ErrorKind::Operator, Cause::AuthRefused)
        );
        assert!(
            e.message().contains("password in database.url"),
            "{}",
            e.message()
        );
        for n in [1044, 1142, 1143] {
            let e = classify("writing", &a, &server(n, "42000"));
            assert_eq!(
                (e.kind(), e.cause()),
                (ErrorKind::Operator, Cause::PermissionDenied)
            );
            assert!(
                e.message().contains(
                    "GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, INDEX ON `shop`.* TO 'sitesync'@'<its host>'"
                ),
                "{}",
                e.message()
            );
        }
        let e = classify("reading the binlog", &a, &server(1227, "42000"));
        assert!(
            e.message()
                .contains("GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO 'sitesync'"),
            "{}",
            e.message()
        );
        let e = classify("x", &a, &server(1290, "HY000"));
        assert_eq!(e.cause(), Cause::ServerSettings);
        assert!(e.message().contains("read-only"), "{}", e.message());
    }
}
