//! End-to-end flows of the source side, one file per concern.

mod cli;
mod crash;
mod delivery;
mod operations;
mod outages;
mod sink_failures;
mod sync;
