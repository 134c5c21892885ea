-- Users, API keys and the credit ledger.
--
-- Conventions: times are unix microseconds (INTEGER), money is INTEGER micro-credits and never
-- REAL. Tables are STRICT, so a value of the wrong type (such as the REAL SQLite produces when
-- integer arithmetic overflows) is refused instead of stored.

CREATE TABLE users (
    id            TEXT    NOT NULL PRIMARY KEY,
    email         TEXT    NOT NULL,
    -- email_key is the lower-cased email: emails are unique case-insensitively.
    email_key     TEXT    NOT NULL UNIQUE,
    tier          TEXT    NOT NULL DEFAULT '',
    password_hash TEXT    NOT NULL DEFAULT '',
    created_at    INTEGER NOT NULL
) STRICT;

-- api_keys never holds a key itself: only the SHA-256 of the whole key as presented.
CREATE TABLE api_keys (
    id           TEXT    NOT NULL PRIMARY KEY,
    user_id      TEXT    NOT NULL REFERENCES users (id),
    prefix       TEXT    NOT NULL,
    hash         BLOB    NOT NULL UNIQUE CHECK (length(hash) = 32),
    name         TEXT    NOT NULL DEFAULT '',
    scopes       TEXT    NOT NULL DEFAULT 'null' CHECK (json_valid(scopes)),
    allowed_ips  TEXT    NOT NULL DEFAULT 'null' CHECK (json_valid(allowed_ips)),
    metadata     TEXT    NOT NULL DEFAULT 'null' CHECK (json_valid(metadata)),
    tier         TEXT    NOT NULL DEFAULT '',
    credit_cap   INTEGER NOT NULL DEFAULT 0,
    models       TEXT    NOT NULL DEFAULT 'null' CHECK (json_valid(models)),
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER,
    revoked_at   INTEGER,
    last_used_at INTEGER
) STRICT;

CREATE INDEX api_keys_by_user ON api_keys (user_id, created_at);

-- accounts holds spendable balances: "user:<id>" or "anon:<client key>". The balance may go
-- below zero when a request costs more than it reserved. refill_period is the last period an
-- anonymous account was filled up in (NULL: never).
CREATE TABLE accounts (
    id            TEXT    NOT NULL PRIMARY KEY,
    balance       INTEGER NOT NULL,
    refill_period INTEGER,
    created_at    INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- reservations holds the open reservations only: closing one deletes its row, so a
-- reservation is closed at most once by whichever DELETE gets it. It only ever holds the
-- requests in flight, so it has no index besides its key: scanning it for expired reservations
-- or an account's open total is cheaper than keeping indexes up to date on every reserve and
-- settle.
CREATE TABLE reservations (
    id         TEXT    NOT NULL PRIMARY KEY,
    account_id TEXT    NOT NULL REFERENCES accounts (id),
    amount     INTEGER NOT NULL CHECK (amount >= 0),
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- ledger is append-only (see the triggers below): credits, grants and settlements.
CREATE TABLE ledger (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id      TEXT    NOT NULL REFERENCES accounts (id),
    kind            TEXT    NOT NULL CHECK (kind IN ('credit', 'grant', 'settle')),
    amount          INTEGER NOT NULL,
    reason          TEXT    NOT NULL DEFAULT '',
    reservation_id  TEXT,
    idempotency_key TEXT,
    -- request_hash fingerprints the parameters of an idempotent credit, to tell a replay from a
    -- conflicting reuse of its key.
    request_hash    BLOB,
    model           TEXT,
    backend         TEXT,
    input_tokens    INTEGER,
    output_tokens   INTEGER,
    created_at      INTEGER NOT NULL,
    CHECK (kind <> 'settle' OR (amount >= 0 AND reservation_id IS NOT NULL)),
    CHECK (kind = 'settle' OR reservation_id IS NULL),
    CHECK (idempotency_key IS NULL OR request_hash IS NOT NULL)
) STRICT;

CREATE INDEX ledger_by_account ON ledger (account_id, seq);
-- A reservation is settled at most once.
CREATE UNIQUE INDEX ledger_by_reservation ON ledger (reservation_id)
    WHERE reservation_id IS NOT NULL;
-- An idempotency key is used at most once per account.
CREATE UNIQUE INDEX ledger_by_idempotency_key ON ledger (account_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
BEGIN
    SELECT RAISE(ABORT, 'ledger is append-only');
END;

CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
BEGIN
    SELECT RAISE(ABORT, 'ledger is append-only');
END;
