//! Creates the six strategic cache tables exactly as `docs/SCHEMA.md` gives them.
//!
//! The tables are built from the entities' `Column` enums, so a column the entity does not name
//! cannot be created here, and the schema test compares the result with the contract column by
//! column. The trade-off is that this migration must be kept compiling if an entity column is
//! ever renamed; a later migration that renames one adds the old name as a local `Iden` here.
//!
//! Adopting databases of the old platform: its Alembic migration created the same tables. Where
//! a table already exists, this migration checks that its columns are the contract's (name,
//! type, nullability) and leaves it alone, so the Rust services can run beside the Python ones;
//! a table that exists with another shape stops the migration with a message naming the
//! difference, rather than being silently accepted or altered.

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm;

/// The first migration.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20251124_000001_create_strategic_cache_tables"
    }
}

/// A column of a cache table: its definition and its `COMMENT ON COLUMN` text, if any.
struct Col {
    def: ColumnDef,
    comment: Option<&'static str>,
    /// `information_schema.columns.data_type`, for checking an adopted table.
    pg_type: &'static str,
    nullable: bool,
}

fn text(col: impl IntoIden, nullable: bool, comment: Option<&'static str>) -> Col {
    let mut def = ColumnDef::new(col);
    def.text();
    if !nullable {
        def.not_null();
    }
    Col {
        def,
        comment,
        pg_type: "text",
        nullable,
    }
}

fn jsonb(col: impl IntoIden, nullable: bool, comment: Option<&'static str>) -> Col {
    let mut def = ColumnDef::new(col);
    def.json_binary();
    if !nullable {
        def.not_null();
    }
    Col {
        def,
        comment,
        pg_type: "jsonb",
        nullable,
    }
}

fn double(col: impl IntoIden, comment: Option<&'static str>) -> Col {
    let mut def = ColumnDef::new(col);
    def.double();
    Col {
        def,
        comment,
        pg_type: "double precision",
        nullable: true,
    }
}

/// One cache table: the columns between the id and the two timestamps, and its key names.
struct CacheTable {
    table: DynIden,
    columns: Vec<Col>,
    unique_name: &'static str,
    unique_cols: [DynIden; 2],
    index_name: &'static str,
    expires_comment: Option<&'static str>,
}

macro_rules! common {
    ($entity:ident) => {
        (
            entity::$entity::Column::Id.into_iden(),
            entity::$entity::Column::ComputedAt.into_iden(),
            entity::$entity::Column::ExpiresAt.into_iden(),
        )
    };
}

