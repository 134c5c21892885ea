-- Token kinds: the parts of a settled request's prompt read from and written to the provider's
-- cache, and the part of its output that is reasoning; and the id of the response the backend
-- stored (OpenAI Responses), whose settle entry is the record of its owner and backend.
ALTER TABLE ledger ADD COLUMN cached_input_tokens INTEGER;
ALTER TABLE ledger ADD COLUMN cache_write_tokens INTEGER;
ALTER TABLE ledger ADD COLUMN reasoning_tokens INTEGER;
ALTER TABLE ledger ADD COLUMN response_id TEXT;

CREATE INDEX ledger_by_response ON ledger (response_id, seq) WHERE response_id IS NOT NULL;
