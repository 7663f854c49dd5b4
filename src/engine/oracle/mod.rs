//! Oracle: LogMiner over SCN windows as the source, and a target that
//! applies batches with `MERGE` on a blocking connection.
//!
//! - [`settings`]: the `[database]` keys (URL, client library, windows).
//! - [`conn`]: connections (the `oracle` crate over ODPI-C), error
//!   classification, quoting, shared by the source and the sink.
//! - [`source`]: the LogMiner stream, `init`, `check`; [`miner`] reads a
//!   window, [`logs`] picks its redo files, [`transactions`] buffers rows
//!   by XID until their commit, [`redo`] parses `SQL_REDO`, [`types`] maps
//!   values to the outbox's fields.
//! - [`position`]: `oracle:<commit SCN>#<index>@<mine_from>`.
//! - [`target`]: the sink's dialect; [`status`]: what `sitesync status`
//!   reads.
//! - [`resync`]: `sitesync resync`'s snapshot (a READ ONLY transaction)
//!   and its jobs' rows and locks.

pub mod archive;
pub mod audit;
pub mod capture;
pub mod conn;
pub mod jobs;
pub mod logs;
pub mod miner;
pub mod position;
pub mod purge;
pub mod redo;
pub mod resync;
pub mod settings;
pub mod source;
pub mod status;
pub mod target;
pub mod transactions;
pub mod types;

pub use source::OracleSource;
pub use target::OracleTarget;

use crate::config::{ConnectorConfig, Reader};
use crate::error::{SourceError, TargetError};
use crate::status::SiteStatus;

/// The Oracle engine.
pub struct Oracle;

impl super::Driver for Oracle {
    const NAME: &'static str = "oracle";

    type Settings = settings::Settings;
    type Source = OracleSource;
    type Target = OracleTarget;
    type Capture = capture::OracleCapture;
    type Archive = archive::OracleArchive;
    type Jobs = jobs::OracleJobs;
    type Audit = audit::OracleAudit;
    type Purge = purge::OraclePurge;
    type Resync = resync::OracleResync;

    fn settings(d: &mut Reader<'_>, _connector: &str) -> settings::Settings {
        settings::Settings::read(d)
    }

    fn source(cfg: &ConnectorConfig, db: &settings::Settings) -> Result<OracleSource, SourceError> {
        OracleSource::new(cfg, db)
    }

    fn resync(
        cfg: &ConnectorConfig,
        db: &Self::Settings,
    ) -> Result<resync::OracleResync, TargetError> {
        resync::OracleResync::new(cfg, db)
    }

    fn capture(
        cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<capture::OracleCapture, TargetError> {
        capture::OracleCapture::new(cfg, db)
    }

    fn target(cfg: &ConnectorConfig, db: &settings::Settings) -> Result<OracleTarget, TargetError> {
        OracleTarget::new(cfg, db)
    }

    fn archive(
        cfg: &ConnectorConfig,
        db: &settings::Settings,
        archive: &crate::config::ArchiveConfig,
    ) -> Result<archive::OracleArchive, TargetError> {
        archive::OracleArchive::new(cfg, db, archive)
    }

    fn jobs(
        _cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<jobs::OracleJobs, TargetError> {
        jobs::OracleJobs::new(db)
    }

    fn audit(
        _cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<audit::OracleAudit, TargetError> {
        audit::OracleAudit::new(db)
    }

    fn purge(
        cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<purge::OraclePurge, TargetError> {
        purge::OraclePurge::new(cfg, db)
    }

    async fn status(
        _cfg: &ConnectorConfig,
        db: &settings::Settings,
    ) -> Result<SiteStatus, SourceError> {
        status::read(db).await
    }
}
