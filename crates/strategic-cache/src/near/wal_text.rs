//! The text that PostgreSQL's `test_decoding` output plugin writes for each change, read back:
//! what the Citus change source (`wal.rs`) hears from each node's write-ahead log.
//!
//! One line per change (PostgreSQL 15's `contrib/test_decoding/test_decoding.c`):
//!
//! ```text
//! table public.strategic_memory_health_102008: INSERT: user_id[text]:'u1' n[double precision]:1.5
//! table public.t_1: UPDATE: old-key: user_id[text]:'u0' new-tuple: user_id[text]:'u1' ...
//! table public.t_1: DELETE: user_id[text]:'u1' bot_name[text]:'b'
//! table public.t_1, public.t_2: TRUNCATE: (no-flags)
//! ```
//!
//! plus `BEGIN`, `COMMIT` and `message: ...` lines, which carry no row. A value is `null`,
//! `unchanged-toast-datum` (a large value the update did not touch), a bare literal (numbers
//! and booleans) or a quoted one (`'` doubled inside). Identifiers are quoted only when they
//! must be; none of the cache's are, so anything quoted is not ours.

/// One column of a decoded tuple.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Column<'a> {
    pub(super) name: &'a str,
    pub(super) ty: &'a str,
    pub(super) value: Value,
}

/// A column's value as the plugin printed it.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Value {
    Null,
    /// Not in the record: the update left this large value as it was.
    UnchangedToast,
    /// Printed without quotes (numbers, booleans).
    Bare(String),
    /// Printed quoted, unescaped here.
    Quoted(String),
}

/// What kind of row change a line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Action {
    Insert,
    Update,
    Delete,
}

/// One line of the plugin's output.
#[derive(Debug, PartialEq)]
pub(super) enum Line<'a> {
    /// A row of `schema.table` changed. `old_key` is the replica identity of the old row (a
    /// delete's, or an update's that changed it); `new` the new row (inserts and updates).
    /// `None` where the plugin printed no tuple.
    Row {
        schema: &'a str,
        table: &'a str,
        action: Action,
        old_key: Option<Vec<Column<'a>>>,
        new: Option<Vec<Column<'a>>>,
    },
    /// These tables were truncated (`None`: a name that did not read as `schema.table`).
    Truncate(Vec<Option<(&'a str, &'a str)>>),
    /// `BEGIN`, `COMMIT`, a logical message: nothing to apply.
    Other,
    /// A row line that did not read as the plugin writes it, with its table where that read.
    Unreadable(Option<(&'a str, &'a str)>),
}

/// `schema.table`, unquoted; `None` for anything else (a quoted name is not the cache's).
fn qualified(name: &str) -> Option<(&str, &str)> {
    if name.contains('"') {
        return None;
    }
    let (schema, table) = name.split_once('.')?;
    (!schema.is_empty() && !table.is_empty() && !table.contains('.')).then_some((schema, table))
}

/// Reads one line.
pub(super) fn parse(line: &str) -> Line<'_> {
    let Some(rest) = line.strip_prefix("table ") else {
        return Line::Other;
    };
    if let Some((names, _flags)) = rest.split_once(": TRUNCATE:") {
        return Line::Truncate(names.split(", ").map(qualified).collect());
    }
    let actions = [
        (": INSERT:", Action::Insert),
        (": UPDATE:", Action::Update),
        (": DELETE:", Action::Delete),
    ];
    let Some((at, marker, action)) = actions
        .iter()
        .filter_map(|(marker, action)| rest.find(marker).map(|at| (at, *marker, *action)))
        .min_by_key(|(at, _, _)| *at)
    else {
        return Line::Unreadable(None);
    };
    // A quoted (so not ours) name may hold anything, the markers too: it reads as a name
    // with a quote in it and is dropped by the caller.
    let Some((schema, table)) = qualified(&rest[..at]) else {
        return Line::Row {
            schema: "",
            table: "",
            action,
            old_key: None,
            new: None,
        };
    };
    let body = &rest[at + marker.len()..];
    let parsed = match action {
        Action::Insert => tuple_or_none(body).map(|(new, _)| (None, new)),
        Action::Delete => tuple_or_none(body).map(|(old, _)| (old, None)),
        Action::Update => match body.trim_start().strip_prefix("old-key:") {
            Some(old) => tuple(old).and_then(|(old, rest)| {
                let rest = rest.trim_start().strip_prefix("new-tuple:")?;
                let (new, _) = tuple_or_none(rest)?;
                Some((Some(old), new))
            }),
            None => tuple_or_none(body).map(|(new, _)| (None, new)),
        },
    };
    match parsed {
        Some((old_key, new)) => Line::Row {
            schema,
            table,
            action,
            old_key,
            new,
        },
        None => Line::Unreadable(Some((schema, table))),
    }
}

