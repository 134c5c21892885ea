package sqlite

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
)

// testKey is a key of user u1 whose plaintext is plaintext.
func testKey(id, plaintext string, created time.Time) identity.Key {
	expires := created.Add(30 * 24 * time.Hour)
	return identity.Key{
		ID:         id,
		UserID:     "u1",
		Prefix:     "sk_live",
		Hash:       sha256.Sum256([]byte(plaintext)),
		Name:       "laptop",
		Scopes:     []string{"chat", "embeddings"},
		AllowedIPs: []string{"10.0.0.0/8", "2001:db8::/32"},
		Metadata:   map[string]string{"team": "search", "env": "prod"},
		Tier:       "pro",
		CreditCap:  5_000_000,
		Models:     []string{"gpt-x", "claude-y"},
		CreatedAt:  created,
		ExpiresAt:  &expires,
	}
}

// openWithUser opens a store holding user u1.
func openWithUser(t *testing.T, clock *testClock) (*Store, string) {
	t.Helper()
	s, path := openTestStore(t, clock)
	if err := s.CreateUser(context.Background(), identity.User{ID: "u1", Email: "u1@example.com"}); err != nil {
		t.Fatal(err)
	}
	return s, path
}

func TestCreateKey(t *testing.T) {
	created := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	existing := testKey("k1", "sk_live_k1_secret", created)
	for _, tc := range []struct {
		name    string
		key     identity.Key
		wantErr error
	}{
		{"new", testKey("k2", "sk_live_k2_secret", created), nil},
		{"minimal", identity.Key{ID: "k2", UserID: "u1", Hash: [32]byte{9}}, nil},
		{"same id", testKey("k1", "sk_live_k1_other", created), identity.ErrConflict},
		{"same hash", testKey("k2", "sk_live_k1_secret", created), identity.ErrConflict},
		{"unknown user", func() identity.Key { k := testKey("k2", "x", created); k.UserID = "nobody"; return k }(), identity.ErrNotFound},
		{"missing id", func() identity.Key { k := testKey("", "x", created); return k }(), errAny},
		{"missing user", func() identity.Key { k := testKey("k2", "x", created); k.UserID = ""; return k }(), errAny},
		{"missing hash", identity.Key{ID: "k2", UserID: "u1"}, errAny},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			s, _ := openWithUser(t, nil)
			if err := s.CreateKey(ctx, existing); err != nil {
				t.Fatal(err)
			}
			err := s.CreateKey(ctx, tc.key)
			checkErr(t, err, tc.wantErr)
			if err != nil {
				got, err := s.KeyByID(ctx, "k1")
				if err != nil || got.Hash != existing.Hash {
					t.Errorf("existing key now %+v, %v", got, err)
				}
				return
			}
			got, err := s.KeyByID(ctx, tc.key.ID)
			if err != nil {
				t.Fatal(err)
			}
			if got.Hash != tc.key.Hash || got.CreatedAt.IsZero() {
				t.Errorf("stored %+v", got)
			}
		})
	}
}

func TestKeyRoundTrip(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openWithUser(t, clock)
	created := time.Date(2030, 1, 1, 0, 0, 0, 987654321, time.UTC)
	full := testKey("k1", "sk_live_k1_secret", created)
	revoked := created.Add(time.Hour)
	full.RevokedAt = &revoked
	full.LastUsedAt = &created
	minimal := identity.Key{ID: "k2", UserID: "u1", Hash: [32]byte{1}, Scopes: []string{}}

	for _, k := range []identity.Key{full, minimal} {
		if err := s.CreateKey(ctx, k); err != nil {
			t.Fatal(err)
		}
	}
	wantFull := full
	wantFull.CreatedAt = created.Truncate(time.Microsecond)
	wantFull.ChainID = "k1"
	for _, p := range []**time.Time{&wantFull.ExpiresAt, &wantFull.RevokedAt, &wantFull.LastUsedAt} {
		v := (**p).Truncate(time.Microsecond)
		*p = &v
	}
	wantMinimal := minimal
	wantMinimal.CreatedAt = clock.Now()
	wantMinimal.ChainID = "k2"

	for _, tc := range []struct {
		id   string
		want identity.Key
	}{
		{"k1", wantFull},
		{"k2", wantMinimal},
	} {
		t.Run(tc.id, func(t *testing.T) {
			got, err := s.KeyByID(ctx, tc.id)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("key = %+v\nwant  %+v", got, tc.want)
			}
		})
	}
	if _, err := s.KeyByID(ctx, "k3"); err != identity.ErrNotFound {
		t.Errorf("unknown key: %v, want ErrNotFound", err)
	}
}

