//! The errors a database engine hands to the runner and the sink.
//!
//! Each says what it asks of the sidecar ([`ErrorKind`]: retry, or stop for
//! a person) and what went wrong ([`Cause`]: something an operator can
//! match on and a metric can count); its message names the details and,
//! for an operator error, what to do.

use std::fmt;

/// What an error asks of the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The database went away, restarted, or something is busy: reconnect
    /// with backoff and resume from the checkpoint.
    Transient,
    /// Needs a person (a slot missing, the log purged, a grant missing):
    /// stop and say what to do.
    Operator,
}

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    /// The server cannot be reached, or the connection dropped.
    Unreachable,
    /// Credentials or TLS refused.
    AuthRefused,
    /// The login lacks a privilege.
    PermissionDenied,
    /// Something `sitesync init` creates is missing: the slot, the
    /// publication, the outbox, Change Tracking, the sink's tables.
    NotInitialised,
    /// The change log no longer holds the position to resume from (WAL
    /// removed, Change Tracking retention passed, an archived log gone).
    LogPurged,
    /// A server setting that streaming needs is off (`wal_level`,
    /// supplemental logging, snapshot isolation, ARCHIVELOG).
    ServerSettings,
    /// Someone else holds what is needed (the slot in use, a lock).
    Busy,
    /// The connector file names something unusable (a URL, a table, a
    /// position of another engine).
    Config,
    /// The database's client library is missing (Oracle Instant Client).
    ClientLibrary,
    /// A limit was reached (memory held for open transactions).
    Limit,
    /// The server refused a statement, or answered what cannot be read.
    Query,
}

impl Cause {
    /// A short name, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Unreachable => "unreachable",
            Cause::AuthRefused => "auth_refused",
            Cause::PermissionDenied => "permission_denied",
            Cause::NotInitialised => "not_initialised",
            Cause::LogPurged => "log_purged",
            Cause::ServerSettings => "server_settings",
            Cause::Busy => "busy",
            Cause::Config => "config",
            Cause::ClientLibrary => "client_library",
            Cause::Limit => "limit",
            Cause::Query => "query",
        }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The constructors and accessors both error types share.
macro_rules! kinded_error {
    ($name:ident) => {
        impl $name {
            /// Worth retrying: reconnect with backoff.
            pub fn transient(cause: Cause, message: impl Into<String>) -> Self {
                $name::Transient {
                    cause,
                    message: message.into(),
                }
            }

            /// Needs a person: the message says what to do.
            pub fn operator(cause: Cause, message: impl Into<String>) -> Self {
                $name::Operator {
                    cause,
                    message: message.into(),
                }
            }

            /// An error of `kind`.
            pub fn new(kind: ErrorKind, cause: Cause, message: impl Into<String>) -> Self {
                match kind {
                    ErrorKind::Transient => $name::transient(cause, message),
                    ErrorKind::Operator => $name::operator(cause, message),
                }
            }

            pub fn kind(&self) -> ErrorKind {
                match self {
                    $name::Transient { .. } => ErrorKind::Transient,
                    $name::Operator { .. } => ErrorKind::Operator,
                }
            }

            pub fn cause(&self) -> Cause {
                match self {
                    $name::Transient { cause, .. } | $name::Operator { cause, .. } => *cause,
                }
            }

            pub fn message(&self) -> &str {
                match self {
                    $name::Transient { message, .. } | $name::Operator { message, .. } => message,
                }
            }

            /// The same error, its message prefixed with what was being done.
            pub fn context(self, what: &str) -> Self {
                let message = format!("{what}: {}", self.message());
                $name::new(self.kind(), self.cause(), message)
            }
        }
    };
}

/// Why reading a database's change log (or preparing it) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// Retried: the runner starts a new session from the checkpoint.
    #[error("{message}")]
    Transient { cause: Cause, message: String },
    /// Stops the run.
    #[error("{message}")]
    Operator { cause: Cause, message: String },
}

kinded_error!(SourceError);

/// Why applying a batch to this site's database failed as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Retried: the sink backs off, acking nothing.
    #[error("{message}")]
    Transient { cause: Cause, message: String },
    /// Stops the sink.
    #[error("{message}")]
    Operator { cause: Cause, message: String },
}

kinded_error!(TargetError);

/// An engine's connection errors serve its source and its sink alike.
impl From<SourceError> for TargetError {
    fn from(e: SourceError) -> Self {
        match e {
            SourceError::Transient { cause, message } => TargetError::Transient { cause, message },
            SourceError::Operator { cause, message } => TargetError::Operator { cause, message },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_carries_its_kind_cause_and_message() {
        let e = SourceError::operator(Cause::NotInitialised, "slot `x` does not exist");
        assert_eq!(e.kind(), ErrorKind::Operator);
        assert_eq!(e.cause(), Cause::NotInitialised);
        assert_eq!(e.to_string(), "slot `x` does not exist");
        let t: TargetError = e.context("reading the slot").into();
        assert_eq!(t.kind(), ErrorKind::Operator);
        assert_eq!(t.cause(), Cause::NotInitialised);
        assert_eq!(t.message(), "reading the slot: slot `x` does not exist");
        let r = TargetError::new(ErrorKind::Transient, Cause::Busy, "locked");
        assert_eq!(r, TargetError::transient(Cause::Busy, "locked"));
        assert_eq!(Cause::LogPurged.to_string(), "log_purged");
    }
}
