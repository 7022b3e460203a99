//! What the near tier's change source on Citus needs of a cluster (issue 24), and [`check`],
//! which reads it on every node and names what is missing.
//!
//! On distributed tables the near tier hears of changes by logical decoding of every node's
//! write-ahead log (PostgreSQL's `test_decoding` plugin on a temporary slot per node and bot
//! process, `strategic_cache::near`'s `wal.rs`), not by the notify triggers, which `migrate
//! distribute` drops. That needs, on the coordinator and on each active primary worker:
//!
//! - `wal_level = logical` (a restart);
//! - on servers whose `output_plugin_libraries` (a setting of Debian's PostgreSQL 15 builds;
//!   absent elsewhere, then nothing to do) restricts the output plugins, `test_decoding` listed
//!   (it is by default);
//! - the `test_decoding` library installed (`$libdir/test_decoding.so`, PostgreSQL's contrib);
//! - a free replication slot (`max_replication_slots`) for each bot process's temporary slot.
//!
//! And of the six tables, a replica identity that carries each table's key, so that a deleted
//! row's change says which key to invalidate: the key change of `migrate distribute` makes
//! `uq_*` the identity of every table ([`crate::citus`]). Citus's own change data capture
//! (`citus.enable_change_data_capture`, its `wal2json`/`pgoutput` decoders) is not needed: the
//! source reads the shards' own names (why: docs/SCALING.md, "The near tier on Citus"). The
//! bots' role needs `REPLICATION`, which this command cannot check (it does not know the bots'
//! roles).
//!
//! None of it stops distribution: these are warnings, one line each ([`Shortfall`]).
//!
//! On plain PostgreSQL the near tier reads the one server's log in the same way wherever the
//! tables lack their notify triggers (`migrate feed log`, [`crate::feed`]); [`check_server`]
//! reads the same settings there, and the same replica identities, which `migrate feed log`
//! sets.

use std::fmt;

use sea_orm::{ConnectionTrait, DbBackend, Statement};

use crate::citus::key_indexes;
use crate::session::MigrateError;

/// One thing the near tier's change source lacks, said in one line by its `Display`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Shortfall {
    /// A setting (or a property of a table) that is not what the near tier needs.
    Setting {
        /// The node (`coordinator 127.0.0.1:9700`, `worker 127.0.0.1:9701`) or the table
        /// (`table strategic_memory_health`).
        subject: String,
        /// The setting: `wal_level`, `replica identity`, ...
        setting: String,
        /// What it is.
        is: String,
        /// What the near tier needs.
        needs: String,
        /// Where to change it.
        how: String,
    },
    /// Something that could not be read (an unreachable worker, a privilege).
    Unchecked {
        /// The node.
        subject: String,
        /// What could not be checked.
        what: String,
        /// Why.
        why: String,
    },
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shortfall::Setting {
                subject,
                setting,
                is,
                needs,
                how,
            } => write!(
                f,
                "{subject}: {setting} is {is}; the near tier needs {needs} ({how})"
            ),
            Shortfall::Unchecked { subject, what, why } => {
                write!(f, "{subject}: cannot check {what} ({why})")
            }
        }
    }
}

/// The statement every node answers with one text value: its settings, separated by the
/// ASCII unit separator (none of them can contain it). A setting that does not exist is
/// `\x1e` (the record separator); `test_decoding.so`'s presence is `t`, `f`, or `?` where the role
/// may not read `$libdir` (`pg_config` and `pg_stat_file` need superuser or
/// `pg_read_server_files`).
const SETTINGS_SQL: &str = "SELECT concat_ws(chr(31), \
     current_setting('wal_level'), \
     coalesce((SELECT setting FROM pg_catalog.pg_settings \
               WHERE name = 'output_plugin_libraries'), chr(30)), \
     current_setting('max_replication_slots'), \
     (SELECT count(*) FROM pg_catalog.pg_replication_slots)::text, \
     CASE WHEN (current_setting('is_superuser') = 'on' \
                OR pg_catalog.pg_has_role('pg_read_server_files', 'USAGE')) \
           AND pg_catalog.has_table_privilege('pg_catalog.pg_config', 'SELECT') \
          THEN coalesce((SELECT CASE WHEN (pg_catalog.pg_stat_file(setting || '/test_decoding.so', \
                                                                    true)).size IS NULL \
                                     THEN 'f' ELSE 't' END \
                         FROM pg_catalog.pg_config WHERE name = 'PKGLIBDIR'), '?') \
          ELSE '?' END, \
     (current_setting('server_version_num')::int / 10000)::text) AS s";

