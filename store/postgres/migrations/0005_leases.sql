-- Credit leases (store/postgres/lease.go): a lease is a chunk of an account's balance that one
-- instance took in one conditional UPDATE, to carve its requests' reservations from in memory.
-- Like an open reservation, a lease's amount is counted in accounts.reserved, so that no other
-- instance can spend it: amount is what the lease still holds (unspent, held by the instance's
-- open reservations, or settled in memory and not yet committed). Settling moves the cost from
-- the lease to the ledger (a settle entry per request) in the holder's group commits; the
-- holder returns what it does not use, and whichever instance finds a lease past its expiry
-- (its holder stopped renewing it: crashed) deletes it, returning its amount to the balance.
CREATE TABLE leases (
    id          TEXT        NOT NULL PRIMARY KEY,
    account_id  TEXT        NOT NULL REFERENCES accounts (id),
    -- holder is the Store (one process) that holds the lease, random per Open; instance_id
    -- is the operator's name for the instance, for diagnosis.
    holder      TEXT        NOT NULL,
    instance_id TEXT        NOT NULL,
    amount      BIGINT      NOT NULL CHECK (amount >= 0),
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL
);

CREATE INDEX leases_by_expiry ON leases (expires_at);
CREATE INDEX leases_by_account ON leases (account_id);
CREATE INDEX leases_by_holder ON leases (holder);
