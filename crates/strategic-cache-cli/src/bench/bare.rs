//! The limit rows: the same statements as the repository runs, on the bare driver
//! (tokio-postgres, one prepared statement on one connection, no pool, no ORM).
//!
//! Each row is decoded as the bot would need it (text, numbers, timestamps and the JSON
//! parsed into `serde_json::Value`), the same work our rows do, so that the ratio measures
//! what the pool, sea-orm and the reader add rather than what parsing the payload costs.

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use strategic_cache::{Component, PgCacheRepository};
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::{Client, NoTls, Row, Statement};

/// One connection with the two statements prepared.
pub struct BareConn {
    client: Client,
    lookup: Statement,
    snapshot: Statement,
}

/// A `jsonb` (or `json`) value parsed with serde_json, as sqlx does for sea-orm.
struct Json(#[allow(dead_code)] serde_json::Value);

impl<'a> FromSql<'a> for Json {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        // jsonb's binary form is a version byte (1) then the JSON text.
        let text = if *ty == Type::JSONB {
            raw.get(1..).unwrap_or_default()
        } else {
            raw
        };
        Ok(Json(serde_json::from_slice(text)?))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB || *ty == Type::JSON
    }
}

/// Decodes every column of `row` from `from` on by its type; returns how many values were
/// non-null. Unknown types are an error, so that a schema change cannot make this row
/// silently cheaper than ours.
fn decode(row: &Row, from: usize) -> Result<usize> {
    let mut present = 0;
    for (i, column) in row.columns().iter().enumerate().skip(from) {
        let ty = column.type_();
        let some = match *ty {
            Type::TEXT | Type::VARCHAR => row.try_get::<_, Option<String>>(i)?.is_some(),
            Type::FLOAT8 => row.try_get::<_, Option<f64>>(i)?.is_some(),
            Type::INT4 => row.try_get::<_, Option<i32>>(i)?.is_some(),
            Type::BOOL => row.try_get::<_, Option<bool>>(i)?.is_some(),
            Type::TIMESTAMPTZ => row.try_get::<_, Option<Timestamp>>(i)?.is_some(),
            Type::JSONB | Type::JSON => row.try_get::<_, Option<Json>>(i)?.is_some(),
            Type::UUID => row.try_get::<_, Option<Uuid>>(i)?.is_some(),
            _ => anyhow::bail!("column {} has unexpected type {ty}", column.name()),
        };
        present += usize::from(some);
    }
    Ok(present)
}

/// A `timestamptz` as chrono's type: microseconds since 2000-01-01 (tokio-postgres's chrono
/// support is a feature we do not otherwise need).
struct Timestamp(#[allow(dead_code)] DateTime<Utc>);

impl<'a> FromSql<'a> for Timestamp {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let bytes: [u8; 8] = raw.try_into()?;
        let micros = i64::from_be_bytes(bytes);
        // 946684800 s: the PostgreSQL epoch (2000-01-01) in Unix time.
        DateTime::<Utc>::from_timestamp_micros(micros.saturating_add(946_684_800_000_000))
            .map(Timestamp)
            .ok_or_else(|| "timestamp out of range".into())
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }
}

/// A uuid read as its 16 bytes (tokio-postgres's uuid support is a feature we do not need).
struct Uuid;

impl<'a> FromSql<'a> for Uuid {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        if raw.len() == 16 {
            Ok(Uuid)
        } else {
            Err("uuid is not 16 bytes".into())
        }
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::UUID
    }
}

impl BareConn {
    /// Connects (plain TCP, as our pool does on loopback) and prepares both statements.
    pub async fn connect(url: &str) -> Result<BareConn> {
        let (client, connection) = tokio_postgres::connect(url, NoTls)
            .await
            .context("bare driver: cannot connect")?;
        tokio::spawn(async move {
            // The connection ends when the client is dropped; an error then is expected.
            let _ = connection.await;
        });
        let lookup = client
            .prepare(PgCacheRepository::lookup_statement(Component::MemoryHealth))
            .await?;
        let snapshot = client
            .prepare_typed(
                PgCacheRepository::snapshot_statement(),
                &[Type::TEXT, Type::TEXT, Type::INT4],
            )
            .await?;
        Ok(BareConn {
            client,
            lookup,
            snapshot,
        })
    }

    /// One memory-health read; the hit fraction (1 if a fresh row came back).
    pub async fn lookup(&self, user: &str, bot: &str) -> Result<f64> {
        let row = self.client.query_opt(&self.lookup, &[&user, &bot]).await?;
        let Some(row) = row else { return Ok(0.0) };
        decode(&row, 0)?;
        let fresh: bool = row.try_get("sc_fresh")?;
        Ok(if fresh { 1.0 } else { 0.0 })
    }

    /// One snapshot; the fraction of the six components that came back fresh.
    pub async fn snapshot(&self, user: &str, bot: &str, window: i32) -> Result<f64> {
        let row = self
            .client
            .query_opt(&self.snapshot, &[&user, &bot, &window])
            .await?;
        let Some(row) = row else { return Ok(0.0) };
        decode(&row, 0)?;
        let mut fresh = 0;
        for c in Component::ALL {
            let column = format!("c{}_sc_fresh", c.index());
            if row.try_get::<_, Option<bool>>(column.as_str())? == Some(true) {
                fresh += 1;
            }
        }
        Ok(f64::from(fresh) / 6.0)
    }
}
