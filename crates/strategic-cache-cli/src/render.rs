//! What a command returns, and how its parts are written for people.
//!
//! Commands do not print: they return both renderings of their result ([`Outcome::text`] and
//! [`Outcome::json`]) and `main` prints the one asked for.

use std::time::Duration;

use serde_json::Value;
use strategic_cache::{Key, ServerRole, ServerStats};

use crate::exit;

/// What a command produced.
#[derive(Debug)]
pub struct Outcome {
    /// The human rendering, printed without `--json`.
    pub text: String,
    /// The machine rendering, printed with `--json`.
    pub json: Value,
    /// Exit code: [`exit::OK`] or [`exit::MISS`].
    pub code: u8,
    /// For a miss, the one line explaining it on stderr.
    pub note: Option<String>,
    /// Whether `json` is printed on one line: the last object of a command that streamed
    /// JSON Lines as it ran (`watch`), so that every line of its output is one object.
    pub json_line: bool,
}

impl Outcome {
    /// A successful outcome.
    pub fn ok(text: String, json: Value) -> Outcome {
        Outcome {
            text,
            json,
            code: exit::OK,
            note: None,
            json_line: false,
        }
    }

    /// A successful outcome whose JSON ends a stream of JSON Lines (printed on one line).
    pub fn ok_line(text: String, json: Value) -> Outcome {
        Outcome {
            json_line: true,
            ..Outcome::ok(text, json)
        }
    }

    /// A miss (exit 3), with the stderr line saying what was missing.
    pub fn miss(text: String, json: Value, note: String) -> Outcome {
        Outcome {
            text,
            json,
            code: exit::MISS,
            note: Some(note),
            json_line: false,
        }
    }
}

/// A duration for people: `850ms`, `42s`, `4m05s`, `2h03m`, `3d04h`.
pub fn human_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        0 => format!("{}ms", duration.as_millis()),
        1..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{:02}h", secs / 86400, secs % 86400 / 3600),
    }
}

/// The server whose read counter grew between two `servers()` readings around one read, if
/// exactly one did (a process that reads nothing else knows so which server answered).
pub fn served_by(before: &[ServerStats], after: &[ServerStats]) -> Option<ServerStats> {
    let mut grown = after.iter().filter(|a| {
        let previous = before.iter().find(|b| b.name == a.name && b.role == a.role);
        a.reads > previous.map_or(0, |b| b.reads)
    });
    let one = grown.next()?;
    grown.next().is_none().then(|| one.clone())
}

/// `primary` or `replica host:port/database`.
pub fn server_label(server: &ServerStats) -> String {
    match server.role {
        ServerRole::Replica => format!("replica {}", server.name),
        _ => "primary".to_owned(),
    }
}

/// The key as a JSON object (`user_id` and `bot_name`, or `bot_name` and `time_window_hours`).
pub fn key_json(key: &Key) -> Value {
    serde_json::to_value(key).unwrap_or(Value::Null)
}

/// The key for people: `user "u", bot "b"` or `bot "b", window 168 h`.
pub fn key_text(key: &Key) -> String {
    match key {
        Key::UserBot { user_id, bot_name } => format!("user {user_id:?}, bot {bot_name:?}"),
        Key::BotWindow {
            bot_name,
            time_window_hours,
        } => format!("bot {bot_name:?}, window {time_window_hours} h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(name: &str, role: ServerRole, reads: u64) -> ServerStats {
        ServerStats {
            name: name.into(),
            role,
            reads,
            errors: 0,
            lag: None,
            eligible: true,
        }
    }

    /// The server whose read counter grew across one read answered it; none grew: memory;
    /// two grew: unknown.
    #[test]
    fn served_by_is_the_server_whose_reads_grew() {
        let before = [
            server("p:5432/db", ServerRole::Primary, 3),
            server("r:5432/db", ServerRole::Replica, 7),
        ];
        let mut after = before.clone();
        assert_eq!(served_by(&before, &after), None);
        after[1].reads = 8;
        let served = served_by(&before, &after).unwrap();
        assert_eq!(server_label(&served), "replica r:5432/db");
        after[0].reads = 4;
        assert_eq!(served_by(&before, &after), None);
        after[1].reads = 7;
        assert_eq!(
            server_label(&served_by(&before, &after).unwrap()),
            "primary"
        );
    }

    /// Ages read naturally at every scale.
    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(human_duration(Duration::from_secs(42)), "42s");
        assert_eq!(human_duration(Duration::from_secs(245)), "4m05s");
        assert_eq!(human_duration(Duration::from_secs(7380)), "2h03m");
        assert_eq!(human_duration(Duration::from_secs(273_600)), "3d04h");
    }
}
