-- Key chains: a key and the keys that replaced it by rotation, one after the other, form a
-- chain named by the id of its first key. A capped key's spending is counted over its chain,
-- so that a rotation does not start it again.
ALTER TABLE api_keys ADD COLUMN chain_id TEXT NOT NULL DEFAULT '';

-- Existing chains: from each key that replaced none, along rotated_to.
WITH RECURSIVE chain (id, root) AS (
    SELECT id, id FROM api_keys
     WHERE id NOT IN (SELECT rotated_to FROM api_keys WHERE rotated_to IS NOT NULL)
    UNION ALL
    SELECT k.rotated_to, chain.root FROM api_keys AS k JOIN chain ON k.id = chain.id
     WHERE k.rotated_to IS NOT NULL
)
UPDATE api_keys SET chain_id = coalesce((SELECT root FROM chain WHERE chain.id = api_keys.id), id);

CREATE INDEX api_keys_by_chain ON api_keys (chain_id);
