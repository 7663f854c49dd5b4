//! Automatic gap fill, the archive's side: the archiving sidecar consumes
//! the queue of gap requests (`<archive queue>_REQUESTS`), one at a time,
//! and answers each by sending the range's events it holds to the asking
//! site's queue (as `sitesync replay` does: the default exchange, in seq
//! order, publisher confirms), then a [`GapReply`] on the same queue,
//! behind them, listing the seqs it does not hold. The request is acked
//! only after the reply is confirmed: a crash in between answers it again
//! (the site applies the events idempotently and marks the same rows).
//!
//! A request that cannot be read, or names a site the topology does not
//! have, goes to the dead-letter queue with the reason.

use super::Store;
use super::replay::{self, Filter};
use crate::bus::publisher::{Publisher, settle};
use crate::config::ConnectorConfig;
use crate::error::{Cause, TargetError};
use crate::runner::Shutdown;
use crate::sink::broker;
use crate::sink::control::{self, GAP_REPLY, GapReply, GapRequest};
use crate::sink::queue::{self, delivered};
use crate::sink::rules;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, QueueDeclareOptions};

/// Serves gap requests until `shutdown`; reconnects after broker failures.
pub async fn serve<S: Store>(
    cfg: &ConnectorConfig,
    store: &S,
    shutdown: Shutdown,
) -> Result<(), TargetError> {
    queue::reconnecting(cfg, "gap fill", &shutdown, |s| session(cfg, store, s)).await
}

/// Reads a request; the error says why it cannot be served.
pub fn read_request(cfg: &ConnectorConfig, body: &[u8]) -> Result<GapRequest, String> {
    let r: GapRequest =
        serde_json::from_slice(body).map_err(|e| format!("not a gap request: {e}"))?;
    if !cfg.topology.sites.contains(&r.site) {
        return Err(format!(
            "a gap request for site `{}`, which {} does not list",
            r.site,
            cfg.topology.file.display()
        ));
    }
    if r.from == 0 || r.from > r.to {
        return Err(format!(
            "a gap request for an empty or invalid range {}..{}",
            r.from, r.to
        ));
    }
    Ok(r)
}

/// The request queue, declared here too (idempotent, as `topology
/// declare` does), so that a deployment whose topology predates gap fill
/// gets it when its archiving sidecar starts.
async fn declare(channel: &lapin::Channel, queue: &str) -> Result<(), TargetError> {
    let args = crate::bus::topology::quorum_args();
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .map(|_| ())
        .map_err(|e| {
            TargetError::operator(
                Cause::Query,
                format!("declaring {queue}: {e} (declared before with other arguments? it must be a durable quorum queue)"),
            )
        })
}

async fn session<S: Store>(
    cfg: &ConnectorConfig,
    store: &S,
    mut shutdown: Shutdown,
) -> Result<(), TargetError> {
    let requests = cfg.topology.gap_request_queue();
    {
        let conn = crate::bus::connect(
            &cfg.broker.urls,
            cfg.broker.connect_timeout,
            &format!("sitesync-{}-gapfill-declare", cfg.name),
        )
        .await?;
        let ch = conn.create_channel().await.map_err(broker)?;
        declare(&ch, &requests).await?;
        let _ = conn.close(200, "declared".into()).await;
    }
    let mut consuming = queue::consume(
        cfg,
        &requests,
        1,
        "gapfill",
        &format!("sitesync-{}-gapfill", cfg.name),
    )
    .await?;
    let dead_letters = Publisher::new(&consuming.conn, &cfg.topology, &cfg.site)
        .await
        .map_err(broker)?;
    let replies = control::confirm_channel(&consuming.conn)
        .await
        .map_err(broker)?;
    tracing::info!(connector = %cfg.name, queue = %requests, "gap fill: serving requests from the archive");
    loop {
        let d = tokio::select! {
            _ = shutdown.wait() => return Ok(()),
            d = consuming.consumer.next() => delivered(d, &requests)?,
        };
        match read_request(cfg, &d.data) {
            Err(reason) => {
                tracing::warn!(message_id = ?d.properties.message_id(), %reason, "gap fill: to the dead-letter queue");
                let confirm = dead_letters
                    .dead_letter_at(&d, &reason, 1, "gap-fill")
                    .await
                    .map_err(broker)?;
                settle(confirm.await, || "a dead letter".to_string()).map_err(broker)?;
            }
            Ok(request) => {
                let reply = answer(cfg, store, &consuming.conn, &replies, &request).await?;
                tracing::info!(site = %request.site, origin = %request.origin, epoch = request.epoch, from = request.from, to = request.to, sent = reply.sent, missing = ?reply.missing, "gap fill: answered");
            }
        }
        d.acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(broker)?;
    }
}

/// Sends the range's events the archive holds to the site's queue, then
/// the reply behind them; returns the reply.
async fn answer<S: Store>(
    cfg: &ConnectorConfig,
    store: &S,
    conn: &lapin::Connection,
    replies: &lapin::Channel,
    r: &GapRequest,
) -> Result<GapReply, TargetError> {
    let queue = cfg.topology.site_queue(&r.site);
    let filter = Filter {
        origin: Some(r.origin.clone()),
        range: Some((r.epoch, r.from, r.to)),
        ..Filter::default()
    };
    let mut found: Vec<u64> = Vec::new();
    let sent = replay::replay(store, conn, &queue, &filter, None, |p| {
        if let Some((_, _, seq)) = &p.last {
            found.push(*seq as u64);
        }
    })
    .await
    .map_err(|e| match e {
        replay::ReplayError::Archive(e) => e,
        other => broker(other),
    })?;
    found.sort_unstable();
    found.dedup();
    let reply = GapReply {
        archive: cfg.site.clone(),
        origin: r.origin.clone(),
        epoch: r.epoch,
        from: r.from,
        to: r.to,
        sent: sent.confirmed,
        missing: rules::cut(r.from, r.to, &found),
    };
    let confirm = control::send(replies, &queue, GAP_REPLY, &cfg.site, &reply)
        .await
        .map_err(broker)?;
    settle(confirm.await, || format!("a gap reply to {queue}")).map_err(broker)?;
    Ok(reply)
}
