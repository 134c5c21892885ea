package identity

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/dgraph-io/ristretto/v2"
)

// KeyCache puts a bounded in-memory cache in front of a key store, so checking a valid key
// costs no store round trip. Both found keys and unknown ids are cached, each for at most TTL:
// a key revoked through this cache is forgotten at once; one revoked elsewhere (another
// instance, another process) stops working here within TTL.
type KeyCache struct {
	Keys
	ttl   time.Duration
	cache *ristretto.Cache[string, cachedKey]
	// observe, when not nil, is told of every lookup: hit or miss.
	observe func(hit bool)
	// Changed, when set, is told the ids of the keys a revocation or rotation through this
	// cache changed (after the store did), e.g. to tell other instances' caches.
	Changed func(ids ...string)
}

type cachedKey struct {
	key   Key
	found bool
}

// NewKeyCache caches up to maxEntries keys of store for ttl each. observe may be nil.
func NewKeyCache(store Keys, ttl time.Duration, maxEntries int64, observe func(hit bool)) (*KeyCache, error) {
	if ttl <= 0 || maxEntries <= 0 {
		return nil, errors.New("key cache: ttl and size must be positive")
	}
	c, err := ristretto.NewCache(&ristretto.Config[string, cachedKey]{
		NumCounters: maxEntries * 10,
		MaxCost:     maxEntries,
		BufferItems: 64,
	})
	if err != nil {
		return nil, fmt.Errorf("key cache: %w", err)
	}
	return &KeyCache{Keys: store, ttl: ttl, cache: c, observe: observe}, nil
}

// KeyByID returns the key from the cache, or from the store (then caches the answer, found or
// not found). Store failures are not cached.
func (c *KeyCache) KeyByID(ctx context.Context, id string) (Key, error) {
	if v, ok := c.cache.Get(id); ok {
		c.seen(true)
		if !v.found {
			return Key{}, ErrNotFound
		}
		return v.key, nil
	}
	c.seen(false)
	k, err := c.Keys.KeyByID(ctx, id)
	switch {
	case err == nil:
		c.cache.SetWithTTL(id, cachedKey{key: k, found: true}, 1, c.ttl)
	case errors.Is(err, ErrNotFound):
		c.cache.SetWithTTL(id, cachedKey{}, 1, c.ttl)
	}
	return k, err
}

// CreateKey stores the key and drops any cached "not found" for its id.
func (c *KeyCache) CreateKey(ctx context.Context, k Key) error {
	err := c.Keys.CreateKey(ctx, k)
	c.Forget(k.ID)
	return err
}

// CreateKeyWithin stores the key within the bound and drops any cached "not found" for its id.
func (c *KeyCache) CreateKeyWithin(ctx context.Context, k Key, maxLive int) error {
	err := c.Keys.CreateKeyWithin(ctx, k, maxLive)
	c.Forget(k.ID)
	return err
}

// RevokeKey revokes the key in the store and forgets it here at once.
func (c *KeyCache) RevokeKey(ctx context.Context, id string, at time.Time) error {
	err := c.Keys.RevokeKey(ctx, id, at)
	c.Forget(id)
	if err == nil && c.Changed != nil {
		c.Changed(id)
	}
	return err
}

// RotateKey rotates the key in the store and forgets at once the old key, the new key's id and
// every key whose expiry the rotation changed.
func (c *KeyCache) RotateKey(ctx context.Context, oldID string, next Key, at, graceEnd time.Time) ([]string, error) {
	changed, err := c.Keys.RotateKey(ctx, oldID, next, at, graceEnd)
	c.Forget(oldID)
	c.Forget(next.ID)
	for _, id := range changed {
		c.Forget(id)
	}
	if err == nil && c.Changed != nil {
		c.Changed(append([]string{oldID, next.ID}, changed...)...)
	}
	return changed, err
}

// Forget drops what the cache holds for id.
func (c *KeyCache) Forget(id string) { c.cache.Del(id) }

// ForgetAll drops everything the cache holds.
func (c *KeyCache) ForgetAll() { c.cache.Clear() }

// Close stops the cache's goroutines.
func (c *KeyCache) Close() { c.cache.Close() }

func (c *KeyCache) seen(hit bool) {
	if c.observe != nil {
		c.observe(hit)
	}
}
