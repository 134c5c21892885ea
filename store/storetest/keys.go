package storetest

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
)

// TestKeys runs the conformance suite of identity.Keys (and of the spending of key chains)
// against the stores open returns.
func TestKeys(t *testing.T, open IdentityOpener) {
	runIdentity(t, open, []identityCase{
		{"CreateKey", testCreateKey},
		{"KeyRoundTrip", testKeyRoundTrip},
		{"KeysByUser", testKeysByUser},
		{"RevokeKey", testRevokeKey},
		{"TouchKeys", testTouchKeys},
		{"CreateKeyWithin", testCreateKeyWithin},
		{"RotateKey", testRotateKey},
		{"KeyChains", testKeyChains},
		{"ChainSpentAndUsage", testChainSpentAndUsage},
		{"ConcurrentRotations", testConcurrentRotations},
		{"ConcurrentCreateKeyWithin", testConcurrentCreateKeyWithin},
	})
}

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

// liveKeys are the ids of user u1's keys neither revoked nor expired at now.
func liveKeys(t *testing.T, s IdentityStore, now time.Time) []string {
	t.Helper()
	keys, err := s.KeysByUser(context.Background(), "u1")
	if err != nil {
		t.Fatal(err)
	}
	var live []string
	for _, k := range keys {
		if k.RevokedAt == nil && (k.ExpiresAt == nil || now.Before(*k.ExpiresAt)) {
			live = append(live, k.ID)
		}
	}
	slices.Sort(live)
	return live
}

