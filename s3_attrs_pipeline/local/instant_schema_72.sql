-- InstantDB's tables as of its migration 72, as far as the S3 attrs backfill touches them
-- (see shared/instant-schema.md): columns, constraints, indexes and the location-id trigger.

CREATE TYPE checked_data_type AS ENUM ('string', 'number', 'boolean', 'date');

CREATE TABLE instant_users (
  id uuid PRIMARY KEY,
  email text NOT NULL UNIQUE,
  created_at timestamp DEFAULT now()
);

CREATE TABLE apps (
  id uuid PRIMARY KEY,
  creator_id uuid NOT NULL REFERENCES instant_users (id) ON DELETE CASCADE,
  title text NOT NULL,
  created_at timestamp DEFAULT now()
);

CREATE TABLE attrs (
  id uuid PRIMARY KEY,
  app_id uuid NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
  value_type text NOT NULL,
  cardinality text NOT NULL,
  is_unique boolean NOT NULL,
  is_indexed boolean NOT NULL,
  forward_ident uuid NOT NULL,
  reverse_ident uuid,
  inferred_types bit(32),
  on_delete text,
  checked_data_type checked_data_type,
  checking_data_type boolean,
  indexing boolean,
  setting_unique boolean,
  on_delete_reverse text,
  is_required boolean DEFAULT false,
  etype text NOT NULL,
  label text NOT NULL,
  reverse_etype text,
  reverse_label text,
  UNIQUE (app_id, etype, label),
  UNIQUE (app_id, reverse_etype, reverse_label)
);

CREATE TABLE idents (
  id uuid PRIMARY KEY,
  app_id uuid NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
  attr_id uuid NOT NULL REFERENCES attrs (id) ON DELETE CASCADE,
  etype text NOT NULL,
  label text NOT NULL,
  UNIQUE (app_id, etype, label)
);

CREATE FUNCTION json_null_to_null(v jsonb) RETURNS jsonb
  LANGUAGE sql IMMUTABLE AS $$ SELECT CASE WHEN v = 'null'::jsonb THEN NULL ELSE v END $$;

CREATE FUNCTION triples_extract_number_value(v jsonb) RETURNS double precision
  LANGUAGE sql IMMUTABLE AS $$ SELECT CASE WHEN jsonb_typeof(v) = 'number' THEN (v #>> '{}')::double precision END $$;

CREATE FUNCTION triples_extract_string_value(v jsonb) RETURNS text
  LANGUAGE sql IMMUTABLE AS $$ SELECT CASE WHEN jsonb_typeof(v) = 'string' THEN v #>> '{}' END $$;

CREATE FUNCTION triples_valid_value(data_type checked_data_type, v jsonb) RETURNS boolean
  LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE data_type
      WHEN 'string' THEN jsonb_typeof(v) IN ('string', 'null')
      WHEN 'number' THEN jsonb_typeof(v) IN ('number', 'null')
      WHEN 'boolean' THEN jsonb_typeof(v) IN ('boolean', 'null')
      WHEN 'date' THEN jsonb_typeof(v) IN ('number', 'string', 'null')
      ELSE true
    END $$;

CREATE TABLE triples (
  app_id uuid NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
  entity_id uuid NOT NULL,
  attr_id uuid NOT NULL REFERENCES attrs (id) ON DELETE CASCADE,
  value jsonb NOT NULL,
  value_md5 text NOT NULL,
  ea boolean NOT NULL,
  eav boolean NOT NULL,
  av boolean NOT NULL,
  ave boolean NOT NULL,
  vae boolean NOT NULL,
  created_at bigint NOT NULL DEFAULT (extract(epoch FROM clock_timestamp()) * 1000),
  checked_data_type checked_data_type,
  PRIMARY KEY (app_id, entity_id, attr_id, value_md5),
  CONSTRAINT indexed_values_are_constrained_to_1kb
    CHECK (NOT (ave OR av OR eav OR vae) OR octet_length(value::text) <= 1024),
  CONSTRAINT valid_value_data_type CHECK (triples_valid_value(checked_data_type, value))
);

CREATE UNIQUE INDEX ea_index ON triples (app_id, entity_id, attr_id) WHERE ea;
CREATE UNIQUE INDEX av_index ON triples (app_id, attr_id, json_null_to_null(value)) INCLUDE (entity_id) WHERE av;
CREATE INDEX ave_index ON triples (app_id, attr_id, value) WHERE ave;
CREATE INDEX vae_index ON triples (app_id, value, attr_id) WHERE vae;
CREATE INDEX eav_index ON triples (app_id, entity_id, attr_id, value) WHERE eav;
CREATE INDEX triples_created_at_idx ON triples (app_id, attr_id, created_at);
CREATE INDEX triples_attr_id ON triples (attr_id);
CREATE INDEX triples_app_id ON triples (app_id);
CREATE INDEX ave_index_number ON triples (app_id, attr_id, triples_extract_number_value(value))
  WHERE ave AND checked_data_type = 'number';
CREATE INDEX ave_index_string ON triples (app_id, attr_id, triples_extract_string_value(value))
  WHERE ave AND checked_data_type = 'string';

CREATE TABLE config (
  k text PRIMARY KEY NOT NULL,
  v json NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION config_touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.updated_at := now();
  RETURN NEW;
END $$;

CREATE TRIGGER config_updated_at BEFORE UPDATE ON config
  FOR EACH ROW EXECUTE FUNCTION config_touch_updated_at();

-- Deleting or changing a $files.location-id triple makes InstantDB delete the S3 object.
CREATE TABLE app_files_to_sweep (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  app_id uuid NOT NULL,
  location_id text NOT NULL,
  created_at timestamp NOT NULL DEFAULT now(),
  UNIQUE (app_id, location_id)
);

CREATE FUNCTION queue_files_to_sweep() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF OLD.attr_id = '96653230-13ff-ffff-2a34-b40fffffffff' THEN
    IF TG_OP = 'DELETE' OR NEW.value IS DISTINCT FROM OLD.value THEN
      INSERT INTO app_files_to_sweep (app_id, location_id) VALUES (OLD.app_id, OLD.value #>> '{}')
      ON CONFLICT DO NOTHING;
    END IF;
  END IF;
  RETURN NULL;
END $$;

CREATE TRIGGER triples_location_id_sweep AFTER DELETE OR UPDATE ON triples
  FOR EACH ROW EXECUTE FUNCTION queue_files_to_sweep();

-- One row per server transaction that writes triples (since migration 3), in the same Postgres
-- transaction: InstantDB's invalidator ignores WAL records without one.
CREATE TABLE transactions (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  app_id uuid NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
  created_at timestamp NOT NULL DEFAULT now()
);
