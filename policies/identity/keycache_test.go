package identity

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

// countingKeys is an in-memory key store counting lookups.
type countingKeys struct {
	mu      sync.Mutex
	keys    map[string]Key
	lookups int
	fail    error
}

func (s *countingKeys) CreateKey(_ context.Context, k Key) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.keys[k.ID] = k
	return nil
}

func (s *countingKeys) CreateKeyWithin(ctx context.Context, k Key, _ int) error {
	return s.CreateKey(ctx, k)
}

func (s *countingKeys) KeyByID(_ context.Context, id string) (Key, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lookups++
	if s.fail != nil {
		return Key{}, s.fail
	}
	k, ok := s.keys[id]
	if !ok {
		return Key{}, ErrNotFound
	}
	return k, nil
}

func (s *countingKeys) KeysByUser(context.Context, string) ([]Key, error) { return nil, nil }

func (s *countingKeys) RevokeKey(_ context.Context, id string, at time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	k, ok := s.keys[id]
	if !ok {
		return ErrNotFound
	}
	k.RevokedAt = &at
	s.keys[id] = k
	return nil
}

func (s *countingKeys) TouchKeys(context.Context, map[string]time.Time) error { return nil }

func (s *countingKeys) RotateKey(_ context.Context, oldID string, next Key, at, graceEnd time.Time) ([]string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k, ok := s.keys[oldID]
	if !ok {
		return nil, ErrNotFound
	}
	if k.RotatedTo != "" {
		return nil, ErrNotRotatable
	}
	k.RotatedTo, k.DeprecatedAt, k.ExpiresAt = next.ID, &at, &graceEnd
	s.keys[oldID] = k
	s.keys[next.ID] = next
	return []string{oldID}, nil
}

func (s *countingKeys) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lookups
}

// lookupUntilCached repeats a lookup until the cache answers it (ristretto applies sets
// asynchronously), and fails if that does not happen in a bounded number of tries.
func lookupUntilCached(t *testing.T, c *KeyCache, store *countingKeys, id string) {
	t.Helper()
	for range 1000 {
		before := store.count()
		_, _ = c.KeyByID(context.Background(), id)
		if store.count() == before {
			return
		}
		c.cache.Wait()
	}
	t.Fatalf("key %s never served from the cache", id)
}

