//! The `[database]` keys of a PostgreSQL connector.

use crate::config::{Reader, redact_url};
use std::time::Duration;

/// Where the database is and what sitesync names in it.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `postgres://user:pass@host:port/db`, after `${VAR}` expansion.
    pub url: String,
    /// The outbox table, optionally schema-qualified (`public.outbox`).
    pub outbox_table: String,
    /// The logical replication slot this connector owns.
    pub slot: String,
    /// The publication on the outbox table.
    pub publication: String,
    /// How long a replication session may wait for the server before the
    /// sidecar reconnects (it also bounds how late a keepalive reply is).
    pub status_interval: Duration,
}

impl Settings {
    /// Reads the keys; the problems go to `d`. The slot and the
    /// publication default to `sitesync_<connector>`.
    pub fn read(d: &mut Reader<'_>, connector: &str) -> Settings {
        let url = super::super::read_url(d, "\"postgres://user@host:5432/db\"", validate_url);
        let outbox_table = super::super::read_outbox_table(d, "public.outbox");
        let default_slot = format!("sitesync_{connector}");
        let slot = d
            .string("slot", false, "a replication slot name")
            .unwrap_or_else(|| default_slot.clone());
        d.identifier("slot", &slot, "replication slot name");
        let publication = d
            .string("publication", false, "a publication name")
            .unwrap_or(default_slot);
        d.identifier("publication", &publication, "publication name");
        let status_interval = d.millis("status_interval_ms", 1_000, 3_600_000);
        Settings {
            url,
            outbox_table,
            slot,
            publication,
            status_interval,
        }
    }

    /// `(schema, table)` of the outbox, the schema defaulting to `public`.
    pub fn outbox_parts(&self) -> (&str, &str) {
        match self.outbox_table.split_once('.') {
            Some((s, t)) => (s, t),
            None => ("public", self.outbox_table.as_str()),
        }
    }
}

fn validate_url(url: &str) -> Result<(), String> {
    let cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|e| format!("`{}` is not a PostgreSQL URL: {e}", redact_url(url)))?;
    if cfg.get_hosts().is_empty() {
        return Err(format!("`{}` names no host", redact_url(url)));
    }
    if cfg.get_dbname().is_none() {
        return Err(format!(
            "`{}` names no database (postgres://user@host:5432/DATABASE)",
            redact_url(url)
        ));
    }
    if cfg.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        return Err("sslmode=require is not supported yet: connect over a trusted network or a local socket, or use sslmode=disable".into());
    }
    Ok(())
}
