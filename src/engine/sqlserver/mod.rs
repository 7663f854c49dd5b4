//! SQL Server: Change Tracking on the outbox as the source, and a target
//! that applies batches with `MERGE … WITH (HOLDLOCK)`.
//!
//! - [`settings`]: the `[database]` keys (an ADO.NET string, TLS, polling).
//! - [`conn`]: connections (tiberius over TCP), quoting, error
//!   classification, shared by the source and the sink.
//! - [`source`]: Change Tracking read by query, `init`, `check`;
//!   [`types`] turns SQL Server values into the outbox's fields.
//! - [`position`]: `sqlserver:<version>#<index>/<last ordinal done>`.
//! - [`target`]: the sink's dialect; [`status`]: what `sitesync status`
//!   reads.
//! - [`resync`]: `sitesync resync`'s snapshot (SNAPSHOT isolation) and
//!   its jobs' rows and locks.

pub mod archive;
pub mod audit;
pub mod capture;
pub mod conn;
pub mod jobs;
pub mod position;
pub mod purge;
pub mod resync;
pub mod settings;
pub mod source;
pub mod status;
pub mod target;
pub mod types;

pub use source::SqlServerSource;
pub use target::SqlServerTarget;

use crate::config::{ConnectorConfig, Reader};
use crate::error::{SourceError, TargetError};
use crate::status::SiteStatus;

/// The SQL Server engine.
pub struct SqlServer;

impl super::Driver for SqlServer {
    const NAME: &'static str = "sqlserver";
    const ALIASES: &'static [&'static str] = &["mssql"];

    type Settings = settings::Settings;
    type Source = SqlServerSource;
    type Target = SqlServerTarget;
    type Capture = capture::MssqlCapture;
    type Archive = archive::SqlServerArchive;
    type Jobs = jobs::SqlServerJobs;
    type Audit = audit::SqlServerAudit;
    type Purge = purge::SqlServerPurge;
    type Resync = resync::SqlServerResync;

    fn settings(d: &mut Reader<'_>, _connector: &str) -> settings::Settings {
        settings::Settings::read(d)
    }

    fn source(
        cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<SqlServerSource, SourceError> {
        SqlServerSource::new(cfg, db)
    }

    fn resync(
        cfg: &ConnectorConfig,
        db: &Self::Settings,
    ) -> Result<resync::SqlServerResync, TargetError> {
        resync::SqlServerResync::new(cfg, db)
    }

    fn capture(
        cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<capture::MssqlCapture, TargetError> {
        capture::MssqlCapture::new(cfg, db)
    }

    fn target(
        cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<SqlServerTarget, TargetError> {
        SqlServerTarget::new(cfg, db)
    }

    fn archive(
        cfg: &ConnectorConfig,
        db: &settings::Settings,
        archive: &crate::config::ArchiveConfig,
    ) -> Result<archive::SqlServerArchive, TargetError> {
        archive::SqlServerArchive::new(cfg, db, archive)
    }

    fn jobs(
        _cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<jobs::SqlServerJobs, TargetError> {
        jobs::SqlServerJobs::new(db)
    }

    fn audit(
        _cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<audit::SqlServerAudit, TargetError> {
        audit::SqlServerAudit::new(db)
    }

    fn purge(
        cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<purge::SqlServerPurge, TargetError> {
        purge::SqlServerPurge::new(cfg, db)
    }

    async fn status(
        cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<SiteStatus, SourceError> {
        status::read(cfg, db).await
    }
}