func TestKeysByUser(t *testing.T) {
	ctx := context.Background()
	s, _ := openWithUser(t, nil)
	if err := s.CreateUser(ctx, identity.User{ID: "u2", Email: "u2@example.com"}); err != nil {
		t.Fatal(err)
	}
	base := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	for i, id := range []string{"a", "b", "c"} {
		k := testKey(id, "secret-"+id, base.Add(time.Duration(i)*time.Minute))
		if err := s.CreateKey(ctx, k); err != nil {
			t.Fatal(err)
		}
	}
	other := testKey("z", "secret-z", base)
	other.UserID = "u2"
	if err := s.CreateKey(ctx, other); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		user string
		want []string
	}{
		{"newest first", "u1", []string{"c", "b", "a"}},
		{"other user", "u2", []string{"z"}},
		{"unknown user", "u3", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			keys, err := s.KeysByUser(ctx, tc.user)
			if err != nil {
				t.Fatal(err)
			}
			var ids []string
			for _, k := range keys {
				ids = append(ids, k.ID)
			}
			if !reflect.DeepEqual(ids, tc.want) {
				t.Errorf("ids = %v, want %v", ids, tc.want)
			}
		})
	}
}

func TestRevokeKey(t *testing.T) {
	first := time.Date(2030, 2, 1, 0, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name        string
		revokeFirst bool
		id          string
		at          time.Time
		wantErr     error
		wantRevoked time.Time
	}{
		{name: "revokes", id: "k1", at: first, wantRevoked: first},
		{name: "keeps the first time", revokeFirst: true, id: "k1", at: first.Add(time.Hour), wantRevoked: first},
		{name: "keeps the first time even if later", revokeFirst: true, id: "k1", at: first.Add(-time.Hour), wantRevoked: first},
		{name: "unknown key", id: "nope", at: first, wantErr: identity.ErrNotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			s, _ := openWithUser(t, nil)
			if err := s.CreateKey(ctx, testKey("k1", "secret", first.Add(-time.Hour))); err != nil {
				t.Fatal(err)
			}
			if tc.revokeFirst {
				if err := s.RevokeKey(ctx, "k1", first); err != nil {
					t.Fatal(err)
				}
			}
			err := s.RevokeKey(ctx, tc.id, tc.at)
			checkErr(t, err, tc.wantErr)
			if err != nil {
				return
			}
			k, err := s.KeyByID(ctx, "k1")
			if err != nil {
				t.Fatal(err)
			}
			if k.RevokedAt == nil || !k.RevokedAt.Equal(tc.wantRevoked) {
				t.Errorf("revoked at %v, want %v", k.RevokedAt, tc.wantRevoked)
			}
		})
	}
}

func TestTouchKeys(t *testing.T) {
	ctx := context.Background()
	s, _ := openWithUser(t, nil)
	base := time.Date(2030, 3, 1, 0, 0, 0, 0, time.UTC)
	for _, id := range []string{"a", "b", "c"} {
		if err := s.CreateKey(ctx, testKey(id, "secret-"+id, base)); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name string
		used map[string]time.Time
		want map[string]time.Time // zero: never used
	}{
		{"nothing", nil, map[string]time.Time{}},
		{"batch", map[string]time.Time{"a": base.Add(time.Minute), "b": base.Add(2 * time.Minute), "ghost": base},
			map[string]time.Time{"a": base.Add(time.Minute), "b": base.Add(2 * time.Minute)}},
		{"later moves on", map[string]time.Time{"a": base.Add(time.Hour)},
			map[string]time.Time{"a": base.Add(time.Hour), "b": base.Add(2 * time.Minute)}},
		{"earlier never moves back", map[string]time.Time{"a": base, "c": base.Add(3 * time.Minute)},
			map[string]time.Time{"a": base.Add(time.Hour), "b": base.Add(2 * time.Minute), "c": base.Add(3 * time.Minute)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := s.TouchKeys(ctx, tc.used); err != nil {
				t.Fatal(err)
			}
			for _, id := range []string{"a", "b", "c"} {
				k, err := s.KeyByID(ctx, id)
				if err != nil {
					t.Fatal(err)
				}
				want, used := tc.want[id]
				switch {
				case !used && k.LastUsedAt != nil:
					t.Errorf("%s last used %v, want never", id, *k.LastUsedAt)
				case used && (k.LastUsedAt == nil || !k.LastUsedAt.Equal(want)):
					t.Errorf("%s last used %v, want %v", id, k.LastUsedAt, want)
				}
			}
		})
	}
}

