//! The integration tests: one binary, one module per area, the shared harness in `support`.
//!
//! Needs PostgreSQL: `DATABASE_URL` (a base URL; each test makes its own database) or a container
//! engine (`cargo xtask test` prepares one).
//! `TEST_LOG=debug` shows tracing output.

#![allow(clippy::unwrap_used)]

// `bench --quick --json`: every required case runs and sees no errors.
mod bench;
// Citus (issue 15): statements that differ on a coordinator, and `migrate distribute`.
mod citus;
// The near tier on a real Citus (issue 24): coherence fed by every node's log, its faults, who it believes.
mod citus_near;
// The binary as a subprocess: exit codes, `--json`, round trips, bad input that exits 2.
mod cli;
// Connection failures: at once, in one line, in PostgreSQL's words, without passwords.
mod connect_errors;
// The repository contract, run against PostgreSQL and the in-memory store.
mod contract;
// crates/strategic-cache/examples/bot.rs, built and run.
mod example_bot;
// `migrate feed log|triggers`: the near tier's change feed moved, its refusals changing nothing.
mod feed_migrate;
// Faults under load: a cluster stopped and killed, a proxy adding latency and partitions.
mod faults;
// Hostile input the contract and CLI suites do not already cover.
mod hostile;
// The lease's shared heartbeat: one sender, takeover, forged heartbeats.
mod lease_fleet;
// A thousand concurrent readers over one reader and a pool of ten connections.
mod load;
// Metrics export to VictoriaMetrics, and the Grafana dashboard against the exporter.
mod metrics;
// The reader's near tier: coherence within the lease, single flight, the memory bound.
mod near;
// The near tier's coherence run under faults of its listener and lease.
mod near_faults;
// The near tier fed by a plain server's log after `migrate feed log` (issue 25, item 6): coherence, the switch, who it believes.
mod near_log;
// The near tier believes only writers (issue 21).
mod near_senders;
// Behind PgBouncer in session pooling: the listener direct, faults, one-line errors.
mod pgbouncer;
// Least privilege: the reader and writer roles, and passwords kept out of logs.
mod privileges;
// Races beyond the contract: batches against single writes, sweeps against refreshes.
mod races;
// The hot-path read pool: abandoned reads, terminated backends, bound, batching.
mod read_pool;
// Streaming replicas: routing, faults and coherence.
mod replicas;
// PostgreSQL-only repository checks: round trips, entity agreement, statement counts.
mod repository;
// Migrating as a user that may not create roles (managed PostgreSQL).
mod roles;
// The refresh queue's contract, on PostgreSQL and in memory.
mod scheduler;
// The migration against docs/SCHEMA.md, read back from the catalog.
mod schema;
// `simulate` and `bench` as a new user meets them.
mod simulate;
// Opt-in stale reads, marked.
mod stale_reads;
// The shared harness (databases, clusters, the CLI runner, the coherence run, builders).
mod support;
// sslmode against servers with version 1 and 3 certificates.
mod tls;
// The refresh worker through a database outage longer than its attempt limit.
mod worker_outage;
