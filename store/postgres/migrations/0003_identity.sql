-- Users and API keys, with their rotation chains: the same tables and columns as the embedded
-- store's (its migrations 0001, 0003 and 0005), in PostgreSQL types.
--
-- Conventions as in 0001: money is BIGINT micro-credits, times are timestamptz (microseconds).
-- Lists and maps are JSONB, where 'null' (the default) reads back as none, unlike '[]'.

CREATE TABLE users (
    id            TEXT        NOT NULL PRIMARY KEY,
    email         TEXT        NOT NULL,
    -- email_key is the lower-cased email (lower-cased by the gateway, Unicode-aware, whatever
    -- the database's collation): emails are unique case-insensitively.
    email_key     TEXT        NOT NULL UNIQUE,
    tier          TEXT        NOT NULL DEFAULT '',
    password_hash TEXT        NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL
);

-- api_keys never holds a key itself: only the SHA-256 of the whole key as presented.
CREATE TABLE api_keys (
    id                TEXT        NOT NULL PRIMARY KEY,
    user_id           TEXT        NOT NULL REFERENCES users (id),
    prefix            TEXT        NOT NULL,
    hash              BYTEA       NOT NULL UNIQUE CHECK (length(hash) = 32),
    name              TEXT        NOT NULL DEFAULT '',
    scopes            JSONB       NOT NULL DEFAULT 'null',
    allowed_ips       JSONB       NOT NULL DEFAULT 'null',
    metadata          JSONB       NOT NULL DEFAULT 'null',
    tier              TEXT        NOT NULL DEFAULT '',
    credit_cap        BIGINT      NOT NULL DEFAULT 0,
    -- credit_cap_period: '' (the cap holds for the key's whole life), 'day', 'month' or a duration.
    credit_cap_period TEXT        NOT NULL DEFAULT '',
    models            JSONB       NOT NULL DEFAULT 'null',
    created_at        timestamptz NOT NULL,
    expires_at        timestamptz,
    revoked_at        timestamptz,
    last_used_at      timestamptz,
    -- rotated_to is the id of the key that replaced this one (at most once), deprecated_at when.
    rotated_to        TEXT,
    deprecated_at     timestamptz,
    -- chain_id names the key's rotation chain: the id of its first key. A capped key's spending
    -- is counted over its chain, so that a rotation does not start it again.
    chain_id          TEXT        NOT NULL
);

CREATE INDEX api_keys_by_user ON api_keys (user_id, created_at);
CREATE INDEX api_keys_by_rotated_to ON api_keys (rotated_to) WHERE rotated_to IS NOT NULL;
CREATE INDEX api_keys_by_chain ON api_keys (chain_id);

-- The settle entries of a key (ledger.key_id, since 0001), for the spending of key chains.
CREATE INDEX ledger_by_key ON ledger (key_id, created_at) WHERE key_id IS NOT NULL;
