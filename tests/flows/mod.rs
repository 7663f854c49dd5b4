//! End-to-end flows against real PostgreSQL and RabbitMQ, one file per concern.

mod admin;
mod archive;
mod audit;
mod bench;
mod capture;
mod cli;
mod crash;
mod dashboard;
mod delivery;
mod gaps;
mod mariadb;
mod metrics;
mod mixed;
mod operations;
mod oracle;
mod outages;
mod purge;
mod readme;
mod resync;
mod sink_failures;
mod sqlserver;
mod sync;
