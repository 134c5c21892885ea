-- API keys: rotation with a grace period, and credit caps per period; settle entries name the
-- key that spent, so that a key's spending survives a restart.

-- rotated_to is the id of the key that replaced this one (at most once), deprecated_at when.
ALTER TABLE api_keys ADD COLUMN rotated_to TEXT;
ALTER TABLE api_keys ADD COLUMN deprecated_at INTEGER;
-- credit_cap_period: '' (the cap holds for the key's whole life), 'day', 'month' or a duration.
ALTER TABLE api_keys ADD COLUMN credit_cap_period TEXT NOT NULL DEFAULT '';

CREATE INDEX api_keys_by_rotated_to ON api_keys (rotated_to) WHERE rotated_to IS NOT NULL;

-- key_id is the API key a settled request was made with (NULL: none, or before this version).
ALTER TABLE ledger ADD COLUMN key_id TEXT;

CREATE INDEX ledger_by_key ON ledger (key_id, created_at) WHERE key_id IS NOT NULL;