func testCreateKey(t *testing.T, open IdentityOpener) {
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
		{"missing id", testKey("", "x", created), errAny},
		{"missing user", func() identity.Key { k := testKey("k2", "x", created); k.UserID = ""; return k }(), errAny},
		{"missing hash", identity.Key{ID: "k2", UserID: "u1"}, errAny},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			s := openWithUser(t, open, nil)
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

func testKeyRoundTrip(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	clock := NewClock()
	s := openWithUser(t, open, clock)
	created := time.Date(2030, 1, 1, 0, 0, 0, 987654321, time.UTC)
	full := testKey("k1", "sk_live_k1_secret", created)
	revoked := created.Add(time.Hour)
	full.RevokedAt = &revoked
	full.LastUsedAt = &created
	full.CreditCapPeriod = "day"
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

func testKeysByUser(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	s := openWithUser(t, open, nil)
	addUser(t, s, "u2")
	base := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	for i, id := range []string{"a", "b", "c"} {
		if err := s.CreateKey(ctx, testKey(id, "secret-"+id, base.Add(time.Duration(i)*time.Minute))); err != nil {
			t.Fatal(err)
		}
	}
	// Created at the same time: the greater id first.
	for _, id := range []string{"y", "x"} {
		if err := s.CreateKey(ctx, testKey(id, "secret-"+id, base.Add(time.Hour))); err != nil {
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
		{"newest first", "u1", []string{"y", "x", "c", "b", "a"}},
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

func testRevokeKey(t *testing.T, open IdentityOpener) {
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
			s := openWithUser(t, open, nil)
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

func testTouchKeys(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	s := openWithUser(t, open, nil)
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

// testCreateKeyWithin: the bound counts the user's keys neither revoked, nor expired, nor
// rotated; a refusal stores nothing.
func testCreateKeyWithin(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	clock := NewClock()
	s := openWithUser(t, open, clock)
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
	// An unknown user has no room to check: ErrNotFound.
	nobody := key("h")
	nobody.UserID = "nobody"
	checkErr(t, s.CreateKeyWithin(ctx, nobody, 4), identity.ErrNotFound)
}

// testConcurrentCreateKeyWithin: 20 creations at once through two instances, for a user with
// 4 live keys and a bound of 8: exactly the room left, 4, is taken; repeated.
func testConcurrentCreateKeyWithin(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	clock := NewClock()
	stores := open(t, clock.Now, 2)
	now := clock.Now()
	const n, maxLive, existing = 20, 8, 4
	iterations := RaceIterations(t, 5)
	for it := range iterations {
		user := fmt.Sprint("user-", it)
		addUser(t, stores[0], user)
		key := func(id string) identity.Key {
			k := testKey(fmt.Sprintf("%s-%s", user, id), user+id, now)
			k.UserID, k.ExpiresAt = user, nil
			return k
		}
		for i := range existing {
			if err := stores[1].CreateKey(ctx, key(fmt.Sprint("old", i))); err != nil {
				t.Fatal(err)
			}
		}
		errs := make([]error, n)
		var wg sync.WaitGroup
		ready := make(chan struct{})
		for i := range n {
			wg.Go(func() {
				<-ready
				errs[i] = stores[i%2].CreateKeyWithin(ctx, key(fmt.Sprint("new", i)), maxLive)
			})
		}
		close(ready)
		wg.Wait()
		made := 0
		for _, err := range errs {
			switch {
			case err == nil:
				made++
			case !errors.Is(err, identity.ErrKeyLimit):
				t.Fatalf("iteration %d: concurrent creation: %v", it, err)
			}
		}
		keys, err := stores[0].KeysByUser(ctx, user)
		if err != nil {
			t.Fatal(err)
		}
		if made != maxLive-existing || len(keys) != maxLive {
			t.Fatalf("iteration %d: %d keys made at once, %d stored; want %d and %d", it, made, len(keys), maxLive-existing, maxLive)
		}
	}
}

func testRotateKey(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	clock := NewClock()
	s := openWithUser(t, open, clock)
	now := clock.Now()
	k1 := testKey("k1", "one", now)
	k1.ExpiresAt = nil
	if err := s.CreateKey(ctx, k1); err != nil {
		t.Fatal(err)
	}
	grace := now.Add(time.Hour)
	k2 := testKey("k2", "two", now)
	changed, err := s.RotateKey(ctx, "k1", k2, now, grace)
	if err != nil || !slices.Equal(changed, []string{"k1"}) {
		t.Fatalf("rotate: %v, %v", changed, err)
	}
	old, err := s.KeyByID(ctx, "k1")
	if err != nil {
		t.Fatal(err)
	}
	if old.RotatedTo != "k2" || old.DeprecatedAt == nil || !old.DeprecatedAt.Equal(now) || old.ExpiresAt == nil || !old.ExpiresAt.Equal(grace) {
		t.Errorf("old key after rotation: %+v", old)
	}
	if got, err := s.KeyByID(ctx, "k2"); err != nil || got.Name != k2.Name || got.CreditCap != k2.CreditCap {
		t.Errorf("new key: %+v, %v", got, err)
	}
	if live := liveKeys(t, s, now); !slices.Equal(live, []string{"k1", "k2"}) {
		t.Errorf("live during grace: %v", live)
	}
	if live := liveKeys(t, s, grace); !slices.Equal(live, []string{"k2"}) {
		t.Errorf("live after grace: %v", live)
	}

	// Rotating k1 again, a revoked key or an unknown one stores nothing.
	if _, err := s.RotateKey(ctx, "k1", testKey("k9", "nine", now), now, grace); !errors.Is(err, identity.ErrNotRotatable) || !errors.Is(err, identity.ErrConflict) {
		t.Errorf("second rotation: %v", err)
	}
	if _, err := s.KeyByID(ctx, "k9"); !errors.Is(err, identity.ErrNotFound) {
		t.Errorf("the refused rotation stored its key: %v", err)
	}
	if _, err := s.RotateKey(ctx, "nope", testKey("k9", "nine", now), now, grace); !errors.Is(err, identity.ErrNotFound) {
		t.Errorf("unknown key: %v", err)
	}
	// A successor whose hash is taken: ErrConflict, and the old key is not rotated.
	_, err = s.RotateKey(ctx, "k2", testKey("k9", "one", now), now, grace)
	checkErr(t, err, identity.ErrConflict)
	if got, _ := s.KeyByID(ctx, "k2"); got.RotatedTo != "" || got.DeprecatedAt != nil {
		t.Errorf("a failed rotation changed the key: %+v", got)
	}

	// Rotating k2 during k1's grace: k1 stops now, so only k2 (in its grace) and k3 live.
	later := now.Add(time.Minute)
	k3 := testKey("k3", "three", later)
	changed, err = s.RotateKey(ctx, "k2", k3, later, later.Add(time.Hour))
	if err != nil || !slices.Equal(changed, []string{"k2", "k1"}) {
		t.Fatalf("second link: %v, %v", changed, err)
	}
	if live := liveKeys(t, s, later); !slices.Equal(live, []string{"k2", "k3"}) {
		t.Errorf("live after the second rotation: %v", live)
	}
	// The grace never extends an earlier expiry.
	k3exp := *k3.ExpiresAt
	if _, err := s.RotateKey(ctx, "k3", testKey("k4", "four", later), later, k3exp.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.KeyByID(ctx, "k3"); !got.ExpiresAt.Equal(k3exp) {
		t.Errorf("grace moved the expiry from %s to %s", k3exp, got.ExpiresAt)
	}
	// Revoked or expired keys are not rotated.
	if err := s.RevokeKey(ctx, "k4", later); err != nil {
		t.Fatal(err)
	}
	if _, err := s.RotateKey(ctx, "k4", testKey("k5", "five", later), later, later); !errors.Is(err, identity.ErrNotRotatable) {
		t.Errorf("rotating a revoked key: %v", err)
	}
	if _, err := s.RotateKey(ctx, "k3", testKey("k5", "five", later), k3exp, k3exp.Add(time.Hour)); !errors.Is(err, identity.ErrNotRotatable) {
		t.Errorf("rotating an expired key: %v", err)
	}
}

// testKeyChains: a created key starts its own chain (whatever ChainID it was given); each
// rotation puts the new key in the old key's chain.
func testKeyChains(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	clock := NewClock()
	s := openWithUser(t, open, clock)
	now := clock.Now()
	k1 := testKey("k1", "one", now)
	k1.ChainID = "elsewhere"
	if err := s.CreateKey(ctx, k1); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateKey(ctx, testKey("other", "other", now)); err != nil {
		t.Fatal(err)
	}
	for i, id := range []string{"k2", "k3", "k4"} {
		next := testKey(id, id, now)
		next.ChainID = "elsewhere"
		if _, err := s.RotateKey(ctx, fmt.Sprintf("k%d", i+1), next, now, now.Add(time.Hour)); err != nil {
			t.Fatal(err)
		}
	}
	for id, want := range map[string]string{"k1": "k1", "k2": "k1", "k3": "k1", "k4": "k1", "other": "other"} {
		if k, err := s.KeyByID(ctx, id); err != nil || k.ChainID != want {
			t.Errorf("key %s: chain %q, %v; want %q", id, k.ChainID, err, want)
		}
	}
}

// testChainSpentAndUsage, on the real clock (the ledger stamps its entries with it): a chain's
// spending sums the settle entries of all its keys, since a time; the usage report groups an
// account's settle entries by day and model.
func testChainSpentAndUsage(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	s := openWithUser(t, open, nil)
	account := credits.UserAccount("u1")
	credit(t, s, account, 100*c)
	now := time.Now()
	settle := func(key, model string, cost credits.Amount) {
		t.Helper()
		r := reserve(t, s, account, cost, time.Minute)
		if _, err := s.Settle(ctx, r.ID, cost, credits.Usage{Model: model, InputTokens: 1, OutputTokens: 2, KeyID: key}); err != nil {
			t.Fatal(err)
		}
	}
	// ka and its successor ka2 are one chain; kb another.
	for _, id := range []string{"ka", "kb"} {
		if err := s.CreateKey(ctx, testKey(id, id, now)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.RotateKey(ctx, "ka", testKey("ka2", "ka2", now), now, now.Add(48*time.Hour)); err != nil {
		t.Fatal(err)
	}
	settle("ka", "m1", 1*c)
	settle("ka", "m2", 2*c)
	settle("kb", "m1", 4*c)
	// A boundary strictly between the entries before and after it, at the stores' precision.
	time.Sleep(2 * time.Millisecond)
	mid := time.Now().Truncate(time.Millisecond)
	time.Sleep(2 * time.Millisecond)
	settle("ka2", "m1", 8*c)
	settle("", "m1", 16*c)

	for _, tc := range []struct {
		key   string
		since time.Time
		want  credits.Amount
	}{
		{"ka", time.Time{}, 11 * c},
		{"ka", mid, 8 * c},
		{"ka2", time.Time{}, 0}, // a chain is named by its first key
		{"kb", time.Time{}, 4 * c},
		{"kb", mid, 0},
		{"nobody", time.Time{}, 0},
	} {
		if got, err := s.ChainSpent(ctx, tc.key, tc.since); err != nil || got != tc.want {
			t.Errorf("ChainSpent(%s, %s) = %s, %v; want %s", tc.key, tc.since, got, err, tc.want)
		}
	}
	entries, err := s.Entries(ctx, account, 6)
	if err != nil || len(entries) != 6 {
		t.Fatalf("entries %+v, %v", entries, err)
	}
	if entries[0].Usage == nil || entries[0].Usage.KeyID != "" || entries[1].Usage.KeyID != "ka2" {
		t.Errorf("settle entries' keys %+v, %+v", entries[0].Usage, entries[1].Usage)
	}
	// The days the entries fell on (two, should the test run across midnight UTC).
	var want []credits.UsageDay
	add := func(e credits.Entry) {
		day := e.CreatedAt.UTC().Format(time.DateOnly)
		for i := range want {
			if want[i].Day == day && want[i].Model == e.Usage.Model {
				want[i].Requests++
				want[i].InputTokens += e.Usage.InputTokens
				want[i].OutputTokens += e.Usage.OutputTokens
				want[i].Credits += e.Amount
				return
			}
		}
		want = append(want, credits.UsageDay{Day: day, Model: e.Usage.Model, Requests: 1,
			InputTokens: e.Usage.InputTokens, OutputTokens: e.Usage.OutputTokens, Credits: e.Amount})
	}
	for _, e := range entries[:5] {
		add(e)
	}
	slices.SortFunc(want, func(a, b credits.UsageDay) int {
		if a.Day != b.Day {
			return -cmpString(a.Day, b.Day)
		}
		return cmpString(a.Model, b.Model)
	})
	usage, err := s.UsageByDay(ctx, account, now.Add(-time.Hour))
	if err != nil || !slices.Equal(usage, want) {
		t.Errorf("usage %+v, %v; want %+v", usage, err, want)
	}
	if usage, err := s.UsageByDay(ctx, account, time.Now().Add(time.Hour)); err != nil || usage == nil || len(usage) != 0 {
		t.Errorf("usage since later: %+v, %v; want empty", usage, err)
	}
	CheckBooks(t, s, account)
}

func cmpString(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// testConcurrentRotations: 50 rotations of one key at once through two instances: one wins,
// the others get ErrNotRotatable and store nothing, and two keys are live; repeated.
func testConcurrentRotations(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	clock := NewClock()
	stores := open(t, clock.Now, 2)
	addUser(t, stores[0], "u1")
	now := clock.Now()
	const n = 50
	iterations := RaceIterations(t, 5)
	for it := range iterations {
		id := fmt.Sprint("k", it)
		if err := stores[0].CreateKey(ctx, testKey(id, id, now)); err != nil {
			t.Fatal(err)
		}
		errs := make([]error, n)
		var wg sync.WaitGroup
		ready := make(chan struct{})
		for i := range n {
			wg.Go(func() {
				<-ready
				next := testKey(fmt.Sprintf("%s-n%02d", id, i), fmt.Sprint(id, "secret", i), now)
				_, errs[i] = stores[i%2].RotateKey(ctx, id, next, now, now.Add(time.Hour))
			})
		}
		close(ready)
		wg.Wait()
		won := -1
		for i, err := range errs {
			switch {
			case err == nil:
				if won >= 0 {
					t.Fatalf("iteration %d: rotations %d and %d both won", it, won, i)
				}
				won = i
			case !errors.Is(err, identity.ErrNotRotatable):
				t.Fatalf("iteration %d, rotation %d: %v", it, i, err)
			}
		}
		if won < 0 {
			t.Fatalf("iteration %d: no rotation won", it)
		}
		old, err := stores[1].KeyByID(ctx, id)
		if want := fmt.Sprintf("%s-n%02d", id, won); err != nil || old.RotatedTo != want {
			t.Fatalf("iteration %d: rotated to %q, %v; want %q", it, old.RotatedTo, err, want)
		}
		if live := liveKeys(t, stores[1], now); len(live) != 2*(it+1) {
			t.Fatalf("iteration %d: live keys %v, want two per rotated key", it, live)
		}
	}
}
