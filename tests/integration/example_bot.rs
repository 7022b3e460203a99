//! The example bot (`crates/strategic-cache/examples/bot.rs`): the usage guide's first reader
//! example is its code word for word, and the built program reads a migrated database through
//! the near tier.
//!
//! The program is the one `cargo build --examples` leaves in `target/<profile>/examples/`
//! (`cargo xtask test` builds it with the binaries): a test running `cargo run --example`
//! itself would wait on the build directory's lock, which the running `cargo test` holds.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use crate::support::TestDb;
use crate::support::cli::run;

const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../crates/strategic-cache/examples/bot.rs"
);
const GUIDE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../docs/STRATEGIC_CACHE_USAGE.md"
);

/// The built example, in `target/<profile>/examples`, beside the test executable's `deps`.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let path = dir
        .join("examples")
        .join(format!("bot{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} not found: run `cargo build --workspace --bins --examples` (or `cargo xtask test`, \
         which does) before the integration tests",
        path.display()
    );
    path
}

/// The usage guide's first `rust` block is the example's code between its `usage guide` markers, unchanged.
#[test]
fn usage_guide_reader_example_is_the_example_bots_code() {
    let example = std::fs::read_to_string(EXAMPLE).unwrap();
    let guide = std::fs::read_to_string(GUIDE).unwrap();
    let marked = example
        .split_once("// usage guide: begin\n")
        .and_then(|(_, rest)| rest.split_once("// usage guide: end\n"))
        .map(|(code, _)| code)
        .expect("the example marks the guide's part");
    let block = guide
        .split_once("```rust\n")
        .and_then(|(_, rest)| rest.split_once("```\n"))
        .map(|(code, _)| code)
        .expect("the guide has a rust block");
    assert_eq!(block, marked);
}

/// Against a migrated database, the example answers its messages: alice's entries come from the database on the first read and from the near tier on the second, bob has nothing, and it exits 0.
#[tokio::test]
async fn example_bot_serves_from_the_database_then_from_memory() {
    let binary = example_binary();
    let t = TestDb::migrated().await;
    let url = Some(t.url.as_str());
    for (component, payload) in [
        ("memory_health", r#"{"memory_snapshot": ["likes tea"]}"#),
        (
            "conversation_patterns",
            r#"{"predicted_switch_likelihood": 0.9}"#,
        ),
    ] {
        let put = [
            "put",
            "--component",
            component,
            "--user",
            "alice",
            "--bot",
            "elena",
        ];
        run(url, &put, payload.as_bytes())
            .await
            .expect_code(0, component);
    }
    let child = tokio::process::Command::new(binary)
        .env("DATABASE_URL", &t.url)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("the example bot finished")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let alice: Vec<&str> = stdout.lines().filter(|l| l.starts_with("alice:")).collect();
    assert_eq!(alice.len(), 6, "{stdout}");
    for line in &alice {
        assert!(
            line.contains("served memory_health, conversation_patterns from"),
            "{stdout}"
        );
    }
    assert!(alice[0].ends_with("from database"), "{stdout}");
    assert!(alice[1].ends_with("from near"), "{stdout}");
    let bob: Vec<&str> = stdout.lines().filter(|l| l.starts_with("bob:")).collect();
    assert_eq!(bob.len(), 2, "{stdout}");
    assert!(
        bob.iter().all(|l| l.contains("served nothing (missing")),
        "{stdout}"
    );
}