fn tables() -> Vec<CacheTable> {
    use entity::{
        character_performance as cp, conversation_patterns as cv, engagement_opportunities as eo,
        memory_behavior as mb, memory_health as mh, personality_profiles as pp,
    };
    vec![
        CacheTable {
            table: mh::Entity.into_iden(),
            columns: vec![
                text(mh::Column::UserId, false, None),
                text(mh::Column::BotName, false, None),
                jsonb(
                    mh::Column::MemorySnapshot,
                    false,
                    Some("Top stale/fresh memories"),
                ),
                double(mh::Column::AvgMemoryAgeHours, None),
                text(
                    mh::Column::RetrievalFrequencyTrend,
                    true,
                    Some("increasing, stable, declining"),
                ),
                jsonb(
                    mh::Column::ForgettingRiskMemories,
                    true,
                    Some("Array of memory IDs at risk"),
                ),
            ],
            unique_name: "uq_memory_health_user_bot",
            unique_cols: [
                mh::Column::UserId.into_iden(),
                mh::Column::BotName.into_iden(),
            ],
            index_name: "idx_memory_health_expires",
            expires_comment: Some("NOW() + 5 minutes"),
        },
        CacheTable {
            table: cp::Entity.into_iden(),
            columns: vec![
                text(cp::Column::BotName, false, None),
                Col {
                    def: ColumnDef::new(cp::Column::TimeWindowHours)
                        .integer()
                        .not_null()
                        .default(168)
                        .to_owned(),
                    comment: Some("Default: 7 days"),
                    pg_type: "integer",
                    nullable: false,
                },
                double(cp::Column::EngagementScoreAvg, None),
                double(cp::Column::SatisfactionScoreAvg, None),
                double(cp::Column::CoherenceScoreAvg, None),
                double(cp::Column::PersonalityConsistencyIndex, Some("0.0-1.0")),
                text(
                    cp::Column::QualityTrend,
                    true,
                    Some("improving, stable, declining"),
                ),
                jsonb(
                    cp::Column::RecentAnomalies,
                    true,
                    Some("Array of detected issues"),
                ),
            ],
            unique_name: "uq_character_perf_bot_window",
            unique_cols: [
                cp::Column::BotName.into_iden(),
                cp::Column::TimeWindowHours.into_iden(),
            ],
            index_name: "idx_character_perf_expires",
            expires_comment: None,
        },
        CacheTable {
            table: pp::Entity.into_iden(),
            columns: vec![
                text(pp::Column::UserId, false, None),
                text(pp::Column::BotName, false, None),
                jsonb(
                    pp::Column::DominantTraits,
                    true,
                    Some("Array of {trait, frequency, effectiveness}"),
                ),
                jsonb(
                    pp::Column::UserResponsePatterns,
                    true,
                    Some("How user reacts to each trait"),
                ),
                jsonb(
                    pp::Column::AdaptationSuggestions,
                    true,
                    Some("Recommended personality adjustments"),
                ),
                jsonb(
                    pp::Column::TraitEvolutionHistory,
                    true,
                    Some("30-day trait activation trends"),
                ),
            ],
            unique_name: "uq_personality_user_bot",
            unique_cols: [
                pp::Column::UserId.into_iden(),
                pp::Column::BotName.into_iden(),
            ],
            index_name: "idx_personality_expires",
            expires_comment: None,
        },
        CacheTable {
            table: cv::Entity.into_iden(),
            columns: vec![
                text(cv::Column::UserId, false, None),
                text(cv::Column::BotName, false, None),
                jsonb(
                    cv::Column::RecentTopics,
                    true,
                    Some("Array of {topic, start_time, end_time}"),
                ),
                double(cv::Column::AvgTopicDurationMinutes, None),
                double(
                    cv::Column::ContextSwitchFrequency,
                    Some("switches per hour"),
                ),
                double(cv::Column::PredictedSwitchLikelihood, Some("0.0-1.0")),
                jsonb(
                    cv::Column::TopicTransitionGraph,
                    true,
                    Some("Common topic → topic paths"),
                ),
            ],
            unique_name: "uq_conv_patterns_user_bot",
            unique_cols: [
                cv::Column::UserId.into_iden(),
                cv::Column::BotName.into_iden(),
            ],
            index_name: "idx_conv_patterns_expires",
            expires_comment: None,
        },
        CacheTable {
            table: mb::Entity.into_iden(),
            columns: vec![
                text(mb::Column::UserId, false, None),
                text(mb::Column::BotName, false, None),
                jsonb(
                    mb::Column::ForgettingCurveParams,
                    true,
                    Some("Model parameters"),
                ),
                jsonb(
                    mb::Column::HighRetentionMemories,
                    true,
                    Some("Memories with strong recall"),
                ),
                jsonb(
                    mb::Column::LowRetentionMemories,
                    true,
                    Some("Memories at risk of forgetting"),
                ),
                double(
                    mb::Column::RecallSimulationScore,
                    Some("How human-like memory access is"),
                ),
            ],
            unique_name: "uq_memory_behavior_user_bot",
            unique_cols: [
                mb::Column::UserId.into_iden(),
                mb::Column::BotName.into_iden(),
            ],
            index_name: "idx_memory_behavior_expires",
            expires_comment: None,
        },
        CacheTable {
            table: eo::Entity.into_iden(),
            columns: vec![
                text(eo::Column::UserId, false, None),
                text(eo::Column::BotName, false, None),
                double(
                    eo::Column::OptimalTimingHours,
                    Some("Hours since last message to reach out"),
                ),
                double(
                    eo::Column::ReceptivityScore,
                    Some("0.0-1.0, how likely user is receptive"),
                ),
                jsonb(
                    eo::Column::SuggestedTopics,
                    true,
                    Some("Array of topics likely to engage user"),
                ),
                double(eo::Column::LastEngagementGapHours, None),
                double(
                    eo::Column::ProactiveSuccessRate,
                    Some("Historical success of proactive messages"),
                ),
            ],
            unique_name: "uq_engagement_user_bot",
            unique_cols: [
                eo::Column::UserId.into_iden(),
                eo::Column::BotName.into_iden(),
            ],
            index_name: "idx_engagement_expires",
            expires_comment: None,
        },
    ]
}

