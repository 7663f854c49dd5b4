//! What `sitesync status` reads from a PostgreSQL site.

use super::settings::Settings;
use crate::error::{Cause, SourceError};
use crate::status::{GapRecord, OriginProgress, SiteStatus};

fn query(context: &str) -> impl Fn(tokio_postgres::Error) -> SourceError + '_ {
    move |e| SourceError::transient(Cause::Query, format!("{context}: {e}"))
}

/// Reads the status of a PostgreSQL site.
pub async fn read(
    db: &Settings,
    client: &tokio_postgres::Client,
) -> Result<SiteStatus, SourceError> {
    let mut status = SiteStatus::default();
    let ready: bool = client
        .query_one("SELECT to_regclass('sitesync_origins') IS NOT NULL", &[])
        .await
        .map_err(query("looking for the sink tables"))?
        .get(0);
    if !ready {
        return Err(SourceError::operator(
            Cause::NotInitialised,
            "the sink tables do not exist: run `sitesync init`",
        ));
    }
    for row in client
        .query(
            "SELECT origin, epoch, seq, updated_at FROM sitesync_origins ORDER BY origin",
            &[],
        )
        .await
        .map_err(query("reading sitesync_origins"))?
    {
        status.origins.push(OriginProgress {
            origin: row.get(0),
            epoch: row.get(1),
            seq: row.get(2),
            at: row.get(3),
        });
    }
    for row in client
        .query(
            "SELECT origin, epoch, from_seq, to_seq, detected_at, note FROM sitesync_gaps ORDER BY detected_at, id",
            &[],
        )
        .await
        .map_err(query("reading sitesync_gaps"))?
    {
        status.gaps.push(GapRecord {
            origin: row.get(0),
            epoch: row.get(1),
            from_seq: row.get(2),
            to_seq: row.get(3),
            at: row.get(4),
            note: row.get(5),
        });
    }
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM sitesync_conflicts), \
                    (SELECT count(*) FROM sitesync_inbox WHERE outcome = 'dead_letter')",
            &[],
        )
        .await
        .map_err(query("counting conflicts and dead letters"))?;
    status.conflicts = row.get(0);
    status.dead_lettered_here = row.get(1);
    let (schema, table) = db.outbox_parts();
    status.outbox_backlog = client
        .query_one(
            &format!("SELECT count(*) FROM \"{schema}\".\"{table}\""),
            &[],
        )
        .await
        .map_err(query("counting the outbox"))?
        .get(0);
    let lag: Option<i64> = client
        .query_opt(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.slot],
        )
        .await
        .map_err(query("reading the slot"))?
        .and_then(|r| r.get(0));
    status.source_lag_bytes = lag;
    status.source_lag = match lag {
        Some(bytes) => format!("slot {bytes} bytes of WAL behind the server"),
        None => format!("slot {} does not exist", db.slot),
    };
    Ok(status)
}