/// What one node said, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NodeSettings {
    wal_level: String,
    /// `None` where the server has no such setting.
    plugins: Option<String>,
    max_slots: i64,
    used_slots: i64,
    /// Whether `test_decoding.so` is installed; `None` where it could not be checked.
    plugin: Option<bool>,
    major: String,
}

impl NodeSettings {
    fn parse(text: &str) -> Option<NodeSettings> {
        let fields: Vec<&str> = text.split('\u{1f}').collect();
        let [wal_level, plugins, max_slots, used_slots, plugin, major] = fields[..] else {
            return None;
        };
        let absent = |s: &str| (s != "\u{1e}").then(|| s.to_owned());
        Some(NodeSettings {
            wal_level: wal_level.to_owned(),
            plugins: absent(plugins),
            max_slots: max_slots.parse().ok()?,
            used_slots: used_slots.parse().ok()?,
            plugin: match plugin {
                "t" => Some(true),
                "f" => Some(false),
                _ => None,
            },
            major: major.to_owned(),
        })
    }

    /// What this node (`subject`) lacks, in the order of the module documentation.
    fn shortfalls(&self, subject: &str) -> Vec<Shortfall> {
        let setting = |setting: &str, is: String, needs: &str, how: &str| Shortfall::Setting {
            subject: subject.to_owned(),
            setting: setting.to_owned(),
            is,
            needs: needs.to_owned(),
            how: how.to_owned(),
        };
        let mut out = Vec::new();
        if self.wal_level != "logical" {
            out.push(setting(
                "wal_level",
                self.wal_level.clone(),
                "logical",
                "postgresql.conf, restart",
            ));
        }
        if let Some(plugins) = &self.plugins
            && !lists(plugins, PLUGIN)
        {
            out.push(setting(
                "output_plugin_libraries",
                format!("'{plugins}'"),
                "test_decoding listed",
                "postgresql.conf, or ALTER SYSTEM SET output_plugin_libraries = pgoutput, \
                 test_decoding (a list, not one quoted string); then reload",
            ));
        }
        match self.plugin {
            Some(true) => {}
            Some(false) => out.push(setting(
                PLUGIN,
                "not installed ($libdir/test_decoding.so is missing)".to_owned(),
                "it",
                &format!(
                    "PostgreSQL's contrib; on Debian part of postgresql-{}",
                    self.major
                ),
            )),
            None => out.push(Shortfall::Unchecked {
                subject: subject.to_owned(),
                what: "that test_decoding is installed".to_owned(),
                why: "reading $libdir needs superuser or pg_read_server_files".to_owned(),
            }),
        }
        if self.max_slots - self.used_slots < 1 {
            out.push(setting(
                "max_replication_slots",
                format!("{} with {} in use", self.max_slots, self.used_slots),
                "a free slot for each bot process (its temporary slot)",
                "postgresql.conf, restart",
            ));
        }
        out
    }
}

/// The output plugin the near tier's source decodes with.
const PLUGIN: &str = "test_decoding";

/// Whether a library list, as the server shows it, names `library` (bare, as a path, or with
/// `.so`). Read as PostgreSQL reads such lists: elements separated by commas, each optionally
/// in double quotes, inside which a comma is part of the name. So `'pgoutput, wal2json'`
/// given to `ALTER SYSTEM` as one quoted string is one element (shown
/// `"pgoutput, wal2json"`) that names no library the server will find.
fn lists(list: &str, library: &str) -> bool {
    let mut elements = Vec::new();
    let mut chars = list.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut element = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        chars.next();
                        element.push('"');
                    } else {
                        break;
                    }
                } else {
                    element.push(c);
                }
            }
            while chars.peek().is_some_and(|c| *c != ',') {
                chars.next();
            }
        } else {
            while let Some(c) = chars.next_if(|c| *c != ',') {
                element.push(c);
            }
        }
        elements.push(element.trim().to_owned());
        if chars.next().is_none() {
            break;
        }
    }
    elements.iter().any(|entry| {
        let file = entry.rsplit('/').next().unwrap_or(entry);
        file.strip_suffix(".so").unwrap_or(file) == library
    })
}

