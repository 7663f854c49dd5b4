//! [`Site`] for one engine: what the API reads and changes in this site's
//! database, through the engine's [`Driver`].

use super::Site;
use crate::audit::AuditLog;
use crate::config::ConnectorConfig;
use crate::engine::Driver;
use crate::error::TargetError;
use crate::jobs::JobLog;
use crate::purge::Tables;
use crate::sink::Target;
use crate::sink::batch::Batches;
use futures_util::future::BoxFuture;
use serde_json::Value;

/// The engine `D`'s side of the admin API.
pub struct EngineSite<D: Driver> {
    cfg: ConnectorConfig,
    db: D::Settings,
    jobs: D::Jobs,
    purge: D::Purge,
    audit: D::Audit,
}

impl<D: Driver> EngineSite<D> {
    pub fn new(cfg: &ConnectorConfig, db: &D::Settings) -> Result<EngineSite<D>, TargetError> {
        Ok(EngineSite {
            cfg: cfg.clone(),
            db: db.clone(),
            jobs: D::jobs(cfg, db)?,
            purge: D::purge(cfg, db)?,
            audit: D::audit(cfg, db)?,
        })
    }
}

impl<D: Driver> EngineSite<D> {
    /// The sink's side of this database (gaps).
    fn target(&self) -> Result<Batches<D::Target>, String> {
        let dialect = D::target(&self.cfg, &self.db).map_err(|e| e.to_string())?;
        Ok(Batches::new(dialect, &self.cfg.site, &self.cfg.sink))
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

    fn job(&self, id: uuid::Uuid) -> BoxFuture<'_, Result<Option<Value>, String>> {
        Box::pin(async move {
            let row = self.jobs.get(id).await.map_err(|e| e.to_string())?;
            let now = chrono::Utc::now();
            Ok(row.map(|r| crate::jobs::to_json(&[r], now)[0].take()))
        })
    }

    fn conflicts(&self, limit: usize) -> BoxFuture<'_, Result<Value, String>> {
        Box::pin(async move {
            let rows = self
                .purge
                .conflicts(limit, None)
                .await
                .map_err(|e| e.to_string())?;
            Ok(crate::conflicts::to_json(&rows))
        })
    }

    fn choose(
        &self,
        id: i64,
        kind: Option<String>,
    ) -> BoxFuture<'_, Result<crate::conflicts::Chosen, crate::conflicts::ChooseError>> {
        Box::pin(async move {
            crate::conflicts::choose(&self.cfg, &self.purge, id, kind.as_deref()).await
        })
    }

    fn review(&self, ids: Vec<i64>) -> BoxFuture<'_, Result<Vec<i64>, String>> {
        Box::pin(async move { self.purge.review(&ids).await.map_err(|e| e.to_string()) })
    }

    fn audit(
        &self,
        who: String,
        action: &'static str,
        arguments: Value,
        result: Result<String, String>,
    ) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            crate::audit::record(
                &self.audit,
                crate::audit::Via::Api,
                &who,
                action,
                arguments,
                result.as_deref().map_err(String::as_str),
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
        })
    }

    fn audit_list(&self, limit: usize) -> BoxFuture<'_, Result<Value, String>> {
        Box::pin(async move {
            let entries = self
                .audit
                .list(limit, None)
                .await
                .map_err(|e| e.to_string())?;
            Ok(crate::audit::to_json(&entries))
        })
    }

    fn gaps(&self) -> BoxFuture<'_, Result<Value, String>> {
        Box::pin(async move {
            let target = self.target()?;
            let open = target.open_gaps().await.map_err(|e| e.to_string())?;
            Ok(crate::sink::gaps::to_json(&open))
        })
    }

    fn fill_gaps(&self) -> BoxFuture<'_, Result<(Value, usize), String>> {
        Box::pin(async move {
            let target = self.target()?;
            let open = target.open_gaps().await.map_err(|e| e.to_string())?;
            let sent = crate::sink::gaps::ask_now(&self.cfg, &target, &open).await?;
            Ok((crate::sink::gaps::to_json(&open), sent))
        })
    }
}
