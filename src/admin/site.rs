//! [`Site`] for one engine: what the API reads and changes in this site's
//! database, through the engine's [`Driver`].

use super::Site;
use crate::config::ConnectorConfig;
use crate::engine::Driver;
use crate::error::TargetError;
use crate::jobs::JobLog;
use crate::purge::Tables;
use futures_util::future::BoxFuture;
use serde_json::Value;

/// The engine `D`'s side of the admin API.
pub struct EngineSite<D: Driver> {
    cfg: ConnectorConfig,
    db: D::Settings,
    jobs: D::Jobs,
    purge: D::Purge,
}

impl<D: Driver> EngineSite<D> {
    pub fn new(cfg: &ConnectorConfig, db: &D::Settings) -> Result<EngineSite<D>, TargetError> {
        Ok(EngineSite {
            cfg: cfg.clone(),
            db: db.clone(),
            jobs: D::jobs(cfg, db)?,
            purge: D::purge(cfg, db)?,
        })
    }
}

impl<D: Driver> Site for EngineSite<D> {
    fn status(&self) -> BoxFuture<'_, Result<Value, String>> {
        Box::pin(async move {
            let s = D::status(&self.cfg, &self.db)
                .await
                .map_err(|e| e.to_string())?;
            Ok(s.to_json())
        })
    }

    fn jobs(&self, limit: usize, kind: Option<String>) -> BoxFuture<'_, Result<Value, String>> {
        Box::pin(async move {
            let rows = self
                .jobs
                .list(limit, kind.as_deref())
                .await
                .map_err(|e| e.to_string())?;
            Ok(crate::jobs::to_json(&rows, chrono::Utc::now()))
        })
    }

    fn review(&self, ids: Vec<i64>) -> BoxFuture<'_, Result<Vec<i64>, String>> {
        Box::pin(async move { self.purge.review(&ids).await.map_err(|e| e.to_string()) })
    }
}
