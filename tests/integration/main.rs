//! The integration tests: one binary, one module per area, shared helpers in `helpers`.
//!
//! Needs PostgreSQL: `DATABASE_URL` (a base URL; each test makes its own database) or Docker.
//! `TEST_LOG=debug` shows tracing output.

#![allow(clippy::unwrap_used)]

mod bench;
mod cli;
mod faults;
mod helpers;
mod hostile;
mod load;
mod metrics;
// The reader's near tier (issue 14).
mod near;
mod near_faults;
mod pgcluster;
mod privileges;
mod races;
mod reader;
mod repository;
mod scheduler;
mod schema;
