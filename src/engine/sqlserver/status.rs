//! What `sitesync status` reads from a SQL Server site.

use super::conn::{self, MssqlClient, quote};
use super::settings::Settings;
use super::types::cell_text;
use crate::config::ConnectorConfig;
use crate::error::{Cause, SourceError};
use crate::status::SiteStatus;

/// Every row of `sql`, each column as text.
async fn texts(
    client: &mut MssqlClient,
    sql: &str,
    context: &str,
) -> Result<Vec<Vec<Option<String>>>, SourceError> {
    let rows = client
        .query(sql, &[])
        .await
        .map_err(|e| conn::classify(context, &e))?
        .into_first_result()
        .await
        .map_err(|e| conn::classify(context, &e))?;
    rows.iter()
        .map(|r| r.cells().map(|(_, c)| cell_text(c)).collect())
        .collect::<Result<Vec<_>, String>>()
        .map_err(|e| SourceError::transient(Cause::Query, format!("{context}: {e}")))
}

/// Reads the status of a SQL Server site.
pub async fn read(cfg: &ConnectorConfig, db: &Settings) -> Result<SiteStatus, SourceError> {
    let mut client = conn::connect(db, &format!("sitesync-{}-status", cfg.name)).await?;
    let ready = texts(
        &mut client,
        "SELECT CASE WHEN OBJECT_ID(N'dbo.sitesync_origins', N'U') IS NULL THEN 0 ELSE 1 END",
        "looking for the sink tables",
    )
    .await?;
    if ready.first().and_then(|r| r[0].as_deref()) != Some("1") {
        return Err(SourceError::operator(
            Cause::NotInitialised,
            "the sink tables do not exist: run `sitesync init`",
        ));
    }
    let origins = texts(
        &mut client,
        "SELECT origin, epoch, seq, CONVERT(nvarchar(33), updated_at, 126) FROM dbo.sitesync_origins ORDER BY origin",
        "reading sitesync_origins",
    )
    .await?;
    let gaps = texts(
        &mut client,
        "SELECT origin, epoch, from_seq, to_seq, CONVERT(nvarchar(33), detected_at, 126), note FROM dbo.sitesync_gaps ORDER BY detected_at, id",
        "reading sitesync_gaps",
    )
    .await?;
    let (schema, table) = db.outbox_parts();
    let counts = texts(
        &mut client,
        &format!(
            "SELECT (SELECT COUNT_BIG(*) FROM dbo.sitesync_conflicts), \
                    (SELECT COUNT_BIG(*) FROM dbo.sitesync_inbox WHERE outcome = N'dead_letter'), \
                    (SELECT COUNT_BIG(*) FROM {}.{})",
            quote(schema),
            quote(table)
        ),
        "counting conflicts, dead letters and the outbox",
    )
    .await?;
    let mut status = SiteStatus::from_text(
        &origins,
        &gaps,
        counts.first().map(Vec::as_slice).unwrap_or_default(),
        ("sitesync_origins", "sitesync_gaps"),
    )?;
    let version = texts(
        &mut client,
        "SELECT CHANGE_TRACKING_CURRENT_VERSION()",
        "reading the Change Tracking version",
    )
    .await?;
    status.source_lag = match version.first().and_then(|r| r[0].clone()) {
        Some(v) => format!(
            "Change Tracking at version {v} (the checkpoint's version: `sitesync checkpoint show`)"
        ),
        None => "Change Tracking is off on the database".to_string(),
    };
    Ok(status)
}
