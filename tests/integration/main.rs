//! The integration tests: one binary, one module per area, the shared harness in `support`.
//!
//! Needs PostgreSQL: `DATABASE_URL` (a base URL; each test makes its own database) or a container
//! engine (`cargo xtask test` prepares one).
//! `TEST_LOG=debug` shows tracing output.

#![allow(clippy::unwrap_used)]

mod bench;
// Citus (issue 15): distributed tables and `migrate distribute`.
mod citus;
mod cli;
mod connect_errors;
mod contract;
// crates/strategic-cache/examples/bot.rs, built and run.
mod example_bot;
mod faults;
mod hostile;
mod load;
mod metrics;
// The reader's near tier.
mod near;
mod near_faults;
// The near tier believes only writers (issue 21).
mod near_senders;
// Behind PgBouncer (issue 25).
mod pgbouncer;
mod privileges;
mod races;
mod read_pool;
// Streaming replicas: routing, faults and coherence.
mod replicas;
mod repository;
mod roles;
mod scheduler;
mod schema;
mod simulate;
// Opt-in stale reads, marked.
mod stale_reads;
mod support;
// sslmode against servers with version 1 and 3 certificates.
mod tls;
mod worker_outage;