/// A tuple, or `None` inside `Some` for `(no-tuple-data)`.
#[allow(clippy::type_complexity)]
fn tuple_or_none(s: &str) -> Option<(Option<Vec<Column<'_>>>, &str)> {
    if s.trim() == "(no-tuple-data)" {
        return Some((None, ""));
    }
    tuple(s).map(|(columns, rest)| (Some(columns), rest))
}

/// Columns up to the end of `s` or up to `new-tuple:`; the rest after them.
fn tuple(mut s: &str) -> Option<(Vec<Column<'_>>, &str)> {
    let mut columns = Vec::new();
    loop {
        s = s.trim_start_matches(' ');
        if s.is_empty() || s.starts_with("new-tuple:") {
            return Some((columns, s));
        }
        let open = s.find('[')?;
        let name = &s[..open];
        if name.is_empty() || name.contains(['"', ' ']) {
            return None;
        }
        s = &s[open + 1..];
        let close = s.find("]:")?;
        let ty = &s[..close];
        s = &s[close + 2..];
        let value;
        (value, s) = literal(s)?;
        columns.push(Column { name, ty, value });
    }
}

/// One value and what follows it.
fn literal(s: &str) -> Option<(Value, &str)> {
    if let Some(mut rest) = s.strip_prefix('\'') {
        let mut text = String::new();
        loop {
            let quote = rest.find('\'')?;
            text.push_str(&rest[..quote]);
            rest = &rest[quote + 1..];
            match rest.strip_prefix('\'') {
                Some(after) => {
                    text.push('\'');
                    rest = after;
                }
                None => return Some((Value::Quoted(text), rest)),
            }
        }
    }
    let end = s.find(' ').unwrap_or(s.len());
    let (token, rest) = s.split_at(end);
    let value = match token {
        "null" => Value::Null,
        "unchanged-toast-datum" => Value::UnchangedToast,
        "" => return None,
        bare => Value::Bare(bare.to_owned()),
    };
    Some((value, rest))
}

impl Value {
    /// As JSON, the way `row_to_json` would give it (what the store's row decoder reads), for
    /// a column of type `ty`; `None` if it cannot be (a value not in the record, a number that
    /// is not JSON, a timestamp that does not read).
    pub(super) fn to_json(&self, ty: &str) -> Option<serde_json::Value> {
        match self {
            Value::Null => Some(serde_json::Value::Null),
            Value::UnchangedToast => None,
            Value::Bare(text) => serde_json::from_str(text).ok(),
            Value::Quoted(text) => match ty {
                "json" | "jsonb" => serde_json::from_str(text).ok(),
                "timestamp with time zone" => {
                    chrono::DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z")
                        .ok()
                        .map(|t| serde_json::Value::String(t.to_rfc3339()))
                }
                _ => Some(serde_json::Value::String(text.clone())),
            },
        }
    }
}