// TestKeyPlaintextNeverStored creates a key with a known plaintext and looks for the plaintext,
// in raw, hex and base64 forms, in every byte of the database file and its WAL: only the hash
// may be there.
func TestKeyPlaintextNeverStored(t *testing.T) {
	ctx := context.Background()
	s, path := openWithUser(t, nil)
	const plaintext = "sk_live_k1_Zq8vN3pW7rT2xY5bK9mL4cH6jD1fG0sA"
	k := testKey("k1", plaintext, time.Now())
	if err := s.CreateKey(ctx, k); err != nil {
		t.Fatal(err)
	}
	if err := s.TouchKeys(ctx, map[string]time.Time{"k1": time.Now()}); err != nil {
		t.Fatal(err)
	}
	// Read it back too, so that nothing on the read path writes it either.
	if _, err := s.KeyByID(ctx, "k1"); err != nil {
		t.Fatal(err)
	}

	scan := func(label string) {
		t.Helper()
		all := storeFileBytes(t, path, label)
		secret := plaintext[len("sk_live_k1_"):]
		for _, form := range []string{
			plaintext,
			secret,
			hex.EncodeToString([]byte(plaintext)),
			hex.EncodeToString([]byte(secret)),
			base64.StdEncoding.EncodeToString([]byte(plaintext)),
			base64.RawURLEncoding.EncodeToString([]byte(plaintext)),
			base64.StdEncoding.EncodeToString([]byte(secret)),
		} {
			if bytes.Contains(all, []byte(form)) {
				t.Errorf("%s: the database holds %q", label, form)
			}
		}
		// The scan can see what is there: the hash is.
		if !bytes.Contains(all, k.Hash[:]) {
			t.Errorf("%s: the key's hash is not in the files: the scan sees nothing", label)
		}
	}
	scan("open") // the key is still in the WAL
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	scan("closed") // checkpointed into the file
}

// storeFileBytes is everything the store's files hold on disk (the database, its WAL and shared
// memory), for scans that look for secrets.
func storeFileBytes(t *testing.T, path, label string) []byte {
	t.Helper()
	var contents [][]byte
	for _, suffix := range []string{"", "-wal", "-shm"} {
		b, err := os.ReadFile(path + suffix)
		if err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		contents = append(contents, b)
	}
	all := bytes.Join(contents, nil)
	if len(all) == 0 {
		t.Fatalf("%s: nothing to scan", label)
	}
	return all
}

// TestCreateKeyWithin: the bound counts the user's keys neither revoked, nor expired, nor
// rotated; a refusal stores nothing; creations at once never pass it.
func TestCreateKeyWithin(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openWithUser(t, clock)
	now := clock.Now()
	key := func(id string) identity.Key {
		k := testKey(id, id, now)
		k.ExpiresAt = nil
		return k
	}
	for _, id := range []string{"a", "b", "c"} {
		if err := s.CreateKeyWithin(ctx, key(id), 3); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.CreateKeyWithin(ctx, key("d"), 3); !errors.Is(err, identity.ErrKeyLimit) {
		t.Fatalf("over the bound: %v", err)
	}
	if _, err := s.KeyByID(ctx, "d"); !errors.Is(err, identity.ErrNotFound) {
		t.Errorf("the refused key was stored: %v", err)
	}
	if err := s.CreateKey(ctx, key("unbound")); err != nil {
		t.Errorf("CreateKey is not bound: %v", err)
	}
	// Not counted: a revoked key, an expired one, one replaced by a rotation (its successor is).
	if err := s.RevokeKey(ctx, "a", now); err != nil {
		t.Fatal(err)
	}
	expired := key("e")
	past := now.Add(-time.Second)
	expired.ExpiresAt = &past
	if err := s.CreateKey(ctx, expired); err != nil {
		t.Fatal(err)
	}
	if _, err := s.RotateKey(ctx, "b", key("b2"), now, now.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	// Live and counted: b2, c, unbound.
	if err := s.CreateKeyWithin(ctx, key("f"), 4); err != nil {
		t.Errorf("room for one: %v", err)
	}
	if err := s.CreateKeyWithin(ctx, key("g"), 4); !errors.Is(err, identity.ErrKeyLimit) {
		t.Errorf("at the bound again: %v", err)
	}

	// Creations at once: exactly the room left is taken.
	const n = 10
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { errs[i] = s.CreateKeyWithin(ctx, key(fmt.Sprintf("n%d", i)), 8) })
	}
	wg.Wait()
	made := 0
	for _, err := range errs {
		switch {
		case err == nil:
			made++
		case !errors.Is(err, identity.ErrKeyLimit):
			t.Errorf("concurrent creation: %v", err)
		}
	}
	if made != 4 {
		t.Errorf("%d keys made at once, want 4", made)
	}
}