func TestKeyCache(t *testing.T) {
	ctx := context.Background()
	store := &countingKeys{keys: map[string]Key{}}
	var hits, misses int
	var mu sync.Mutex
	c, err := NewKeyCache(store, time.Minute, 1000, func(hit bool) {
		mu.Lock()
		defer mu.Unlock()
		if hit {
			hits++
		} else {
			misses++
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	if err := c.CreateKey(ctx, Key{ID: "k1", UserID: "u1"}); err != nil {
		t.Fatal(err)
	}
	t.Run("found keys are cached", func(t *testing.T) {
		lookupUntilCached(t, c, store, "k1")
		before := store.count()
		for range 100 {
			k, err := c.KeyByID(ctx, "k1")
			if err != nil || k.UserID != "u1" {
				t.Fatalf("got %+v, %v", k, err)
			}
		}
		if store.count() != before {
			t.Fatalf("%d store lookups for cached key", store.count()-before)
		}
	})
	t.Run("unknown ids are cached as not found", func(t *testing.T) {
		lookupUntilCached(t, c, store, "nope")
		if _, err := c.KeyByID(ctx, "nope"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("a key created after a miss is found at once", func(t *testing.T) {
		if err := c.CreateKey(ctx, Key{ID: "nope", UserID: "u2"}); err != nil {
			t.Fatal(err)
		}
		if k, err := c.KeyByID(ctx, "nope"); err != nil || k.UserID != "u2" {
			t.Fatalf("got %+v, %v", k, err)
		}
	})
	t.Run("revoking through the cache takes effect at once", func(t *testing.T) {
		lookupUntilCached(t, c, store, "k1")
		if err := c.RevokeKey(ctx, "k1", time.Unix(100, 0)); err != nil {
			t.Fatal(err)
		}
		k, err := c.KeyByID(ctx, "k1")
		if err != nil || k.RevokedAt == nil {
			t.Fatalf("revoked key served from cache: %+v, %v", k, err)
		}
	})
	t.Run("store failures are not cached", func(t *testing.T) {
		store.mu.Lock()
		store.fail = errors.New("disk on fire")
		store.mu.Unlock()
		if _, err := c.KeyByID(ctx, "other"); err == nil {
			t.Fatal("no error")
		}
		store.mu.Lock()
		store.fail = nil
		store.mu.Unlock()
		if _, err := c.KeyByID(ctx, "other"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("err = %v", err)
		}
	})
	mu.Lock()
	defer mu.Unlock()
	if hits == 0 || misses == 0 {
		t.Fatalf("observer saw %d hits, %d misses", hits, misses)
	}
}

func TestKeyCacheExpiresRevocationsMadeElsewhere(t *testing.T) {
	ctx := context.Background()
	store := &countingKeys{keys: map[string]Key{"k": {ID: "k"}}}
	c, err := NewKeyCache(store, 50*time.Millisecond, 100, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	lookupUntilCached(t, c, store, "k")
	// Revoked behind the cache's back (another instance).
	_ = store.RevokeKey(ctx, "k", time.Unix(1, 0))
	deadline := time.Now().Add(5 * time.Second)
	for {
		k, _ := c.KeyByID(ctx, "k")
		if k.RevokedAt != nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("revocation not seen after the TTL")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func BenchmarkKeyCacheHit(b *testing.B) {
	store := &countingKeys{keys: map[string]Key{"k": {ID: "k", Scopes: []string{"*"}}}}
	c, _ := NewKeyCache(store, time.Minute, 1000, nil)
	defer c.Close()
	ctx := context.Background()
	for range 100 {
		_, _ = c.KeyByID(ctx, "k")
		c.cache.Wait()
	}
	b.ReportAllocs()
	for b.Loop() {
		_, _ = c.KeyByID(ctx, "k")
	}
}

// TestKeyCacheChangedAndForgetAll: a revocation or rotation through the cache names the keys it
// changed to Changed (a failed one names none), and ForgetAll makes every key read again.
func TestKeyCacheChangedAndForgetAll(t *testing.T) {
	ctx := context.Background()
	store := &countingKeys{keys: map[string]Key{"a": {ID: "a"}, "b": {ID: "b"}}}
	c, err := NewKeyCache(store, time.Hour, 100, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var changed [][]string
	c.Changed = func(ids ...string) { changed = append(changed, ids) }
	if err := c.RevokeKey(ctx, "a", time.Unix(1, 0)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.RotateKey(ctx, "b", Key{ID: "c"}, time.Unix(2, 0), time.Unix(3, 0)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.RotateKey(ctx, "b", Key{ID: "d"}, time.Unix(2, 0), time.Unix(3, 0)); !errors.Is(err, ErrNotRotatable) {
		t.Fatalf("second rotation: %v", err)
	}
	if err := c.RevokeKey(ctx, "nope", time.Unix(1, 0)); !errors.Is(err, ErrNotFound) {
		t.Fatalf("revoking an unknown key: %v", err)
	}
	want := [][]string{{"a"}, {"b", "c", "b"}}
	if len(changed) != len(want) || len(changed[0]) != 1 || changed[0][0] != "a" || len(changed[1]) != 3 ||
		changed[1][0] != "b" || changed[1][1] != "c" {
		t.Fatalf("Changed was told %v, want %v", changed, want)
	}
	lookupUntilCached(t, c, store, "a")
	c.ForgetAll()
	before := store.count()
	if _, err := c.KeyByID(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if store.count() != before+1 {
		t.Fatal("a key was served from the cache after ForgetAll")
	}
}