/// A table's replica identity, and the key it should carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The table.
    pub table: String,
    /// `relreplident`: `d` (the primary key), `i` (an index), `f` (the whole row), `n`.
    pub kind: char,
    /// The identity's index (the primary key's for `d`), if there is one.
    pub index: Option<String>,
    /// Its columns, sorted.
    pub columns: Vec<String>,
    /// The table's key (its `uq_*` index), sorted: what a change must name.
    pub key_index: String,
    /// The key's columns, sorted.
    pub key: Vec<String>,
}

impl Identity {
    /// Whether the identity is the index `name`.
    pub fn is_index(&self, name: &str) -> bool {
        self.kind == 'i' && self.index.as_deref() == Some(name)
    }

    /// Whether a deleted row's change carries the table's key.
    pub fn carries_key(&self) -> bool {
        self.kind == 'f'
            || (!self.key.is_empty() && self.key.iter().all(|c| self.columns.contains(c)))
    }

    fn describe(&self) -> String {
        let columns = self.columns.join(", ");
        match (self.kind, &self.index) {
            ('d', Some(_)) => format!("the primary key ({columns})"),
            ('d', None) => "the primary key, which the table does not have".to_owned(),
            ('i', Some(index)) => format!("the index {index} ({columns})"),
            ('n', _) => "nothing".to_owned(),
            (kind, _) => format!("'{kind}'"),
        }
    }

    fn shortfall(&self) -> Option<Shortfall> {
        (!self.carries_key()).then(|| Shortfall::Setting {
            subject: format!("table {}", self.table),
            setting: "replica identity".to_owned(),
            is: self.describe(),
            needs: format!(
                "one that carries its key ({}), which a deleted row's change must name",
                self.key.join(", ")
            ),
            how: format!(
                "ALTER TABLE {} REPLICA IDENTITY USING INDEX {}",
                self.table, self.key_index
            ),
        })
    }
}

fn db_err(e: sea_orm::DbErr) -> MigrateError {
    MigrateError::Database(e.to_string())
}

fn list(values: impl Iterator<Item = String>) -> sea_orm::Value {
    values.collect::<Vec<String>>().into()
}

/// The replica identity of each of the six cache tables that `db`'s search path finds.
pub async fn replica_identities(db: &impl ConnectionTrait) -> Result<Vec<Identity>, MigrateError> {
    let pairs = key_indexes();
    // The identity's index: the primary key for `d`, the marked index for `i`.
    let identity = "CASE c.relreplident WHEN 'd' THEN i.indisprimary \
                    WHEN 'i' THEN i.indisreplident ELSE false END";
    let sql = format!(
        "SELECT c.relname::text AS t, c.relreplident::text AS kind, k.u AS key_index, \
         (SELECT ic.relname::text FROM pg_catalog.pg_index i \
          JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid \
          WHERE i.indrelid = c.oid AND {identity} LIMIT 1) AS idx, \
         (SELECT coalesce(string_agg(a.attname::text, ',' ORDER BY a.attname), '') \
          FROM pg_catalog.pg_index i JOIN pg_catalog.pg_attribute a \
            ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
          WHERE i.indrelid = c.oid AND {identity}) AS cols, \
         (SELECT coalesce(string_agg(a.attname::text, ',' ORDER BY a.attname), '') \
          FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid \
          JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
          WHERE i.indrelid = c.oid AND ic.relname = k.u) AS key \
         FROM unnest($1::text[], $2::text[]) AS k(t, u) \
         JOIN pg_catalog.pg_class c ON c.oid = to_regclass(k.t)"
    );
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            &sql,
            [
                list(pairs.iter().map(|(t, _)| (*t).to_owned())),
                list(pairs.iter().map(|(_, u)| (*u).to_owned())),
            ],
        ))
        .await
        .map_err(db_err)?;
    let split = |s: String| -> Vec<String> {
        s.split(',')
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let kind: String = row.try_get("", "kind").map_err(db_err)?;
        out.push(Identity {
            table: row.try_get("", "t").map_err(db_err)?,
            kind: kind.chars().next().unwrap_or('?'),
            index: row.try_get("", "idx").map_err(db_err)?,
            columns: split(row.try_get("", "cols").map_err(db_err)?),
            key_index: row.try_get("", "key_index").map_err(db_err)?,
            key: split(row.try_get("", "key").map_err(db_err)?),
        });
    }
    Ok(out)
}

