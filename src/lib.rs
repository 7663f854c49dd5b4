//! # sitesync
//!
//! A change-data-capture sidecar that keeps the databases of several sites in
//! sync through RabbitMQ. Applications write their business change and an
//! outbox row in one transaction; sitesync tails the database's change log
//! for outbox inserts, publishes each as an event with publisher confirms,
//! and checkpoints only what the broker confirmed.
//!
//! # Layout
//!
//! - [`cli`]: the `sitesync` commands (`run`, `check`, `init`, `status`,
//!   `dlq`, `demo`, `topology declare`, `checkpoint show|reset`); `main.rs`
//!   only calls [`cli::main`].
//! - [`config`]: connector and topology files, `${VAR}` expansion, every
//!   error reported at once with file and key.
//! - [`event`]: the outbox row and the event it becomes; why a row is refused.
//! - [`position`]: log positions, one variant per engine, ordered.
//! - [`checkpoint`]: the sled store with crc32 records, a process lock and a
//!   no-going-back rule.
//! - [`source`]: the [`source::Source`] trait and one file per engine
//!   ([`source::postgres`], with the pgoutput decoder in [`source::pgoutput`];
//!   [`source::oracle`], LogMiner, with its `SQL_REDO` parser, XID buffering
//!   and log selection).
//! - [`bus`]: RabbitMQ connections with failover, [`bus::topology`]
//!   (declare, verify), [`bus::management`] (bindings, through the
//!   management API) and [`bus::publisher`] (confirms, dead letters).
//! - [`runner`]: the run loop: source → publisher → checkpointer, sessions
//!   restarted from the checkpoint after any failure, clean drain on SIGTERM.
//! - [`sidecar`]: the source and the sink of one site, run side by side.
//! - [`sink`]: this site's queue applied to its database (batches, inbox,
//!   last-writer-wins, gaps, dead letters), [`sink::postgres`] for PostgreSQL,
//!   [`sink::oracle`] for Oracle and [`sink::mapping`] for routes.
//! - [`status`]: what `sitesync status` reports.
//! - [`bus::dlq`]: `sitesync dlq list|requeue`.
//! - [`retry`]: capped exponential backoff with jitter.
//! - [`checks`]: preflight results for `sitesync check`.
//! - [`demo`]: `sitesync demo`, three sites on private clusters, end to end.
//! - [`bench`]: `sitesync bench`, the figures against the broker's own ceiling.
//! - [`lab`]: private PostgreSQL clusters for the demo and the benchmark.

pub mod bus;
pub mod checkpoint;
pub mod checks;
pub mod cli;
pub mod config;
pub mod engine;
pub mod event;
pub mod lab;
pub mod position;
pub mod retry;
pub mod runner;
pub mod sidecar;
pub mod sink;
pub mod source;
pub mod status;
