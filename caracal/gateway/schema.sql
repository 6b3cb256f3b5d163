-- caracal-gateway schema: the resource table the gateway reads (SPEC section 4).
--
-- Idempotent: apply it as often as you like, with
--     psql -v ON_ERROR_STOP=1 -f etc/schema.sql "$DATABASE_URL"
-- or `caracal-gateway-admin migrate`. The whole file is one transaction, so a
-- failure leaves the database as it was. Requires PostgreSQL 11 or later
-- (EXECUTE FUNCTION); the triggers are replaced with DROP TRIGGER IF EXISTS +
-- CREATE TRIGGER inside that transaction rather than CREATE OR REPLACE TRIGGER,
-- which would need PostgreSQL 14.
--
-- The gateway only reads this table. Every change to it is announced with
-- NOTIFY gateway_resources_changed (payload: the resource identifier, or an
-- empty string for TRUNCATE and for identifiers too long for a NOTIFY payload);
-- the gateways LISTEN and reload their in-memory snapshot.

BEGIN;

-- Two migrations racing each other would collide on CREATE TABLE IF NOT EXISTS
-- (a unique violation in pg_type); serialise them. The key is arbitrary but fixed.
DO $$ BEGIN PERFORM pg_advisory_xact_lock(7461927301456011); END $$;

CREATE TABLE IF NOT EXISTS gateway_resources (
    resource_identifier text PRIMARY KEY,
    zone_id            text NOT NULL,
    application_id     text NOT NULL,
    upstream_url       text NOT NULL,
    auth_mode          text NOT NULL DEFAULT 'caracal_jwt'
                       CHECK (auth_mode IN ('caracal_jwt', 'provider_oauth', 'provider_apikey')),
    auth_header        text,          -- NULL means Authorization
    auth_scheme        text,          -- NULL means Bearer for caracal_jwt, none for provider modes
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- Added after the first release (SPEC 13): a resource's own bound on the
-- upstream's response headers, replacing UPSTREAM_TIMEOUT when set (slow tool
-- servers). ADD COLUMN IF NOT EXISTS keeps the file idempotent on databases
-- made by either version. Apply the schema before upgrading the gateways:
-- they read this column.
ALTER TABLE gateway_resources
    ADD COLUMN IF NOT EXISTS upstream_timeout_ms integer NULL
        CHECK (upstream_timeout_ms > 0);

-- Keep updated_at honest whoever writes the row.
CREATE OR REPLACE FUNCTION gateway_resources_touch() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

-- Announce a change. NOTIFY payloads are limited to 8000 bytes and an
-- oversized one would abort the writer's transaction, so such identifiers are
-- announced with an empty payload (the gateways reload everything anyway).
CREATE OR REPLACE FUNCTION gateway_resources_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    identifier text;
BEGIN
    IF TG_LEVEL = 'STATEMENT' THEN
        PERFORM pg_notify('gateway_resources_changed', '');
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        identifier := OLD.resource_identifier;
    ELSE
        identifier := NEW.resource_identifier;
    END IF;
    PERFORM pg_notify('gateway_resources_changed',
                      CASE WHEN octet_length(identifier) <= 7000 THEN identifier ELSE '' END);
    -- A renamed resource: the old identifier is gone too.
    IF TG_OP = 'UPDATE' AND OLD.resource_identifier IS DISTINCT FROM NEW.resource_identifier THEN
        PERFORM pg_notify('gateway_resources_changed',
                          CASE WHEN octet_length(OLD.resource_identifier) <= 7000
                               THEN OLD.resource_identifier ELSE '' END);
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS gateway_resources_touch ON gateway_resources;
CREATE TRIGGER gateway_resources_touch
    BEFORE UPDATE ON gateway_resources
    FOR EACH ROW EXECUTE FUNCTION gateway_resources_touch();

DROP TRIGGER IF EXISTS gateway_resources_notify ON gateway_resources;
CREATE TRIGGER gateway_resources_notify
    AFTER INSERT OR UPDATE OR DELETE ON gateway_resources
    FOR EACH ROW EXECUTE FUNCTION gateway_resources_notify();

DROP TRIGGER IF EXISTS gateway_resources_notify_truncate ON gateway_resources;
CREATE TRIGGER gateway_resources_notify_truncate
    AFTER TRUNCATE ON gateway_resources
    FOR EACH STATEMENT EXECUTE FUNCTION gateway_resources_notify();

COMMIT;
