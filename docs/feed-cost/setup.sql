SET client_min_messages = warning;
-- Copies of strategic_memory_health for docs/SCALING.md, "What the change feed costs a write",
-- in a database migrated to the last migration (its own table has migration 6's triggers).
DROP TABLE IF EXISTS fc_plain, fc_m4, fc_notify, fc_rowtrig, fc_stmtmin;
CREATE TABLE fc_plain (LIKE strategic_memory_health INCLUDING DEFAULTS, UNIQUE (user_id, bot_name));
CREATE TABLE fc_m4 (LIKE fc_plain INCLUDING ALL);
CREATE TABLE fc_notify (LIKE fc_plain INCLUDING ALL);
CREATE TABLE fc_rowtrig (LIKE fc_plain INCLUDING ALL);
CREATE TABLE fc_stmtmin (LIKE fc_plain INCLUDING ALL);
-- Migration 4's triggers (its function is still there after migration 6).
CREATE TRIGGER fc_m4_ins AFTER INSERT ON fc_m4 REFERENCING NEW TABLE AS sc_new
  FOR EACH STATEMENT EXECUTE FUNCTION strategic_cache_notify('0', 'user_id');
CREATE TRIGGER fc_m4_upd AFTER UPDATE ON fc_m4 REFERENCING OLD TABLE AS sc_old NEW TABLE AS sc_new
  FOR EACH STATEMENT EXECUTE FUNCTION strategic_cache_notify('0', 'user_id');
-- A row trigger sending keys only.
CREATE OR REPLACE FUNCTION fc_row_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify(strategic_cache_channel(NEW.bot_name),
    '{"c":0,"b":' || to_json(NEW.bot_name)::text || ',"k":[' || to_json(NEW.user_id)::text || ']}');
  RETURN NULL;
END $$;
CREATE TRIGGER fc_row AFTER INSERT OR UPDATE ON fc_rowtrig FOR EACH ROW EXECUTE FUNCTION fc_row_notify();
-- The least a statement trigger can do: one constant notification.
CREATE OR REPLACE FUNCTION fc_stmt_min() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('strategic_cache_x', 'x');
  RETURN NULL;
END $$;
CREATE TRIGGER fc_stmt AFTER INSERT OR UPDATE ON fc_stmtmin FOR EACH STATEMENT EXECUTE FUNCTION fc_stmt_min();
