//! A bot that reads the strategic cache: the starting point for a bot of your own.
//!
//! ```sh
//! DATABASE_URL=postgres://bot:secret@127.0.0.1:5432/cache cargo run -p strategic-cache --example bot
//! ```
//!
//! It builds the reader as docs/STRATEGIC_CACHE_USAGE.md does (the near tier on), answers a
//! few simulated messages from the cache, and prints for each what it served and from where:
//! `near` (process memory, no round trip) or `database`. The cache is filled by the worker
//! (or `strategic-cache put`); with nothing there, every component is `missing` and the bot
//! answers without insights, as a bot must. The usage guide's first reader example is the
//! part between the two `usage guide` markers, checked word for word by
//! `tests/integration/example_bot.rs`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

// usage guide: begin
use std::sync::Arc;
use strategic_cache::{
    CacheReader, Component, NearConfig, PgCacheRepository, PgConfig, ReaderConfig,
};

async fn build_reader(database_url: &str) -> Result<CacheReader, strategic_cache::CacheError> {
    let repo = PgCacheRepository::connect(database_url, PgConfig::default()).await?;
    // Hits from memory, coherent within 1 s; never fails (without it, reads go to the DB).
    let near = repo.near_tier(&NearConfig::default())?;
    Ok(CacheReader::new(Arc::new(repo))
        .with_config(ReaderConfig::default()) // 50 ms budget, breaker 5 failures / 1 s
        // .with_observer(metrics)            // Arc<dyn ReadObserver>
        // .with_refresh_sink(scheduler)      // Arc<dyn RefreshSink>
        .with_near(near))
}

struct Bot {
    cache: CacheReader, // cheap to clone; clones share breaker, counters and near tier
}

impl Bot {
    async fn on_message(&self, user_id: &str, text: &str) -> String {
        // Everything for this (user, bot) in one round trip; absent parts are simply None.
        let insights = self.cache.snapshot(user_id, "elena").await;
        let mut prompt = text.to_string();
        if let Some(p) = insights.conversation_patterns()
            && p.predicted_switch_likelihood.unwrap_or(0.0) > 0.7
        {
            prompt.push_str("\n(the user is likely to change topic)");
        }
        // One component on its own:
        if let Some(entry) = self
            .cache
            .get(Component::MemoryHealth, user_id, "elena")
            .await
        {
            let _age = entry.age; // how old the insight is
        }
        prompt
    }
}
// usage guide: end

/// The simulated conversation: (user, message).
const MESSAGES: [(&str, &str); 4] = [
    ("alice", "hello again"),
    ("alice", "what did we talk about?"),
    ("bob", "hi, I'm new"),
    ("alice", "thanks, bye"),
];

#[tokio::main]
async fn main() -> ExitCode {
    let Ok(url) = std::env::var("DATABASE_URL") else {
        eprintln!("bot: set DATABASE_URL to the cache database's postgres:// URL");
        return ExitCode::from(2);
    };
    let cache = match build_reader(&url).await {
        Ok(cache) => cache,
        Err(error) => {
            // The library's errors never contain the password.
            eprintln!("bot: {error}");
            return ExitCode::FAILURE;
        }
    };
    // The near tier serves a bot's keys from memory once it listens to that bot's channel
    // (started by the first read of the bot) and holds its lease. A bot does not wait for
    // that (reads go to the database meanwhile); this demo does, so that its output shows
    // both sources: it reads a key nobody uses until a repeat read is answered from memory
    // (the tier's store reads, `fills`, stop growing).
    let fills = |cache: &CacheReader| cache.near_stats().map_or(0, |s| s.fills);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = fills(&cache);
        let _ = cache.snapshot("warm-up", "elena").await;
        if (fills(&cache) == before && before > 0) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bot = Bot { cache };
    for (user, text) in MESSAGES {
        // Twice: the first read of a key fills the near tier, the second is served from it.
        for _ in 0..2 {
            let near_before = bot.cache.stats().near_hits;
            let prompt = bot.on_message(user, text).await;
            let from_memory = bot.cache.stats().near_hits > near_before;
            let snapshot = bot.cache.snapshot(user, "elena").await;
            let served: Vec<&str> = Component::ALL
                .into_iter()
                .filter(|&c| snapshot.get(c).is_some())
                .map(Component::short_name)
                .collect();
            let text = prompt.lines().next().unwrap_or_default();
            if served.is_empty() {
                println!("{user}: {text:?} -> served nothing (missing: answered without insights)");
            } else {
                let source = if from_memory { "near" } else { "database" };
                println!(
                    "{user}: {text:?} -> served {} from {source}",
                    served.join(", ")
                );
            }
        }
    }
    let stats = bot.cache.stats();
    println!(
        "{} component reads (warm-up included), {} hits, {} of them from memory",
        stats.reads, stats.hits, stats.near_hits
    );
    ExitCode::SUCCESS
}
