//! The `bench` command's arguments.

use std::path::PathBuf;

/// The workload and the scratch database's size.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// The replicas the reads go to (global `--replica`), scoped to the scratch schema.
    #[arg(skip)]
    pub replicas: crate::context::Replicas,
    /// Users with rows (every user has rows with every bot), written into a schema of the
    /// bench's own that is dropped at the end.
    #[arg(long, default_value_t = 100_000)]
    pub users: u32,
    /// Bots.
    #[arg(long, default_value_t = 3)]
    pub bots: u32,
    /// Percent of (user, bot) keys whose rows are expired.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=50))]
    pub stale_percent: u32,
    /// Operations per read case (single reads, snapshots; a third of it for cold, warm and
    /// stale reads).
    #[arg(long, default_value_t = 6000)]
    pub reads: u64,
    /// Bursts per burst size (each burst starts all its reads at once).
    #[arg(long, default_value_t = 30)]
    pub bursts: u32,
    /// Seconds of the sustained run (snapshots from 10 streams).
    #[arg(long, default_value_t = 10.0)]
    pub sustained_secs: f64,
    /// The reader's time budget per read, in milliseconds (a bot's default is 50). Past it a
    /// read counts as an error (a timeout); tests of slow debug builds raise it.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    pub budget_ms: u64,
    /// Pool size of our repository (the pool is kept warm: all connections opened first).
    #[arg(long, default_value_t = 10)]
    pub pool: u32,
    /// Entries per `upsert_many` batch when filling and in the write case.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// A small data set and few operations: finishes in seconds (for tests and smoke runs).
    #[arg(long)]
    pub quick: bool,
    /// Run the soak test instead: refresh cycles over the same keys with reads in parallel,
    /// reporting table and index sizes and read latency per interval.
    #[arg(long)]
    pub soak: bool,
    /// Seconds of the soak test.
    #[arg(long, default_value_t = 300.0)]
    pub soak_secs: f64,
    /// (user, bot) keys refreshed over and over by the soak test.
    #[arg(long, default_value_t = 20_000)]
    pub soak_keys: u32,
    /// Soak without the worker's periodic `vacuum_if_needed` (to see what autovacuum alone
    /// does, or fails to do where it is off).
    #[arg(long)]
    pub soak_no_vacuum: bool,
    /// Commits timed from the primary to the replicas by the `replica_lag` case (with
    /// `--replica` only).
    #[arg(long, default_value_t = 200)]
    pub lag_samples: u64,
    /// Run only the near tier's memory cases: a tier of 32 MiB, then one of 64 MiB, each in a
    /// process of its own, filled past its bound with about 1 KB of JSON per entry; reports
    /// the process's RSS growth against the bound (no data set is written).
    #[arg(long, conflicts_with = "soak")]
    pub near_memory: bool,
    /// Run only the near tier's memory case at this bound (MiB) and print what it measured:
    /// how `bench` runs each `near_memory_*` case in a process of its own.
    #[arg(long, value_name = "MIB", hide = true)]
    pub near_memory_child: Option<u64>,
    /// Write the latency distributions to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

impl BenchArgs {
    /// The arguments with `--quick` applied.
    pub(super) fn effective(&self) -> BenchArgs {
        let mut args = self.clone();
        if args.quick {
            args.users = args.users.min(2000);
            args.bots = args.bots.min(2);
            args.reads = args.reads.min(600);
            args.bursts = args.bursts.min(3);
            args.sustained_secs = args.sustained_secs.min(1.0);
            args.soak_secs = args.soak_secs.min(6.0);
            args.soak_keys = args.soak_keys.min(500);
            args.lag_samples = args.lag_samples.min(20);
        }
        args
    }
}