/// The id, computed_at and expires_at columns every table shares, by table.
fn common_columns(table: &str) -> (DynIden, DynIden, DynIden) {
    match table {
        "strategic_memory_health" => common!(memory_health),
        "strategic_character_performance" => common!(character_performance),
        "strategic_personality_profiles" => common!(personality_profiles),
        "strategic_conversation_patterns" => common!(conversation_patterns),
        "strategic_memory_behavior" => common!(memory_behavior),
        _ => common!(engagement_opportunities),
    }
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for spec in tables() {
            let name = spec.table.to_string();
            if manager.has_table(&name).await? {
                check_adopted(manager, &name, &spec).await?;
            } else {
                create(manager, &name, spec).await?;
            }
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for spec in tables().into_iter().rev() {
            manager
                .drop_table(Table::drop().table(spec.table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}

async fn create(manager: &SchemaManager<'_>, name: &str, spec: CacheTable) -> Result<(), DbErr> {
    let (id, computed_at, expires_at) = common_columns(name);
    let mut table = Table::create();
    table.table(spec.table.clone()).col(
        ColumnDef::new(id)
            .uuid()
            .not_null()
            .default(Expr::cust("gen_random_uuid()"))
            .primary_key(),
    );
    let mut comments = Vec::new();
    for col in spec.columns {
        if let Some(comment) = col.comment {
            comments.push((col.def.get_column_name(), comment));
        }
        table.col(col.def);
    }
    table
        .col(
            ColumnDef::new(computed_at)
                .timestamp_with_time_zone()
                .not_null()
                .default(Expr::cust("now()")),
        )
        .col(
            ColumnDef::new(expires_at.clone())
                .timestamp_with_time_zone()
                .not_null(),
        )
        .index(
            Index::create()
                .name(spec.unique_name)
                .col(spec.unique_cols[0].clone())
                .col(spec.unique_cols[1].clone())
                .unique(),
        );
    manager.create_table(table.to_owned()).await?;
    manager
        .create_index(
            Index::create()
                .name(spec.index_name)
                .table(spec.table)
                .col(expires_at.clone())
                .if_not_exists()
                .to_owned(),
        )
        .await?;
    if let Some(comment) = spec.expires_comment {
        comments.push((expires_at.to_string(), comment));
    }
    let db = manager.get_connection();
    for (column, comment) in comments {
        // COMMENT ON takes no bind parameters; both parts are compile-time constants, quoted.
        let sql = format!(
            "COMMENT ON COLUMN {}.{} IS {}",
            quote(name),
            quote(&column),
            literal(comment)
        );
        db.execute_raw(Statement::from_string(DbBackend::Postgres, sql))
            .await?;
    }
    Ok(())
}

/// Checks that a table the old platform created has the contract's columns, so that adopting it
/// is safe. Returns a migration error naming every difference otherwise.
async fn check_adopted(
    manager: &SchemaManager<'_>,
    name: &str,
    spec: &CacheTable,
) -> Result<(), DbErr> {
    let (id, computed_at, expires_at) = common_columns(name);
    let mut expected: Vec<(String, &str, bool)> = vec![(id.to_string(), "uuid", false)];
    expected.extend(
        spec.columns
            .iter()
            .map(|c| (c.def.get_column_name(), c.pg_type, c.nullable)),
    );
    expected.push((computed_at.to_string(), "timestamp with time zone", false));
    expected.push((expires_at.to_string(), "timestamp with time zone", false));

    let rows = manager
        .get_connection()
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT column_name::text AS name, data_type::text AS ty, is_nullable = 'YES' AS nullable \
             FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
            [name.into()],
        ))
        .await?;
    let mut found = Vec::with_capacity(rows.len());
    for row in rows {
        let col: String = row.try_get("", "name")?;
        let ty: String = row.try_get("", "ty")?;
        let nullable: bool = row.try_get("", "nullable")?;
        found.push((col, ty, nullable));
    }
    let mut problems = Vec::new();
    for (col, ty, nullable) in &expected {
        match found.iter().find(|(c, _, _)| c == col) {
            None => problems.push(format!("column {col} is missing")),
            Some((_, found_ty, found_null)) => {
                if found_ty != ty {
                    problems.push(format!("column {col} is {found_ty}, expected {ty}"));
                }
                if found_null != nullable {
                    let want = if *nullable { "nullable" } else { "NOT NULL" };
                    problems.push(format!("column {col} should be {want}"));
                }
            }
        }
    }
    for (col, _, _) in &found {
        if !expected.iter().any(|(c, _, _)| c == col) {
            problems.push(format!("unexpected column {col}"));
        }
    }
    let has_key = manager
        .get_connection()
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT 1 AS one FROM pg_constraint \
             WHERE conname = $1 AND contype = 'u' AND conrelid = to_regclass($2)",
            [spec.unique_name.into(), name.into()],
        ))
        .await?
        .is_some();
    if !has_key {
        problems.push(format!("UNIQUE constraint {} is missing", spec.unique_name));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(DbErr::Migration(format!(
            "table {name} already exists but does not match the strategic cache schema ({}); \
             nothing was changed: fix or drop the table, then migrate again",
            problems.join("; ")
        )))
    }
}