/// Reads every node's settings (the coordinator on `db`, each active primary worker through
/// Citus's `run_command_on_workers`) and the tables' replica identities, and returns what the
/// near tier's change source lacks: empty when everything is in place. For a database with
/// the `citus` extension; a node that cannot be read is one [`Shortfall::Unchecked`].
pub async fn check(db: &impl ConnectionTrait) -> Result<Vec<Shortfall>, MigrateError> {
    let one = |sql: &str| Statement::from_string(DbBackend::Postgres, sql.to_owned());
    let coordinator = db
        .query_one_raw(one(
            "SELECT coalesce((SELECT 'coordinator ' || nodename || ':' || nodeport \
             FROM pg_catalog.pg_dist_node WHERE groupid = 0 AND noderole = 'primary' LIMIT 1), \
             'coordinator') AS name",
        ))
        .await
        .map_err(db_err)?
        .map(|row| row.try_get::<String>("", "name"))
        .transpose()
        .map_err(db_err)?
        .unwrap_or_else(|| "coordinator".to_owned());
    let mut out = own_shortfalls(db, &coordinator).await?;
    let workers = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT nodename::text AS host, nodeport::int4 AS port, success, result \
             FROM pg_catalog.run_command_on_workers($1) ORDER BY nodename, nodeport",
            [SETTINGS_SQL.into()],
        ))
        .await
        .map_err(db_err)?;
    for row in &workers {
        let host: String = row.try_get("", "host").map_err(db_err)?;
        let port: i32 = row.try_get("", "port").map_err(db_err)?;
        let success: bool = row.try_get("", "success").map_err(db_err)?;
        let result: Option<String> = row.try_get("", "result").map_err(db_err)?;
        let result = result.unwrap_or_default();
        let subject = format!("worker {host}:{port}");
        out.extend(node_shortfalls(
            &subject,
            if success { Ok(&result) } else { Err(&result) },
        ));
    }
    out.extend(identity_shortfalls(db).await?);
    Ok(out)
}

/// As [`check`], for plain PostgreSQL (no `citus` extension needed): this one server's
/// settings, said of `server`, and the six tables' replica identities. What `migrate feed
/// log` and `migrate status` warn of where the near tier reads this server's log.
pub async fn check_server(db: &impl ConnectionTrait) -> Result<Vec<Shortfall>, MigrateError> {
    let mut out = own_shortfalls(db, "server").await?;
    out.extend(identity_shortfalls(db).await?);
    Ok(out)
}

/// What the server `db` is connected to lacks, said of `subject`.
async fn own_shortfalls(
    db: &impl ConnectionTrait,
    subject: &str,
) -> Result<Vec<Shortfall>, MigrateError> {
    let own: Option<String> = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            SETTINGS_SQL.to_owned(),
        ))
        .await
        .map_err(db_err)?
        .map(|row| row.try_get("", "s"))
        .transpose()
        .map_err(db_err)?;
    Ok(node_shortfalls(subject, own.as_deref().ok_or("no row")))
}

/// The tables whose replica identity does not carry their key, one shortfall each.
async fn identity_shortfalls(db: &impl ConnectionTrait) -> Result<Vec<Shortfall>, MigrateError> {
    Ok(replica_identities(db)
        .await?
        .iter()
        .filter_map(Identity::shortfall)
        .collect())
}

