-- InstantDB's schema today (its migrations 73 to 124), as far as the S3 attrs backfill meets it,
-- applied on top of instant_schema_72.sql as a real database gets there. Written from
-- shared/instant-schema.md: the indexes that replaced ave/eav/vae_index, the statement-level
-- triggers on triples (size accounting, sweeping, entity messages), apps' status and org owner.

CREATE FUNCTION json_uuid_to_uuid(v jsonb) RETURNS uuid
  LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(v) = 'string'
                 AND (v #>> '{}') ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                THEN (v #>> '{}')::uuid END $$;

-- Lookups by value can be index-only (90, 91); refs are indexed as uuids (73, 74).
CREATE INDEX ave_with_e_index ON triples (app_id, attr_id, value, entity_id) WHERE ave;
DROP INDEX ave_index;
CREATE INDEX eav_uuid_index ON triples (app_id, entity_id, attr_id, json_uuid_to_uuid(value)) WHERE eav;
DROP INDEX eav_index;
CREATE INDEX vae_uuid_index ON triples (app_id, json_uuid_to_uuid(value), attr_id) WHERE vae;
DROP INDEX vae_index;
ALTER INDEX ave_index_number RENAME TO triples_number_type_idx;
ALTER INDEX ave_index_string RENAME TO triples_string_type_idx;

ALTER TABLE triples ADD COLUMN pg_size integer;

-- An app belongs to a user or an org, exactly one of them (79, 89), and has a status (115).
ALTER TABLE apps ALTER COLUMN creator_id DROP NOT NULL;
ALTER TABLE apps ADD COLUMN org_id uuid;
ALTER TABLE apps ADD CONSTRAINT apps_owned_by_user_or_org CHECK ((creator_id IS NULL) <> (org_id IS NULL));
ALTER TABLE apps ADD COLUMN status text NOT NULL DEFAULT 'active'
  CHECK (status IN ('active', 'read-only', 'disabled'));

-- Size accounting: every statement on triples adds one row per (app, attr) it touched (114).
CREATE TABLE triples_size_updates (
  id bigserial PRIMARY KEY,
  app_id uuid NOT NULL,
  attr_id uuid NOT NULL,
  pg_size bigint NOT NULL,
  files_size bigint
);

-- Entity messages logged to a table instead of the WAL, bucketed by hour for cheap truncation.
CREATE TABLE wal_logs (
  id uuid NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  hour_bucket integer NOT NULL,
  prefix text NOT NULL,
  content text NOT NULL
) PARTITION BY LIST (hour_bucket);
DO $$
BEGIN
  FOR bucket IN 0..7 LOOP
    EXECUTE format('CREATE TABLE wal_logs_%s PARTITION OF wal_logs FOR VALUES IN (%s)', bucket, bucket);
  END LOOP;
END $$;

-- The sweep moved from a row trigger into the statement triggers below.
DROP TRIGGER triples_location_id_sweep ON triples;
DROP FUNCTION queue_files_to_sweep();

-- The entities a statement touched, as one `update_ents`/`delete_ents` message: each entity's
-- cardinality-one attrs of its etype, as they are after the statement. Only when the transaction
-- set `instant.wal_msg_app_id`; to `wal_logs` when it also set `instant.wal_msg_log_to_table`,
-- else to the WAL (pg_logical_emit_message). `touched` holds (attr_id, entity_id, value, vae).
CREATE FUNCTION triples_emit_entity_message(prefix text, touched jsonb) RETURNS void
  LANGUAGE plpgsql AS $$
DECLARE
  app uuid := nullif(current_setting('instant.wal_msg_app_id', true), '')::uuid;
  to_table boolean := coalesce(nullif(current_setting('instant.wal_msg_log_to_table', true), '')::boolean, false);
  message text;
BEGIN
  IF app IS NULL THEN
    RETURN;
  END IF;
  WITH rows AS (
    SELECT (r->>'attr_id')::uuid AS attr_id, (r->>'entity_id')::uuid AS entity_id, r->'value' AS value,
           (r->>'vae')::boolean AS vae
    FROM jsonb_array_elements(touched) r
  ), entities AS (
    SELECT a.etype, r.entity_id FROM rows r
    JOIN attrs a ON a.id = r.attr_id AND a.app_id IN (app, 'a1111111-1111-1111-1111-111111111ca7')
    UNION
    SELECT a.reverse_etype, json_uuid_to_uuid(r.value) FROM rows r
    JOIN attrs a ON a.id = r.attr_id AND a.app_id IN (app, 'a1111111-1111-1111-1111-111111111ca7')
    WHERE r.vae
  ), by_entity AS (
    SELECT e.etype, t.entity_id, json_object_agg(t.attr_id::text, t.value) AS attrs
    FROM entities e
    JOIN attrs a ON a.etype = e.etype AND a.cardinality = 'one'
                AND a.app_id IN (app, 'a1111111-1111-1111-1111-111111111ca7')
    JOIN triples t ON t.app_id = app AND t.entity_id = e.entity_id AND t.attr_id = a.id AND t.ea
    GROUP BY e.etype, t.entity_id
  )
  SELECT json_agg(json_build_array(etype, entity_id, attrs))::text INTO message FROM by_entity;
  IF message IS NULL THEN
    RETURN;
  END IF;
  IF to_table THEN
    INSERT INTO wal_logs (id, created_at, hour_bucket, prefix, content)
    VALUES (gen_random_uuid(), now(), extract(hour FROM now() AT TIME ZONE 'UTC')::integer % 8, prefix, message);
  ELSE
    PERFORM pg_logical_emit_message(true, prefix, message);
  END IF;
END $$;

CREATE FUNCTION triples_after_insert_statement() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM triples_emit_entity_message('update_ents', (
    SELECT coalesce(jsonb_agg(jsonb_build_object('attr_id', attr_id, 'entity_id', entity_id, 'value', value,
                                                 'vae', vae)), '[]')
    FROM newrows));
  INSERT INTO triples_size_updates (app_id, attr_id, pg_size, files_size)
  SELECT n.app_id, n.attr_id, sum(pg_column_size(n.*)),
         sum(CASE WHEN n.attr_id = '96653230-13ff-ffff-2a35-24609fffffff'
                  THEN triples_extract_number_value(n.value) ELSE 0 END)::bigint
  FROM newrows n GROUP BY n.app_id, n.attr_id;
  RETURN NULL;
END $$;

CREATE FUNCTION triples_after_update_statement() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  -- A location-id that an update changed or removed: its object is deleted.
  INSERT INTO app_files_to_sweep (app_id, location_id)
  SELECT o.app_id, o.value #>> '{}' FROM oldrows o
  WHERE o.attr_id = '96653230-13ff-ffff-2a34-b40fffffffff' AND o.value #>> '{}' IS NOT NULL
    AND NOT EXISTS (SELECT 1 FROM newrows n
                    WHERE n.attr_id = o.attr_id AND n.app_id = o.app_id AND n.value = o.value)
  ON CONFLICT DO NOTHING;
  PERFORM triples_emit_entity_message('update_ents', (
    SELECT coalesce(jsonb_agg(jsonb_build_object('attr_id', attr_id, 'entity_id', entity_id, 'value', value,
                                                 'vae', vae)), '[]')
    FROM newrows));
  INSERT INTO triples_size_updates (app_id, attr_id, pg_size, files_size)
  SELECT app_id, attr_id, sum(pg_delta), sum(files_delta)::bigint
  FROM (
    SELECT n.app_id, n.attr_id, pg_column_size(n.*)::bigint AS pg_delta,
           CASE WHEN n.attr_id = '96653230-13ff-ffff-2a35-24609fffffff'
                THEN triples_extract_number_value(n.value) ELSE 0 END AS files_delta
    FROM newrows n
    UNION ALL
    SELECT o.app_id, o.attr_id, -pg_column_size(o.*)::bigint,
           CASE WHEN o.attr_id = '96653230-13ff-ffff-2a35-24609fffffff'
                THEN -triples_extract_number_value(o.value) ELSE 0 END
    FROM oldrows o
  ) deltas
  GROUP BY app_id, attr_id
  HAVING sum(pg_delta) <> 0 OR sum(files_delta) <> 0;
  RETURN NULL;
END $$;

CREATE FUNCTION triples_after_delete_statement() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO app_files_to_sweep (app_id, location_id)
  SELECT o.app_id, o.value #>> '{}' FROM oldrows o WHERE o.attr_id = '96653230-13ff-ffff-2a34-b40fffffffff'
  ON CONFLICT DO NOTHING;
  PERFORM triples_emit_entity_message('delete_ents', (
    SELECT coalesce(jsonb_agg(jsonb_build_object('attr_id', attr_id, 'entity_id', entity_id, 'value', value,
                                                 'vae', vae)), '[]')
    FROM oldrows));
  INSERT INTO triples_size_updates (app_id, attr_id, pg_size, files_size)
  SELECT o.app_id, o.attr_id, -sum(pg_column_size(o.*)),
         -sum(CASE WHEN o.attr_id = '96653230-13ff-ffff-2a35-24609fffffff'
                   THEN triples_extract_number_value(o.value) ELSE 0 END)::bigint
  FROM oldrows o GROUP BY o.app_id, o.attr_id;
  RETURN NULL;
END $$;

CREATE TRIGGER triples_batched_after_insert AFTER INSERT ON triples
  REFERENCING NEW TABLE AS newrows FOR EACH STATEMENT EXECUTE FUNCTION triples_after_insert_statement();
CREATE TRIGGER triples_batched_after_update AFTER UPDATE ON triples
  REFERENCING NEW TABLE AS newrows OLD TABLE AS oldrows
  FOR EACH STATEMENT EXECUTE FUNCTION triples_after_update_statement();
CREATE TRIGGER triples_batched_after_delete AFTER DELETE ON triples
  REFERENCING OLD TABLE AS oldrows FOR EACH STATEMENT EXECUTE FUNCTION triples_after_delete_statement();
