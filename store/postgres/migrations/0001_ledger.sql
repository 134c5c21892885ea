-- The credit ledger.
--
-- Conventions: money is BIGINT micro-credits and never floating point (an arithmetic overflow
-- of BIGINT is an error, never a wrapped or rounded value); times are timestamptz.

-- accounts holds balances: "user:<id>" or "anon:<client key>". balance is credited - settled,
-- open reservations included, and may go below zero when a request costs more than it
-- reserved; reserved is the sum of the account's open reservations, so that the spendable
-- balance is balance - reserved. refill_period is the last period an anonymous account was
-- filled up in (NULL: never); last_grant is what that refill granted (the refill statement
-- returns it: its SET clauses all see the row as it was).
CREATE TABLE accounts (
    id            TEXT        NOT NULL PRIMARY KEY,
    balance       BIGINT      NOT NULL,
    reserved      BIGINT      NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    refill_period BIGINT,
    last_grant    BIGINT      NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL
);

-- reservations holds the open reservations only: closing one deletes its row, so a
-- reservation is closed at most once, by whichever DELETE gets it, on whichever instance.
CREATE TABLE reservations (
    id         TEXT        NOT NULL PRIMARY KEY,
    account_id TEXT        NOT NULL REFERENCES accounts (id),
    amount     BIGINT      NOT NULL CHECK (amount >= 0),
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
);

CREATE INDEX reservations_by_expiry ON reservations (expires_at);

-- ledger is append-only (see the trigger below): credits, grants and settlements.
CREATE TABLE ledger (
    seq             BIGSERIAL   NOT NULL PRIMARY KEY,
    account_id      TEXT        NOT NULL REFERENCES accounts (id),
    kind            TEXT        NOT NULL CHECK (kind IN ('credit', 'grant', 'settle')),
    amount          BIGINT      NOT NULL,
    reason          TEXT        NOT NULL DEFAULT '',
    -- A reservation is settled at most once.
    reservation_id  TEXT        UNIQUE,
    idempotency_key TEXT,
    -- request_hash fingerprints the parameters of an idempotent credit, to tell a replay from a
    -- conflicting reuse of its key.
    request_hash    BYTEA,
    model           TEXT,
    backend         TEXT,
    input_tokens    BIGINT,
    output_tokens   BIGINT,
    key_id          TEXT,
    created_at      timestamptz NOT NULL,
    CHECK (kind <> 'settle' OR (amount >= 0 AND reservation_id IS NOT NULL)),
    CHECK (kind = 'settle' OR reservation_id IS NULL),
    CHECK (idempotency_key IS NULL OR request_hash IS NOT NULL)
);

CREATE INDEX ledger_by_account ON ledger (account_id, seq);
-- An idempotency key is used at most once per account.
CREATE UNIQUE INDEX ledger_by_idempotency_key ON ledger (account_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger is append-only';
END
$$;

CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
