//! One sidecar: the source half (change log → broker) and the sink half
//! (this site's queue → database) side by side, each on a thread of its
//! own, stopping together.
//!
//! A standby sidecar starts its sink as a second consumer of the site's
//! single-active-consumer queue (the broker hands it the queue when the
//! active consumer goes) and waits on the checkpoint store's lock before
//! its source reads the slot.

use crate::config::ConnectorConfig;
use crate::error::TargetError;
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
}

/// Runs the source and, if given, the sink until `shutdown` fires or one
/// of them meets an error that needs a person (then both stop).
pub async fn run<S: Source, T: Target + 'static>(
    cfg: &ConnectorConfig,
    source: S,
    target: Option<T>,
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
        let r = sink_on_its_own_thread(cfg.clone(), target, stop.clone()).await;
        if let Err(e) = &r {
            tracing::error!(error = %e, "sink stopping: this needs a person");
            let _ = stop_tx.send(true);
        }
        r
    };
    let (source_result, sink_result) = tokio::join!(source_half, sink_half);
    relay.abort();
    source_result.and(sink_result)
}

/// Runs the sink on a thread of its own, on a single-threaded runtime.
///
/// Each half then keeps its socket work on one thread: a database round
/// trip of the sink does not hop between threads (on a pool of workers
/// each one did, a wake-up each way), and the source and the sink still
/// run side by side, so that a batch being applied does not hold up
/// publishing.
async fn sink_on_its_own_thread<T: Target + 'static>(
    cfg: ConnectorConfig,
    target: T,
    stop: Shutdown,
) -> Result<(), SidecarError> {
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("sitesync-sink".into())
        .spawn(move || {
            let r = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt
                    .block_on(sink::run(&cfg, &target, stop))
                    .map_err(SidecarError::from),
                Err(e) => Err(SidecarError::SinkThread(format!(
                    "cannot start the sink's runtime: {e}"
                ))),
            };
            let _ = done.send(r);
        })
        .map_err(|e| SidecarError::SinkThread(format!("cannot start the sink's thread: {e}")))?;
    result.await.unwrap_or_else(|_| {
        Err(SidecarError::SinkThread(
            "the sink's thread panicked".to_string(),
        ))
    })
}