/// The columns as one JSON object, or `None` if any value cannot be given.
pub(super) fn row_json(columns: &[Column<'_>]) -> Option<serde_json::Value> {
    columns
        .iter()
        .map(|c| Some((c.name.to_owned(), c.value.to_json(c.ty)?)))
        .collect::<Option<serde_json::Map<_, _>>>()
        .map(serde_json::Value::Object)
}

/// The quoted text of column `name`, if it is there and quoted.
pub(super) fn text<'c>(columns: &'c [Column<'_>], name: &str) -> Option<&'c str> {
    columns
        .iter()
        .find(|c| c.name == name)
        .and_then(|c| match &c.value {
            Value::Quoted(text) => Some(text.as_str()),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col<'a>(name: &'a str, ty: &'a str, value: Value) -> Column<'a> {
        Column { name, ty, value }
    }

    fn q(s: &str) -> Value {
        Value::Quoted(s.to_owned())
    }

    /// Lines as PostgreSQL 15's `test_decoding` printed them on a Citus worker (copied from a
    /// real slot), each read back.
    #[test]
    fn reads_what_the_plugin_writes() {
        let insert = "table public.strategic_memory_health_102008: INSERT: user_id[text]:'u''1' \
                      n[double precision]:1.5 payload[jsonb]:'{\"a\": [1, \"x y\"]}' \
                      t[timestamp with time zone]:'2026-12-07 11:21:10.964879+00' o[text]:null";
        let Line::Row {
            schema,
            table,
            action,
            old_key,
            new,
        } = parse(insert)
        else {
            panic!("not a row: {:?}", parse(insert));
        };
        assert_eq!(
            (schema, table, action),
            ("public", "strategic_memory_health_102008", Action::Insert)
        );
        assert_eq!(old_key, None);
        let new = new.unwrap();
        assert_eq!(
            new,
            vec![
                col("user_id", "text", q("u'1")),
                col("n", "double precision", Value::Bare("1.5".into())),
                col("payload", "jsonb", q("{\"a\": [1, \"x y\"]}")),
                col(
                    "t",
                    "timestamp with time zone",
                    q("2026-12-07 11:21:10.964879+00")
                ),
                col("o", "text", Value::Null),
            ]
        );
        assert_eq!(
            row_json(&new).unwrap(),
            serde_json::json!({
                "user_id": "u'1", "n": 1.5, "payload": {"a": [1, "x y"]},
                "t": "2026-12-07T11:21:10.964879+00:00", "o": null
            })
        );

        let update = "table public.t_1: UPDATE: old-key: user_id[text]:'a new-tuple: x' \
                      new-tuple: user_id[text]:'b' big[jsonb]:unchanged-toast-datum";
        let Line::Row {
            action: Action::Update,
            old_key: Some(old),
            new: Some(new),
            ..
        } = parse(update)
        else {
            panic!("{:?}", parse(update));
        };
        assert_eq!(old, vec![col("user_id", "text", q("a new-tuple: x"))]);
        assert_eq!(new[1].value, Value::UnchangedToast);
        assert_eq!(row_json(&new), None, "a row missing a value is no row");

        assert_eq!(
            parse("table public.t_1: DELETE: user_id[text]:'u1' bot_name[text]:'b'"),
            Line::Row {
                schema: "public",
                table: "t_1",
                action: Action::Delete,
                old_key: Some(vec![
                    col("user_id", "text", q("u1")),
                    col("bot_name", "text", q("b"))
                ]),
                new: None,
            }
        );
        assert_eq!(
            parse("table public.t_1: DELETE: (no-tuple-data)"),
            Line::Row {
                schema: "public",
                table: "t_1",
                action: Action::Delete,
                old_key: None,
                new: None,
            }
        );
        assert_eq!(
            parse("table public.a_1, \"Odd\".b: TRUNCATE: restart_seqs"),
            Line::Truncate(vec![Some(("public", "a_1")), None])
        );
        for other in [
            "BEGIN",
            "COMMIT",
            "message: transactional: 1 prefix: x, sz: 3 content:abc",
        ] {
            assert_eq!(parse(other), Line::Other);
        }
    }

    /// Text that is not the plugin's shape never reads as a row of ours: a quoted table name
    /// (however it is spelled) has no schema, and a broken tuple is unreadable.
    #[test]
    fn what_is_not_the_plugins_shape_is_not_a_row() {
        let forged = "table public.\"x: INSERT: user_id[text]:'u1'\": INSERT: user_id[text]:'u2'";
        assert!(matches!(parse(forged), Line::Row { schema: "", .. }));
        let t_1 = Line::Unreadable(Some(("public", "t_1")));
        assert_eq!(parse("table public.t_1: INSERT: user_id[text]:'open"), t_1);
        assert_eq!(parse("table public.t_1: INSERT: user_id"), t_1);
        assert_eq!(parse("table public.t_1: INSERT: \"Odd\"[text]:'x'"), t_1);
        assert_eq!(parse("table public.t_1 INSERT"), Line::Unreadable(None));
        assert_eq!(Value::Bare("NaN".into()).to_json("double precision"), None);
        assert_eq!(q("infinity").to_json("timestamp with time zone"), None);
    }
}
