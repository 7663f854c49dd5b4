//! One sidecar: the source half (change log → broker), the sink half
//! (this site's queue → database) and, at the archiving site, the archive
//! (the archive queue → the archive table) side by side, each on a thread
//! of its own, stopping together; beside them, every `purge_every`, the
//! purge (`crate::purge`), on a thread of its own too, so that its
//! deletes never wait in the sink's runtime, and whose failures are
//! logged and never stop the sidecar.
//!
//! A standby sidecar starts its sink as a second consumer of the site's
//! single-active-consumer queue (the broker hands it the queue when the
//! active consumer goes) and waits on the checkpoint store's lock before
//! its source reads the slot.

use crate::archive::{self, Store};
use crate::config::ConnectorConfig;
use crate::error::TargetError;
use crate::jobs::JobLog;
use crate::purge::{self, Tables};
use crate::runner::{self, RunError, Shutdown};
use crate::sink::{self, Target};
use crate::source::Source;
use std::sync::Arc;

/// Why a sidecar stopped with an error: its source half or its sink half
/// needs a person (or could not start).
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error(transparent)]
    Source(#[from] RunError),
    #[error("sink: {0}")]
    Sink(#[from] TargetError),
    /// The sink's thread or runtime could not start, or it panicked.
    #[error("sink: {0}")]
    SinkThread(String),
    #[error("archive: {0}")]
    Archive(TargetError),
}

/// The scheduled purge of a sidecar: the engine's tables and job log, and
/// how often (`purge_every`).
pub struct Upkeep<P: Tables, J: JobLog> {
    pub tables: P,
    pub jobs: J,
    pub every: std::time::Duration,
}

/// Runs the source and, if given, the sink, the archive and the purge until
/// `shutdown` fires or one of them meets an error that needs a person
/// (then all stop).
pub async fn run<S: Source, T: Target + 'static, A: Store, P: Tables, J: JobLog>(
    cfg: &ConnectorConfig,
    source: S,
    target: Option<T>,
    archive: Option<A>,
    upkeep: Option<Upkeep<P, J>>,
    mut shutdown: Shutdown,
) -> Result<(), SidecarError> {
    let (stop_tx, stop) = Shutdown::new();
    let stop_tx = Arc::new(stop_tx);
    let relay = {
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            shutdown.wait().await;
            let _ = stop_tx.send(true);
            std::future::pending::<()>().await;
        })
    };
    let source_half = async {
        let r = runner::run(cfg, source, stop.clone())
            .await
            .map_err(SidecarError::from);
        if r.is_err() {
            let _ = stop_tx.send(true);
        }
        r
    };
    let sink_half = async {
        let Some(target) = target else { return Ok(()) };
        let (cfg, stop) = (cfg.clone(), stop.clone());
        let r = on_its_own_thread("sink", move || async move {
            sink::run(&cfg, &target, stop)
                .await
                .map_err(SidecarError::from)
        })
        .await;
        if let Err(e) = &r {
            tracing::error!(error = %e, "sink stopping: this needs a person");
            let _ = stop_tx.send(true);
        }
        r
    };
    let archive_half = async {
        let (Some(store), Some(settings)) = (archive, cfg.archive.clone()) else {
            return Ok(());
        };
        let (cfg, stop) = (cfg.clone(), stop.clone());
        let r = on_its_own_thread("archive", move || async move {
            // The archive and the gap requests it serves, side by side.
            // A failure of either stops both (it needs a person).
            let archived = archive::run(&cfg, &settings, &store, stop.clone());
            let served = archive::gapfill::serve(&cfg, &store, stop);
            tokio::pin!(archived, served);
            let r = tokio::select! {
                r = &mut archived => match r {
                    Ok(()) => served.await,
                    e => e,
                },
                r = &mut served => match r {
                    Ok(()) => archived.await,
                    e => e,
                },
            };
            r.map_err(SidecarError::Archive)
        })
        .await;
        if let Err(e) = &r {
            tracing::error!(error = %e, "archive stopping: this needs a person");
            let _ = stop_tx.send(true);
        }
        r
    };
    let purge_half = async {
        let Some(upkeep) = upkeep else { return Ok(()) };
        let (cfg, stop) = (cfg.clone(), stop.clone());
        // Never an error: a failed purge is logged and tried again.
        on_its_own_thread("purge", move || async move {
            let plan = purge::Plan::of(&cfg);
            purge::schedule(
                &cfg.name,
                &plan,
                &upkeep.tables,
                &upkeep.jobs,
                upkeep.every,
                stop,
            )
            .await;
            Ok(())
        })
        .await
    };
    let (source_result, sink_result, archive_result, purge_result) =
        tokio::join!(source_half, sink_half, archive_half, purge_half);
    relay.abort();
    if let Err(e) = purge_result {
        tracing::error!(error = %e, "the scheduled purge could not run");
    }
    source_result.and(sink_result).and(archive_result)
}

/// Runs `work` (the sink, the archive) on a thread of its own, on a
/// single-threaded runtime.
///
/// Each half then keeps its socket work on one thread: a database round
/// trip of the sink does not hop between threads (on a pool of workers
/// each one did, a wake-up each way), and the halves still run side by
/// side, so that a batch being applied does not hold up publishing.
async fn on_its_own_thread<F, W>(name: &'static str, work: W) -> Result<(), SidecarError>
where
    W: FnOnce() -> F + Send + 'static,
    F: std::future::Future<Output = Result<(), SidecarError>>,
{
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("sitesync-{name}"))
        .spawn(move || {
            let r = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(work()),
                Err(e) => Err(SidecarError::SinkThread(format!(
                    "cannot start the {name}'s runtime: {e}"
                ))),
            };
            let _ = done.send(r);
        })
        .map_err(|e| SidecarError::SinkThread(format!("cannot start the {name}'s thread: {e}")))?;
    result.await.unwrap_or_else(|_| {
        Err(SidecarError::SinkThread(format!(
            "the {name}'s thread panicked"
        )))
    })
}
