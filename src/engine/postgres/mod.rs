//! PostgreSQL: logical replication (pgoutput) as the source, and a target
//! that applies batches with set-based statements.
//!
//! - [`settings`]: the `[database]` keys (url, outbox, slot, publication).
//! - [`source`]: the replication stream, `init`, `check`, the slot's
//!   bounds; [`pgoutput`] decodes the messages it carries.
//! - [`position`]: `postgres:<commit LSN>#<index>`.
//! - [`target`]: the sink's dialect (its tables, set-based statements,
//!   the check that this site's own writes are what the rows hold).
//! - [`status`]: what `sitesync status` reads.

pub mod archive;
pub mod audit;
pub mod capture;
pub mod jobs;
pub mod pgoutput;
pub mod position;
pub mod purge;
pub mod resync;
pub mod settings;
pub mod source;
pub mod status;
pub mod target;

pub use source::PostgresSource;
pub use target::PostgresTarget;

use crate::config::{ConnectorConfig, Reader};
use crate::error::{SourceError, TargetError};
use crate::status::SiteStatus;

/// The PostgreSQL engine.
pub struct Postgres;

impl super::Driver for Postgres {
    const NAME: &'static str = "postgres";
    const ALIASES: &'static [&'static str] = &["postgresql"];

    type Settings = settings::Settings;
    type Source = PostgresSource;
    type Target = PostgresTarget;
    type Capture = capture::PgCapture;
    type Archive = archive::PgArchive;
    type Jobs = jobs::PgJobs;
    type Audit = audit::PgAudit;
    type Purge = purge::PgPurge;
    type Resync = resync::PgResync;

    fn settings(d: &mut Reader<'_>, connector: &str) -> settings::Settings {
        settings::Settings::read(d, connector)
    }

    fn source(
        cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<PostgresSource, SourceError> {
        PostgresSource::new(cfg, db)
    }

    fn capture(
        cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<capture::PgCapture, TargetError> {
        capture::PgCapture::new(cfg, db)
    }

    fn resync(
        cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<resync::PgResync, TargetError> {
        resync::PgResync::new(cfg, db)
    }

    fn target(
        cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<PostgresTarget, TargetError> {
        PostgresTarget::new(cfg, db)
    }

    fn archive(
        cfg: &ConnectorConfig,
        db: &settings::Settings,
        archive: &crate::config::ArchiveConfig,
    ) -> Result<archive::PgArchive, TargetError> {
        archive::PgArchive::new(cfg, db, archive)
    }

    fn jobs(_cfg: &ConnectorConfig, db: &settings::Settings) -> Result<jobs::PgJobs, TargetError> {
        jobs::PgJobs::new(db)
    }

    fn audit(
        _cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<audit::PgAudit, TargetError> {
        audit::PgAudit::new(db)
    }

    fn purge(
        cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<purge::PgPurge, TargetError> {
        purge::PgPurge::new(cfg, db)
    }

    async fn status(
        cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<SiteStatus, SourceError> {
        let client = PostgresSource::new(cfg, db)?.client().await?;
        status::read(db, &client).await
    }
}
