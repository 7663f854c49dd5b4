//! What `sitesync status` reads from a MariaDB site.

use super::binlog;
use super::conn::{self, Account, quote_table};
use super::settings::Settings;
use crate::config::ConnectorConfig;
use crate::error::{Cause, SourceError};
use crate::status::SiteStatus;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Row, Value};

/// Every row of `sql`, each column as text (NULL as `None`).
async fn texts(
    c: &mut Conn,
    sql: &str,
    account: &Account,
    context: &str,
) -> Result<Vec<Vec<Option<String>>>, SourceError> {
    let rows: Vec<Row> = c
        .query(sql)
        .await
        .map_err(|e| conn::classify(context, account, &e))?;
    Ok(rows
        .into_iter()
        .map(|r| {
            r.unwrap()
                .into_iter()
                .map(|v| match v {
                    Value::NULL => None,
                    Value::Bytes(b) => Some(String::from_utf8_lossy(&b).into_owned()),
                    other => Some(other.as_sql(true).trim_matches('\'').to_string()),
                })
                .collect()
        })
        .collect())
}

/// Reads the status of a MariaDB site.
pub async fn read(_cfg: &ConnectorConfig, db: &Settings) -> Result<SiteStatus, SourceError> {
    let opts = conn::opts(db)?;
    let account = Account::of(&opts);
    let mut c = Conn::new(opts)
        .await
        .map_err(|e| conn::classify("connecting", &account, &e))?;
    // Times read in UTC, as the sink writes them.
    c.query_drop("SET time_zone = '+00:00'")
        .await
        .map_err(|e| conn::classify("setting the time zone", &account, &e))?;
    let ready = texts(
        &mut c,
        "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'sitesync_origins'",
        &account,
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
        &mut c,
        "SELECT origin, epoch, seq, DATE_FORMAT(updated_at, '%Y-%m-%dT%H:%i:%s.%f') FROM sitesync_origins ORDER BY origin",
        &account,
        "reading sitesync_origins",
    )
    .await?;
    let gaps = texts(
        &mut c,
        "SELECT origin, epoch, from_seq, to_seq, DATE_FORMAT(detected_at, '%Y-%m-%dT%H:%i:%s.%f'), note FROM sitesync_gaps ORDER BY detected_at, id",
        &account,
        "reading sitesync_gaps",
    )
    .await?;
    let counts = texts(
        &mut c,
        &format!(
            "SELECT (SELECT COUNT(*) FROM sitesync_conflicts), \
                    (SELECT COUNT(*) FROM sitesync_inbox WHERE outcome = 'dead_letter'), \
                    (SELECT COUNT(*) FROM {})",
            quote_table(&db.outbox_table)
        ),
        &account,
        "counting conflicts, dead letters and the outbox",
    )
    .await?;
    let mut status = SiteStatus::from_text(
        &origins,
        &gaps,
        counts.first().map(Vec::as_slice).unwrap_or_default(),
        ("sitesync_origins", "sitesync_gaps"),
    )?;
    let latest = binlog::current_position(&mut c).await?;
    status.source_lag =
        format!("binlog at {latest} (the checkpoint's position: `sitesync checkpoint show`)");
    let _ = c.disconnect().await;
    Ok(status)
}