/// What a node lacks, from its answer to [`SETTINGS_SQL`] or the error it gave instead.
fn node_shortfalls(subject: &str, answer: Result<&str, &str>) -> Vec<Shortfall> {
    let unchecked = |why: &str| {
        vec![Shortfall::Unchecked {
            subject: subject.to_owned(),
            what: "the near tier's settings".to_owned(),
            why: why.trim().replace('\n', " "),
        }]
    };
    match answer {
        Ok(text) => match NodeSettings::parse(text) {
            Some(settings) => settings.shortfalls(subject),
            None => unchecked(&format!("unexpected answer {text:?}")),
        },
        Err(error) => unchecked(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready() -> NodeSettings {
        NodeSettings {
            wal_level: "logical".into(),
            plugins: Some("pgoutput, test_decoding".into()),
            max_slots: 10,
            used_slots: 0,
            plugin: Some(true),
            major: "15".into(),
        }
    }

    /// A node answer parses, absent settings included.
    #[test]
    fn a_node_answer_parses() {
        let parsed =
            NodeSettings::parse("replica\u{1f}\u{1e}\u{1f}10\u{1f}2\u{1f}?\u{1f}15").unwrap();
        assert_eq!(parsed.wal_level, "replica");
        assert_eq!(parsed.plugins, None);
        assert_eq!((parsed.max_slots, parsed.used_slots), (10, 2));
        assert_eq!(parsed.plugin, None);
        assert!(NodeSettings::parse("logical").is_none());
    }

    /// A ready node lacks nothing; each missing setting is one line naming the node, the
    /// setting, what it is and what it must be.
    #[test]
    fn each_missing_setting_is_one_line() {
        assert_eq!(ready().shortfalls("worker h:1"), Vec::new());
        let node = NodeSettings {
            wal_level: "replica".into(),
            plugins: Some("pgoutput".into()),
            max_slots: 2,
            used_slots: 2,
            plugin: Some(false),
            major: "15".into(),
        };
        let lines: Vec<String> = node
            .shortfalls("worker 127.0.0.1:9711")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            lines,
            [
                "worker 127.0.0.1:9711: wal_level is replica; the near tier needs logical \
                 (postgresql.conf, restart)",
                "worker 127.0.0.1:9711: output_plugin_libraries is 'pgoutput'; the near tier \
                 needs test_decoding listed (postgresql.conf, or ALTER SYSTEM SET \
                 output_plugin_libraries = pgoutput, test_decoding (a list, not one quoted \
                 string); then reload)",
                "worker 127.0.0.1:9711: test_decoding is not installed \
                 ($libdir/test_decoding.so is missing); the near tier needs it (PostgreSQL's \
                 contrib; on Debian part of postgresql-15)",
                "worker 127.0.0.1:9711: max_replication_slots is 2 with 2 in use; the near tier \
                 needs a free slot for each bot process (its temporary slot) \
                 (postgresql.conf, restart)",
            ]
        );
        // A server without the setting has no list to extend.
        let plain = NodeSettings {
            plugins: None,
            ..ready()
        };
        assert_eq!(plain.shortfalls("coordinator"), Vec::new());
    }

    /// The plugin list is read as PostgreSQL reads library lists.
    #[test]
    fn the_plugin_list_names_the_plugin() {
        assert!(lists("pgoutput, test_decoding", PLUGIN));
        assert!(lists("\"$libdir/test_decoding\"", PLUGIN));
        assert!(lists("test_decoding.so", PLUGIN));
        assert!(!lists("pgoutput, wal2json", PLUGIN));
        assert!(!lists("test_decoding2", PLUGIN));
        // ALTER SYSTEM SET output_plugin_libraries = 'pgoutput, test_decoding' (one quoted
        // string) makes one element the server shows quoted, and finds no such library.
        assert!(!lists("\"pgoutput, test_decoding\"", PLUGIN));
        assert!(lists("pgoutput, \"test_decoding\"", PLUGIN));
    }

    /// A replica identity carries the key when its columns include the key's, or it is full.
    #[test]
    fn an_identity_carries_the_key_or_says_so() {
        let identity = |kind, index: Option<&str>, columns: &[&str]| Identity {
            table: "strategic_character_performance".into(),
            kind,
            index: index.map(str::to_owned),
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
            key_index: "uq_character_perf_bot_window".into(),
            key: vec!["bot_name".into(), "time_window_hours".into()],
        };
        let key = identity(
            'i',
            Some("uq_character_perf_bot_window"),
            &["bot_name", "time_window_hours"],
        );
        assert!(key.carries_key() && key.shortfall().is_none());
        assert!(key.is_index("uq_character_perf_bot_window"));
        assert!(identity('f', None, &[]).carries_key());
        let pkey = identity('d', Some("strategic_character_performance_pkey"), &["id"]);
        assert_eq!(
            pkey.shortfall().unwrap().to_string(),
            "table strategic_character_performance: replica identity is the primary key (id); \
             the near tier needs one that carries its key (bot_name, time_window_hours), which a \
             deleted row's change must name (ALTER TABLE strategic_character_performance \
             REPLICA IDENTITY USING INDEX uq_character_perf_bot_window)"
        );
        assert!(!identity('n', None, &[]).carries_key());
        assert!(!identity('d', None, &[]).carries_key());
    }
}
