//! MariaDB (and, for the parts that say so, MySQL): the binary log read
//! over the replication protocol as the source, and a target that applies
//! batches with `INSERT … ON DUPLICATE KEY UPDATE`.
//!
//! - [`settings`]: the `[database]` keys (a `mysql://` URL, the outbox,
//!   the replica server id).
//! - [`conn`]: connections (mysql_async), quoting, what the servers' error
//!   numbers mean; shared by the source and the sink.
//! - [`binlog`]: the binlog stream turned into outbox rows at transaction
//!   boundaries; [`source`]: where a stream starts, `init`, `check`.
//! - [`position`]: `mariadb:<gtid state>@<file>:<offset>#<index>`.
//! - [`target`]: the sink's dialect; [`status`]: what `sitesync status`
//!   reads.

pub mod archive;
pub mod audit;
pub mod binlog;
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

pub use source::MariaDbSource;
pub use target::MariaDbTarget;

use crate::config::{ConnectorConfig, Reader};
use crate::error::{SourceError, TargetError};
use crate::status::SiteStatus;

/// The MariaDB engine.
pub struct MariaDb;

impl super::Driver for MariaDb {
    const NAME: &'static str = "mariadb";
    const ALIASES: &'static [&'static str] = &["mysql"];

    type Settings = settings::Settings;
    type Source = MariaDbSource;
    type Target = MariaDbTarget;
    type Capture = capture::MariaDbCapture;
    type Archive = archive::MariaDbArchive;
    type Jobs = jobs::MariaDbJobs;
    type Audit = audit::MariaDbAudit;
    type Purge = purge::MariaDbPurge;
    type Resync = resync::MariaDbResync;

    fn settings(d: &mut Reader<'_>, connector: &str) -> settings::Settings {
        settings::Settings::read(d, connector)
    }

    fn source(
        cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<MariaDbSource, SourceError> {
        MariaDbSource::new(cfg, db)
    }

    fn resync(
        cfg: &ConnectorConfig,
        db: &Self::Settings,
    ) -> Result<resync::MariaDbResync, TargetError> {
        resync::MariaDbResync::new(cfg, db)
    }

    fn capture(
        cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<capture::MariaDbCapture, TargetError> {
        capture::MariaDbCapture::new(cfg, db)
    }

    fn target(
        cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<MariaDbTarget, TargetError> {
        MariaDbTarget::new(cfg, db)
    }

    fn archive(
        cfg: &ConnectorConfig,
        db: &settings::Settings,
        archive: &crate::config::ArchiveConfig,
    ) -> Result<archive::MariaDbArchive, TargetError> {
        archive::MariaDbArchive::new(cfg, db, archive)
    }

    fn jobs(
        _cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<jobs::MariaDbJobs, TargetError> {
        jobs::MariaDbJobs::new(db)
    }

    fn audit(
        _cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<audit::MariaDbAudit, TargetError> {
        audit::MariaDbAudit::new(db)
    }

    fn purge(
        cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<purge::MariaDbPurge, TargetError> {
        purge::MariaDbPurge::new(cfg, db)
    }

    async fn status(
        cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<SiteStatus, SourceError> {
        status::read(cfg, db).await
    }
}
