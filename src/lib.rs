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
//! The engine-free core, then the engines, then the tooling (see
//! `docs/ARCHITECTURE.md` for the flow and how to add an engine):
//!
//! - [`cli`]: the `sitesync` commands (`run`, `check`, `init`, `status`,
//!   `dlq`, `replay`, `resync`, `jobs`, `audit`, `purge`, `conflicts review`,
//!   `gaps`, `trace`, `topology declare`, `checkpoint show|reset`, `demo`,
//!   `bench`);
//!   `main.rs` only calls [`cli::main`]. It names no engine: it reaches
//!   them through [`engine::Engine::run`].
//! - [`config`]: connector and topology files, `${VAR}` expansion, every
//!   error reported at once with file and key; the `[database]` table is
//!   read by the engine.
//! - [`error`]: [`error::SourceError`] and [`error::TargetError`], each a
//!   kind (transient or operator) and a cause.
//! - [`event`]: the outbox row and the event it becomes; why a row is refused.
//! - [`position`]: [`position::LogPosition`], what every engine's position
//!   offers (ordered, text, JSON tagged with the engine).
//! - [`checkpoint`]: the sled store with crc32 records, a process lock and a
//!   no-going-back rule.
//! - [`source`]: the [`source::Source`] and [`source::ChangeStream`] traits.
//! - [`bus`]: RabbitMQ connections with failover, [`bus::topology`]
//!   (declare, verify), [`bus::management`] (bindings, through the
//!   management API), [`bus::publisher`] (confirms, dead letters) and
//!   [`bus::dlq`] (`sitesync dlq list|requeue`), [`bus::direct`] (one
//!   site's queue through the default exchange: replay, resync).
//! - [`runner`]: the run loop: source → publisher → checkpointer, sessions
//!   restarted from the checkpoint after any failure, clean drain on SIGTERM.
//! - [`sink`]: this site's queue applied to its database: [`sink::plan`]
//!   (each message's plan), [`sink::batch`] (the transaction, written once
//!   for every engine), [`sink::rules`] (last-writer-wins, gaps),
//!   [`sink::mapping`] (routes).
//! - [`capture`]: `sitesync capture`: triggers that fill the outbox from
//!   business tables, the inverse of each route (the engines' SQL in
//!   `engine/<name>/capture.rs`).
//! - [`resync`]: `sitesync resync`: a consistent snapshot of chosen tables
//!   sent to one site's queue as a resumable job (the engines' SQL in
//!   `engine/<name>/resync.rs`).
//! - [`archive`]: the archive queue consumed into a table of one site's
//!   database (its connector's `[archive]`), with the sink's consumer.
//! - [`jobs`]: the record of long operations (replay, purge, …) in
//!   `sitesync_jobs`, the [`jobs::JobLog`] each engine implements.
//! - [`audit`]: the audit trail: every manual action (CLI or admin API),
//!   who, when, arguments, result, in `sitesync_audit`, the
//!   [`audit::AuditLog`] each engine implements.
//! - [`purge`]: the archive, the inbox and reviewed conflicts removed after
//!   their retention, by `sitesync purge` and on a schedule in the sidecar.
//! - [`sidecar`]: the source, the sink, the archive and the scheduled purge
//!   of one site, run side by side.
//! - [`status`]: what `sitesync status` reports.
//! - [`retry`]: capped exponential backoff with jitter.
//! - [`checks`]: preflight results for `sitesync check`.
//! - [`engine`]: one folder per database engine ([`engine::postgres`],
//!   [`engine::sqlserver`], [`engine::oracle`]), each with its settings,
//!   connection, source, positions, sink dialect and status; the
//!   `engines!` list in [`engine`] is the one place that names them
//!   ([`engine::mariadb`] is being built and not in the list yet).
//! - [`lab`]: `sitesync demo`, `sitesync bench` and the private PostgreSQL
//!   clusters they start (the integration tests reuse them); nothing of the
//!   product depends on it.

pub mod admin;
pub mod archive;
pub mod audit;
pub mod bus;
pub mod capture;
pub mod checkpoint;
pub mod checks;
pub mod cli;
pub mod config;
pub mod conflicts;
pub mod engine;
pub mod error;
pub mod event;
pub mod jobs;
pub mod lab;
pub mod metrics;
pub mod position;
pub mod purge;
pub mod resync;
pub mod retry;
pub mod runner;
pub mod sidecar;
pub mod sink;
pub mod source;
pub mod status;
