-- The content store: one row per piece of content, soft-deleted, versioned by Postgres itself.
CREATE TABLE content (
    content_type text NOT NULL,
    -- '' for public (shared) content types; the owner for private ones, so that two tenants' note "n1"
    -- are two rows and neither can see, overwrite or even detect the other's.
    owner_key text NOT NULL DEFAULT '',
    id text NOT NULL,
    owner_id text,
    text text NOT NULL,
    metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
    content_hash text NOT NULL,
    version bigint NOT NULL DEFAULT 1,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    deleted_at timestamptz,
    point_id uuid NOT NULL,
    PRIMARY KEY (content_type, owner_key, id)
);
-- The audit's merge-join walks a content type in point-id order; repair walks it by change time.
CREATE UNIQUE INDEX content_by_point ON content (content_type, point_id);
CREATE INDEX content_by_change ON content (content_type, updated_at, point_id);

-- Versions and change times come from the database, never from a client's clock: every write is
-- one more version, stamped with the time it happened.
CREATE FUNCTION content_next_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := OLD.version + 1;
    NEW.updated_at := clock_timestamp();
    RETURN NEW;
END;
$$;
CREATE TRIGGER content_versioned BEFORE UPDATE ON content
    FOR EACH ROW EXECUTE FUNCTION content_next_version();

-- Where the hourly repair got to, per content type: a failed run leaves it where it was.
CREATE TABLE repair_checkpoints (
    content_type text PRIMARY KEY,
    checked_until timestamptz NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Inconsistencies the audit has seen and not yet seen resolved: the age of the oldest is the gap.
CREATE TABLE consistency_gaps (
    collection text NOT NULL,
    point_id uuid NOT NULL,
    kind text NOT NULL CHECK (kind IN ('missing', 'orphaned', 'stale')),
    first_seen timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_seen timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (collection, point_id)
);
