//! Adds `strategic_refresh_queue`, the worker scheduler's queue of recompute requests.
//!
//! One row per cache key (the unique key deduplicates requests); workers claim due rows with
//! `FOR UPDATE SKIP LOCKED` and a lease (`leased_until`), so several worker processes share the
//! work and a crashed worker's claims are taken over when its lease runs out.

use entity::refresh_queue::{Column, Entity};
use sea_orm_migration::prelude::*;

/// The second migration.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20251124_000002_create_refresh_queue"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let now = || Expr::cust("now()");
        manager
            .create_table(
                Table::create()
                    .table(Entity)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Column::Id)
                            .big_integer()
                            .not_null()
                            .primary_key()
                            .extra("GENERATED ALWAYS AS IDENTITY"),
                    )
                    .col(ColumnDef::new(Column::Component).text().not_null())
                    .col(ColumnDef::new(Column::UserId).text().not_null().default(""))
                    .col(ColumnDef::new(Column::BotName).text().not_null())
                    .col(
                        ColumnDef::new(Column::TimeWindowHours)
                            .integer()
                            .not_null()
                            .default(0),
                    )
                    .col(ColumnDef::new(Column::Reason).text().not_null())
                    .col(
                        ColumnDef::new(Column::DueAt)
                            .timestamp_with_time_zone()
                            .not_null()
                            .default(now()),
                    )
                    .col(
                        ColumnDef::new(Column::RequestedAt)
                            .timestamp_with_time_zone()
                            .not_null()
                            .default(now()),
                    )
                    .col(
                        ColumnDef::new(Column::LastDemandAt)
                            .timestamp_with_time_zone()
                            .not_null()
                            .default(now()),
                    )
                    .col(
                        ColumnDef::new(Column::Attempts)
                            .integer()
                            .not_null()
                            .default(0),
                    )
                    .col(ColumnDef::new(Column::LeasedBy).text())
                    .col(ColumnDef::new(Column::LeasedUntil).timestamp_with_time_zone())
                    .col(ColumnDef::new(Column::LastError).text())
                    .index(
                        Index::create()
                            .name("uq_refresh_queue_key")
                            .col(Column::Component)
                            .col(Column::UserId)
                            .col(Column::BotName)
                            .col(Column::TimeWindowHours)
                            .unique(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_refresh_queue_due")
                    .table(Entity)
                    .col(Column::DueAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Entity).if_exists().to_owned())
            .await
    }
}
