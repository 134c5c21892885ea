package storetest

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/signin"
)

// TestSignin runs the conformance suite of signin.Store against the stores open returns.
func TestSignin(t *testing.T, open IdentityOpener) {
	runIdentity(t, open, []identityCase{
		{"SigningKeys", testSigningKeys},
		{"ServerSecret", testServerSecret},
		{"Apps", testApps},
		{"Sessions", testSessions},
		{"Consents", testConsents},
		{"RedeemCode", testRedeemCode},
		{"CreateRefresh", testCreateRefresh},
		{"RotateRefresh", testRotateRefresh},
		{"RotateRefreshReuseOfAnAncestor", testRotateRefreshReuseOfAnAncestor},
		{"RotateRefreshSuccessorGone", testRotateRefreshSuccessorGone},
		{"RotateRefreshDeadAndUnknown", testRotateRefreshDeadAndUnknown},
		{"RevokeRefreshByOrigin", testRevokeRefreshByOrigin},
		{"ExternalSubjects", testExternalSubjects},
		{"FailuresAreStoreUnavailable", testSigninFailuresAreStoreUnavailable},
		{"Sweep", testSweep},
		{"SessionsPerUserBound", testSessionsPerUserBound},
		{"RefreshFamiliesPerUserBound", testRefreshFamiliesPerUserBound},
		{"ConcurrentRedeemCode", testConcurrentRedeemCode},
		{"ConcurrentRotateRefresh", testConcurrentRotateRefresh},
		{"ConcurrentReuse", testConcurrentReuse},
	})
}

// testSigningKey is a signing key whose private key is derived from seed.
func testSigningKey(kid string, seed byte, created time.Time) signin.SigningKey {
	return signin.SigningKey{
		KID:       kid,
		Private:   ed25519.NewKeyFromSeed(bytes.Repeat([]byte{seed}, ed25519.SeedSize)),
		CreatedAt: created,
	}
}

func testSigningKeys(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	clock := NewClock()
	s := openOne(t, open, clock)
	keys, err := s.SigningKeys(ctx)
	if err != nil || keys == nil || len(keys) != 0 {
		t.Fatalf("SigningKeys of a new store = %v, %v; want empty", keys, err)
	}

	now := clock.Now()
	var added []signin.SigningKey
	for i := range 4 {
		// The same creation time for two of them: the last added is the newest anyway.
		k := testSigningKey(fmt.Sprintf("kid%d", i), byte(i+1), now.Add(time.Duration(i/2)*time.Hour))
		if err := s.AddSigningKey(ctx, k, 3); err != nil {
			t.Fatalf("add %s: %v", k.KID, err)
		}
		added = append(added, k)
	}
	keys, err = s.SigningKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := []signin.SigningKey{added[3], added[2], added[1]}
	if !reflect.DeepEqual(keys, want) {
		t.Fatalf("SigningKeys = %v, want kid3, kid2, kid1 as added", kids(keys))
	}

	// keep 1: only the new one.
	k := testSigningKey("kid4", 9, time.Time{})
	if err := s.AddSigningKey(ctx, k, 1); err != nil {
		t.Fatal(err)
	}
	keys, err = s.SigningKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 1 || keys[0].KID != "kid4" || !keys[0].CreatedAt.Equal(now) {
		t.Fatalf("after keep 1: %v (created %v), want kid4 created now", kids(keys), keys[0].CreatedAt)
	}

	for _, tc := range []struct {
		name string
		key  signin.SigningKey
		keep int
		want error
	}{
		{"taken kid", testSigningKey("kid4", 7, now), 3, identity.ErrConflict},
		{"no kid", testSigningKey("", 7, now), 3, errAny},
		{"short key", signin.SigningKey{KID: "short", Private: make([]byte, 32)}, 3, errAny},
		{"keep 0", testSigningKey("kid5", 7, now), 0, errAny},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkErr(t, s.AddSigningKey(ctx, tc.key, tc.keep), tc.want)
		})
	}
	if keys, _ := s.SigningKeys(ctx); len(keys) != 1 {
		t.Errorf("refused additions changed the keys: %v", kids(keys))
	}
}

func kids(keys []signin.SigningKey) []string {
	var out []string
	for _, k := range keys {
		out = append(out, k.KID)
	}
	return out
}

// testServerSecret: concurrent first calls, through two instances, agree on one secret; another
// store has another.
func testServerSecret(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	stores := open(t, nil, 2)
	const n = 8
	secrets := make([][]byte, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { secrets[i], errs[i] = stores[i%2].ServerSecret(ctx) })
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("call %d: %v", i, errs[i])
		}
		if len(secrets[i]) != 32 {
			t.Fatalf("call %d: secret of %d bytes", i, len(secrets[i]))
		}
		if !bytes.Equal(secrets[i], secrets[0]) {
			t.Fatalf("calls 0 and %d returned different secrets", i)
		}
	}
	if bytes.Equal(secrets[0], make([]byte, 32)) {
		t.Fatal("the secret is all zeros")
	}
	if again, err := stores[1].ServerSecret(ctx); err != nil || !bytes.Equal(again, secrets[0]) {
		t.Errorf("a later call: %v; the secret changed", err)
	}
	other := openOne(t, open, nil)
	o, err := other.ServerSecret(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(o, secrets[0]) {
		t.Error("two stores have the same secret")
	}
}

func testApps(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	clock := NewClock()
	s := openOne(t, open, clock)
	now := clock.Now()

	if apps, err := s.Apps(ctx); err != nil || apps == nil || len(apps) != 0 {
		t.Fatalf("Apps of a new store = %v, %v; want empty", apps, err)
	}
	secret := tokenHash("app-secret")
	confidential := signin.App{
		ClientID:     "cli-b",
		Name:         "Backend",
		RedirectURIs: []string{"https://b.example/cb", "http://127.0.0.1:8080/cb"},
		FirstParty:   true,
		Scopes:       []string{"chat", "models"},
		SecretHash:   secret[:],
		CreatedAt:    now,
	}
	public := signin.App{ClientID: "cli-a", Name: "SPA", RedirectURIs: []string{"https://a.example/"}, CreatedAt: now}
	later := signin.App{ClientID: "cli-0", Name: "Later", Scopes: []string{}, CreatedAt: now.Add(time.Second)}
	for _, a := range []signin.App{confidential, public, later} {
		if err := s.CreateApp(ctx, a); err != nil {
			t.Fatalf("create %s: %v", a.ClientID, err)
		}
	}
	for _, a := range []signin.App{confidential, public, later} {
		got, err := s.AppByID(ctx, a.ClientID)
		if err != nil {
			t.Fatalf("app %s: %v", a.ClientID, err)
		}
		if !reflect.DeepEqual(got, a) {
			t.Errorf("app %s:\n got %+v\nwant %+v", a.ClientID, got, a)
		}
	}
	apps, err := s.Apps(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(apps, []signin.App{confidential, public, later}) {
		t.Errorf("Apps = %+v, want cli-b, cli-a (same time, in order of creation), cli-0", apps)
	}

	// A zero creation time is now; an empty secret hash is a public client.
	if err := s.CreateApp(ctx, signin.App{ClientID: "cli-z", SecretHash: []byte{}}); err != nil {
		t.Fatal(err)
	}
	if got, err := s.AppByID(ctx, "cli-z"); err != nil || got.SecretHash != nil || !got.CreatedAt.Equal(now) {
		t.Errorf("cli-z = %+v, %v; want no secret, created now", got, err)
	}

	_, err = s.AppByID(ctx, "nope")
	checkErr(t, err, identity.ErrNotFound)
	checkErr(t, s.CreateApp(ctx, signin.App{ClientID: "cli-a", Name: "again"}), identity.ErrConflict)
	checkErr(t, s.CreateApp(ctx, signin.App{Name: "no id"}), errAny)
	checkErr(t, s.CreateApp(ctx, signin.App{ClientID: "bad", SecretHash: []byte("short")}), errAny)
}

func testSessions(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	clock := NewClock()
	s := openWithUser(t, open, clock)
	now := clock.Now()

	se := signin.Session{Hash: tokenHash("cookie-1"), UserID: "u1", CreatedAt: now, ExpiresAt: now.Add(time.Hour)}
	if err := s.CreateSession(ctx, se); err != nil {
		t.Fatal(err)
	}
	got, err := s.SessionByHash(ctx, se.Hash)
	if err != nil || !reflect.DeepEqual(got, se) {
		t.Fatalf("SessionByHash = %+v, %v; want %+v", got, err, se)
	}
	// An expired session is still returned: the caller checks.
	expired := signin.Session{Hash: tokenHash("cookie-2"), UserID: "u1", ExpiresAt: now.Add(-time.Minute)}
	if err := s.CreateSession(ctx, expired); err != nil {
		t.Fatal(err)
	}
	if got, err := s.SessionByHash(ctx, expired.Hash); err != nil || !got.ExpiresAt.Equal(expired.ExpiresAt) || !got.CreatedAt.Equal(now) {
		t.Errorf("expired session = %+v, %v", got, err)
	}

	checkErr(t, s.CreateSession(ctx, se), identity.ErrConflict)
	checkErr(t, s.CreateSession(ctx, signin.Session{Hash: tokenHash("x"), UserID: "nobody", ExpiresAt: now}), identity.ErrNotFound)
	checkErr(t, s.CreateSession(ctx, signin.Session{UserID: "u1", ExpiresAt: now}), errAny)
	checkErr(t, s.CreateSession(ctx, signin.Session{Hash: tokenHash("y"), UserID: "u1"}), errAny)

	if err := s.DeleteSession(ctx, se.Hash); err != nil {
		t.Fatal(err)
	}
	_, err = s.SessionByHash(ctx, se.Hash)
	checkErr(t, err, identity.ErrNotFound)
	if err := s.DeleteSession(ctx, se.Hash); err != nil {
		t.Errorf("deleting a missing session: %v", err)
	}
	if _, err := s.SessionByHash(ctx, expired.Hash); err != nil {
		t.Errorf("deleting one session deleted another: %v", err)
	}
}

// liveRefresh creates the first refresh token of a family.
func liveRefresh(t *testing.T, s IdentityStore, token, family, user, client, origin string, created time.Time) signin.Refresh {
	t.Helper()
	r := signin.Refresh{
		Hash: tokenHash(token), Family: family, UserID: user, ClientID: client,
		Scopes: []string{"chat"}, Origin: origin, CreatedAt: created, ExpiresAt: created.Add(24 * time.Hour),
	}
	if err := s.CreateRefresh(context.Background(), r); err != nil {
		t.Fatalf("create refresh %s: %v", token, err)
	}
	return r
}

// refreshOf reads a refresh token, failing the test when it is missing.
func refreshOf(t *testing.T, s IdentityStore, hash [32]byte) signin.Refresh {
	t.Helper()
	r, err := s.RefreshByHash(context.Background(), hash)
	if err != nil {
		t.Fatalf("refresh token: %v", err)
	}
	return r
}

func testConsents(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	clock := NewClock()
	s := openWithUser(t, open, clock)
	addUser(t, s, "u2")
	now := clock.Now()

	_, err := s.ConsentFor(ctx, "u1", "cli-a")
	checkErr(t, err, identity.ErrNotFound)
	if list, err := s.ConsentsByUser(ctx, "u1"); err != nil || list == nil || len(list) != 0 {
		t.Fatalf("ConsentsByUser = %v, %v; want empty", list, err)
	}

	a := signin.Consent{UserID: "u1", Client: "cli-a", Scopes: []string{"chat"}, CreatedAt: now}
	b := signin.Consent{UserID: "u1", Client: "origin:https://b.example", Scopes: []string{"chat", "models"}, CreatedAt: now.Add(time.Minute)}
	other := signin.Consent{UserID: "u2", Client: "cli-a", Scopes: []string{"chat"}, CreatedAt: now}
	for _, c := range []signin.Consent{a, b, other} {
		if err := s.SaveConsent(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	if got, err := s.ConsentFor(ctx, "u1", "cli-a"); err != nil || !reflect.DeepEqual(got, a) {
		t.Fatalf("ConsentFor = %+v, %v; want %+v", got, err, a)
	}
	if list, err := s.ConsentsByUser(ctx, "u1"); err != nil || !reflect.DeepEqual(list, []signin.Consent{b, a}) {
		t.Fatalf("ConsentsByUser = %+v, %v; want b, a (newest first)", list, err)
	}

	// Tokens of u1 with cli-a, of u1 with another client and of u2 with cli-a.
	t1 := liveRefresh(t, s, "rt-u1-a", "fam1", "u1", "cli-a", "", now)
	t2 := liveRefresh(t, s, "rt-u1-a-2", "fam2", "u1", "cli-a", "", now)
	tOther := liveRefresh(t, s, "rt-u1-b", "fam3", "u1", b.Client, "", now)
	tU2 := liveRefresh(t, s, "rt-u2-a", "fam4", "u2", "cli-a", "", now)
	earlier := now.Add(-time.Hour)
	if err := s.RevokeRefreshFamily(ctx, "fam2", earlier); err != nil {
		t.Fatal(err)
	}

	at := clock.Advance(time.Hour)
	if err := s.RevokeConsent(ctx, "u1", "cli-a", at); err != nil {
		t.Fatal(err)
	}
	got, err := s.ConsentFor(ctx, "u1", "cli-a")
	if err != nil || got.RevokedAt == nil || !got.RevokedAt.Equal(at) {
		t.Fatalf("revoked consent = %+v, %v; want revoked at %v", got, err, at)
	}
	if r := refreshOf(t, s, t1.Hash); r.RevokedAt == nil || !r.RevokedAt.Equal(at) {
		t.Errorf("token of the consent: revoked at %v, want %v", r.RevokedAt, at)
	}
	if r := refreshOf(t, s, t2.Hash); r.RevokedAt == nil || !r.RevokedAt.Equal(earlier) {
		t.Errorf("token revoked before: revoked at %v, want %v kept", r.RevokedAt, earlier)
	}
	for _, tok := range []signin.Refresh{tOther, tU2} {
		if r := refreshOf(t, s, tok.Hash); r.RevokedAt != nil {
			t.Errorf("token of %s/%s was revoked", tok.UserID, tok.ClientID)
		}
	}
	if c, err := s.ConsentFor(ctx, "u2", "cli-a"); err != nil || c.RevokedAt != nil {
		t.Errorf("u2's consent: %+v, %v; want live", c, err)
	}
	if list, err := s.ConsentsByUser(ctx, "u1"); err != nil || !reflect.DeepEqual(list, []signin.Consent{b}) {
		t.Errorf("ConsentsByUser after revoking = %+v, %v; want b only", list, err)
	}

	// No live consent: ErrNotFound.
	checkErr(t, s.RevokeConsent(ctx, "u1", "cli-a", at), identity.ErrNotFound)
	checkErr(t, s.RevokeConsent(ctx, "u1", "cli-never", at), identity.ErrNotFound)
	checkErr(t, s.RevokeConsent(ctx, "nobody", "cli-a", at), identity.ErrNotFound)

	// Saving again replaces it and clears the revocation, even when asked to store one.
	again := signin.Consent{UserID: "u1", Client: "cli-a", Scopes: []string{"chat", "embeddings"}, CreatedAt: clock.Advance(time.Minute), RevokedAt: &at}
	if err := s.SaveConsent(ctx, again); err != nil {
		t.Fatal(err)
	}
	again.RevokedAt = nil
	if got, err := s.ConsentFor(ctx, "u1", "cli-a"); err != nil || !reflect.DeepEqual(got, again) {
		t.Errorf("re-saved consent = %+v, %v; want %+v", got, err, again)
	}
	if list, err := s.ConsentsByUser(ctx, "u1"); err != nil || !reflect.DeepEqual(list, []signin.Consent{again, b}) {
		t.Errorf("ConsentsByUser after saving again = %+v, %v", list, err)
	}
	// A zero creation time is now.
	if err := s.SaveConsent(ctx, signin.Consent{UserID: "u2", Client: "cli-z"}); err != nil {
		t.Fatal(err)
	}
	if c, err := s.ConsentFor(ctx, "u2", "cli-z"); err != nil || !c.CreatedAt.Equal(clock.Now()) || c.Scopes != nil {
		t.Errorf("consent with zero fields = %+v, %v", c, err)
	}

	checkErr(t, s.SaveConsent(ctx, signin.Consent{UserID: "nobody", Client: "cli-a"}), identity.ErrNotFound)
	checkErr(t, s.SaveConsent(ctx, signin.Consent{UserID: "u1"}), errAny)
}

// testCode is a code of user u1 for cli-a.
func testCode(token string, created time.Time) signin.Code {
	return signin.Code{
		Hash:        tokenHash(token),
		ClientID:    "cli-a",
		UserID:      "u1",
		RedirectURI: "https://a.example/cb?x=1",
		Scopes:      []string{"chat", "models"},
		Challenge:   "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
		CreatedAt:   created,
		ExpiresAt:   created.Add(time.Minute),
	}
}

func testRedeemCode(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	clock := NewClock()
	s := openWithUser(t, open, clock)
	now := clock.Now()

	c := testCode("code-1", now)
	if err := s.CreateCode(ctx, c); err != nil {
		t.Fatal(err)
	}
	at := now.Add(10 * time.Second)
	got, err := s.RedeemCode(ctx, c.Hash, at)
	if err != nil {
		t.Fatal(err)
	}
	want := c
	want.UsedAt = &at
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("RedeemCode =\n %+v\nwant %+v", got, want)
	}

	// Again: the code, as first redeemed, and ErrCodeUsed.
	got, err = s.RedeemCode(ctx, c.Hash, at.Add(time.Second))
	checkErr(t, err, signin.ErrCodeUsed)
	if errors.Is(err, credits.ErrStoreUnavailable) {
		t.Errorf("ErrCodeUsed reported as a store failure: %v", err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("RedeemCode of a used code =\n %+v\nwant %+v", got, want)
	}

	// An expired code is marked used too.
	expired := testCode("code-2", now.Add(-time.Hour))
	if err := s.CreateCode(ctx, expired); err != nil {
		t.Fatal(err)
	}
	if got, err := s.RedeemCode(ctx, expired.Hash, at); err != nil || got.UsedAt == nil || !got.ExpiresAt.Equal(expired.ExpiresAt) {
		t.Errorf("redeeming an expired code = %+v, %v; want it, marked used", got, err)
	}
	if _, err := s.RedeemCode(ctx, expired.Hash, at); !errors.Is(err, signin.ErrCodeUsed) {
		t.Errorf("redeeming an expired code twice: %v, want ErrCodeUsed", err)
	}

	_, err = s.RedeemCode(ctx, tokenHash("never issued"), at)
	checkErr(t, err, identity.ErrNotFound)

	// A zero creation time is now.
	zero := testCode("code-3", now)
	zero.CreatedAt = time.Time{}
	if err := s.CreateCode(ctx, zero); err != nil {
		t.Fatal(err)
	}
	if got, err := s.RedeemCode(ctx, zero.Hash, at); err != nil || !got.CreatedAt.Equal(now) {
		t.Errorf("code with zero creation time = %+v, %v", got, err)
	}

	checkErr(t, s.CreateCode(ctx, c), identity.ErrConflict)
	bad := testCode("code-4", now)
	bad.UserID = "nobody"
	checkErr(t, s.CreateCode(ctx, bad), identity.ErrNotFound)
	bad = testCode("code-5", now)
	bad.Hash = [32]byte{}
	checkErr(t, s.CreateCode(ctx, bad), errAny)
	bad = testCode("code-6", now)
	bad.ExpiresAt = time.Time{}
	checkErr(t, s.CreateCode(ctx, bad), errAny)
}

// testConcurrentRedeemCode: 50 redemptions of one code at once, through two instances: exactly one redeems it, the
// others get ErrCodeUsed with the code; repeated.
func testConcurrentRedeemCode(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	clock := NewClock()
	stores := open(t, clock.Now, 2)
	addUser(t, stores[0], "u1")
	now := clock.Now()
	const n = 50
	iterations := RaceIterations(t, 10)
	start := time.Now()
	for it := range iterations {
		c := testCode(fmt.Sprint("concurrent-code-", it), now)
		if err := stores[it%2].CreateCode(ctx, c); err != nil {
			t.Fatal(err)
		}
		codes := make([]signin.Code, n)
		errs := make([]error, n)
		var wg sync.WaitGroup
		ready := make(chan struct{})
		for i := range n {
			wg.Go(func() {
				<-ready
				codes[i], errs[i] = stores[i%2].RedeemCode(ctx, c.Hash, now.Add(time.Duration(i)*time.Microsecond))
			})
		}
		close(ready)
		wg.Wait()
		won, used := -1, 0
		for i, err := range errs {
			switch {
			case err == nil:
				if won >= 0 {
					t.Fatalf("iteration %d: calls %d and %d both redeemed the code", it, won, i)
				}
				won = i
			case errors.Is(err, signin.ErrCodeUsed):
				used++
			default:
				t.Fatalf("iteration %d, call %d: %v", it, i, err)
			}
		}
		if won < 0 || used != n-1 {
			t.Fatalf("iteration %d: winner %d, %d ErrCodeUsed; want one winner and %d", it, won, used, n-1)
		}
		wantUsed := now.Add(time.Duration(won) * time.Microsecond)
		for i := range codes {
			if codes[i].Hash != c.Hash || codes[i].UsedAt == nil || !codes[i].UsedAt.Equal(wantUsed) {
				t.Fatalf("iteration %d, call %d: code %+v, want the code used at the winner's time", it, i, codes[i])
			}
		}
	}
	t.Logf("%d iterations of %d concurrent redemptions in %v", iterations, n, time.Since(start))
}

// familyState follows a family from its first token along the successors, and counts its
// tokens and the live ones (neither rotated, revoked nor expired) at at.
func familyState(t *testing.T, s IdentityStore, first string, at time.Time) (total, live int) {
	t.Helper()
	h := tokenHash(first)
	var family string
	for {
		r, err := s.RefreshByHash(context.Background(), h)
		if err != nil {
			t.Fatalf("token %d of the family of %s: %v", total, first, err)
		}
		if total == 0 {
			family = r.Family
		} else if r.Family != family {
			t.Fatalf("token %d of the family of %s is of family %s", total, first, r.Family)
		}
		total++
		if r.RotatedAt == nil && r.RevokedAt == nil && r.ExpiresAt.After(at) {
			live++
		}
		if r.Successor == nil {
			return total, live
		}
		h = *r.Successor
	}
}

// notStored fails the test unless no refresh token was stored for any of the tokens.
func notStored(t *testing.T, s IdentityStore, tokens ...string) {
	t.Helper()
	for _, tok := range tokens {
		if _, err := s.RefreshByHash(context.Background(), tokenHash(tok)); !errors.Is(err, identity.ErrNotFound) {
			t.Errorf("refresh token %s: %v, want ErrNotFound (never stored)", tok, err)
		}
	}
}

// nextRefresh is the successor handed to RotateRefresh: only its hash, times and nothing else
// (the store fills in the rest from the old token).
func nextRefresh(token string, created time.Time) signin.Refresh {
	return signin.Refresh{Hash: tokenHash(token), CreatedAt: created, ExpiresAt: created.Add(24 * time.Hour)}
}

func testCreateRefresh(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	clock := NewClock()
	s := openWithUser(t, open, clock)
	now := clock.Now()

	r := signin.Refresh{
		Hash: tokenHash("rt"), Family: "fam", UserID: "u1", ClientID: "cli-a", Scopes: []string{"chat", "models"},
		Origin: hexHash("code"), CreatedAt: now, ExpiresAt: now.Add(time.Hour),
	}
	if err := s.CreateRefresh(ctx, r); err != nil {
		t.Fatal(err)
	}
	if got := refreshOf(t, s, r.Hash); !reflect.DeepEqual(got, r) {
		t.Errorf("RefreshByHash =\n %+v\nwant %+v", got, r)
	}
	// Password grant: no origin; zero creation time is now; rotation fields are ignored.
	pw := signin.Refresh{Hash: tokenHash("rt-pw"), Family: "fam-pw", UserID: "u1", ClientID: "cli-a",
		ExpiresAt: now.Add(time.Hour), RotatedAt: &now, RevokedAt: &now}
	if err := s.CreateRefresh(ctx, pw); err != nil {
		t.Fatal(err)
	}
	if got := refreshOf(t, s, pw.Hash); got.Origin != "" || !got.CreatedAt.Equal(now) || got.RotatedAt != nil || got.RevokedAt != nil || got.Successor != nil {
		t.Errorf("password grant token = %+v", got)
	}

	_, err := s.RefreshByHash(ctx, tokenHash("never"))
	checkErr(t, err, identity.ErrNotFound)
	dup := r
	dup.Family = "fam-other"
	checkErr(t, s.CreateRefresh(ctx, dup), identity.ErrConflict)
	sameFamily := r
	sameFamily.Hash = tokenHash("rt-2")
	checkErr(t, s.CreateRefresh(ctx, sameFamily), identity.ErrConflict)
	unknown := r
	unknown.Hash, unknown.Family, unknown.UserID = tokenHash("rt-3"), "fam-3", "nobody"
	checkErr(t, s.CreateRefresh(ctx, unknown), identity.ErrNotFound)
	for _, bad := range []signin.Refresh{
		{Family: "f", UserID: "u1", ClientID: "c", ExpiresAt: now},
		{Hash: tokenHash("b"), UserID: "u1", ClientID: "c", ExpiresAt: now},
		{Hash: tokenHash("b"), Family: "f", ClientID: "c", ExpiresAt: now},
		{Hash: tokenHash("b"), Family: "f", UserID: "u1", ExpiresAt: now},
		{Hash: tokenHash("b"), Family: "f", UserID: "u1", ClientID: "c"},
	} {
		checkErr(t, s.CreateRefresh(ctx, bad), errAny)
	}
}

func testRotateRefresh(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	clock := NewClock()
	s := openWithUser(t, open, clock)
	const grace = 30 * time.Second
	t0 := clock.Now()
	origin := hexHash("the code")
	rt1 := liveRefresh(t, s, "rt1", "fam", "u1", "cli-a", origin, t0)

	// Rotated: the old token as it was; next inherits the family and the grant.
	at := t0.Add(time.Minute)
	next := nextRefresh("rt2", at)
	next.Family, next.UserID, next.ClientID, next.Scopes, next.Origin = "ignored", "ignored", "ignored", []string{"admin"}, "ignored"
	old, outcome, err := s.RotateRefresh(ctx, rt1.Hash, next, at, grace)
	if err != nil || outcome != signin.Rotated {
		t.Fatalf("RotateRefresh = %v, %v; want Rotated", outcome, err)
	}
	if !reflect.DeepEqual(old, rt1) {
		t.Errorf("old token =\n %+v\nwant it as it was %+v", old, rt1)
	}
	rt2 := refreshOf(t, s, tokenHash("rt2"))
	want2 := signin.Refresh{Hash: tokenHash("rt2"), Family: "fam", UserID: "u1", ClientID: "cli-a", Scopes: rt1.Scopes,
		Origin: origin, CreatedAt: at, ExpiresAt: next.ExpiresAt}
	if !reflect.DeepEqual(rt2, want2) {
		t.Errorf("successor =\n %+v\nwant %+v", rt2, want2)
	}
	rotated := refreshOf(t, s, rt1.Hash)
	if rotated.RotatedAt == nil || !rotated.RotatedAt.Equal(at) || rotated.Successor == nil || *rotated.Successor != rt2.Hash || rotated.RevokedAt != nil {
		t.Errorf("rotated token = %+v, want rotated at %v to rt2", rotated, at)
	}

	// Within the grace, up to its very end: Replayed, with the successor; nothing written.
	for _, d := range []time.Duration{0, time.Second, grace} {
		old, outcome, err := s.RotateRefresh(ctx, rt1.Hash, nextRefresh(fmt.Sprint("rt2-replay", d), at.Add(d)), at.Add(d), grace)
		if err != nil || outcome != signin.Replayed {
			t.Fatalf("replay %v after: %v, %v; want Replayed", d, outcome, err)
		}
		if !reflect.DeepEqual(old, rotated) {
			t.Errorf("replay %v after: old = %+v, want %+v", d, old, rotated)
		}
		if total, live := familyState(t, s, "rt1", at.Add(d)); total != 2 || live != 1 || t.Failed() {
			t.Errorf("replay %v after: %d tokens, %d live; want 2, 1", d, total, live)
		}
		notStored(t, s, fmt.Sprint("rt2-replay", d))
	}

	// After the grace: reuse; the whole family, successor included, is revoked.
	reuse := at.Add(grace + time.Microsecond)
	old, outcome, err = s.RotateRefresh(ctx, rt1.Hash, nextRefresh("rt2-late", reuse), reuse, grace)
	checkErr(t, err, signin.ErrRefreshReused)
	if errors.Is(err, credits.ErrStoreUnavailable) || outcome != 0 || old.Hash != rt1.Hash {
		t.Errorf("reuse: %+v, %v, %v", old, outcome, err)
	}
	for _, h := range [][32]byte{rt1.Hash, rt2.Hash} {
		if r := refreshOf(t, s, h); r.RevokedAt == nil || !r.RevokedAt.Equal(reuse) {
			t.Errorf("after reuse: token revoked at %v, want %v", r.RevokedAt, reuse)
		}
	}
	if _, err := s.RefreshByHash(ctx, tokenHash("rt2-late")); !errors.Is(err, identity.ErrNotFound) {
		t.Errorf("the reused token's next was stored: %v", err)
	}
	// The successor is dead now, and so is the reused token when presented again.
	for _, h := range [][32]byte{rt2.Hash, rt1.Hash} {
		_, _, err = s.RotateRefresh(ctx, h, nextRefresh("rt3", reuse), reuse.Add(time.Second), grace)
		checkErr(t, err, signin.ErrRefreshDead)
	}
	if total, live := familyState(t, s, "rt1", reuse); total != 2 || live != 0 {
		t.Errorf("after reuse: %d tokens, %d live; want 2, 0", total, live)
	}
}

// testRotateRefreshReuseOfAnAncestor: RT1 presented within its grace after RT2 was itself
// rotated: its successor is no longer live, so it is reuse.
func testRotateRefreshReuseOfAnAncestor(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	clock := NewClock()
	s := openWithUser(t, open, clock)
	const grace = 30 * time.Second
	t0 := clock.Now()
	rt1 := liveRefresh(t, s, "rt1", "fam", "u1", "cli-a", "", t0)
	if _, o, err := s.RotateRefresh(ctx, rt1.Hash, nextRefresh("rt2", t0), t0, grace); err != nil || o != signin.Rotated {
		t.Fatalf("rt1 -> rt2: %v, %v", o, err)
	}
	if _, o, err := s.RotateRefresh(ctx, tokenHash("rt2"), nextRefresh("rt3", t0), t0.Add(time.Second), grace); err != nil || o != signin.Rotated {
		t.Fatalf("rt2 -> rt3: %v, %v", o, err)
	}
	at := t0.Add(2 * time.Second)
	_, _, err := s.RotateRefresh(ctx, rt1.Hash, nextRefresh("rt2-again", at), at, grace)
	checkErr(t, err, signin.ErrRefreshReused)
	for _, tok := range []string{"rt1", "rt2", "rt3"} {
		if r := refreshOf(t, s, tokenHash(tok)); r.RevokedAt == nil || !r.RevokedAt.Equal(at) {
			t.Errorf("%s revoked at %v, want %v", tok, r.RevokedAt, at)
		}
	}
}

// testRotateRefreshSuccessorGone: within the grace, a successor that expired or was revoked
// makes the replay a reuse.
func testRotateRefreshSuccessorGone(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	clock := NewClock()
	s := openWithUser(t, open, clock)
	const grace = 30 * time.Second
	t0 := clock.Now()

	// The successor expires 10 s after the rotation.
	rt1 := liveRefresh(t, s, "rt1", "fam", "u1", "cli-a", "", t0)
	short := nextRefresh("rt2", t0)
	short.ExpiresAt = t0.Add(10 * time.Second)
	if _, o, err := s.RotateRefresh(ctx, rt1.Hash, short, t0, grace); err != nil || o != signin.Rotated {
		t.Fatalf("rotate: %v, %v", o, err)
	}
	if _, o, err := s.RotateRefresh(ctx, rt1.Hash, short, t0.Add(5*time.Second), grace); err != nil || o != signin.Replayed {
		t.Fatalf("replay while the successor lives: %v, %v; want Replayed", o, err)
	}
	at := t0.Add(10 * time.Second)
	_, _, err := s.RotateRefresh(ctx, rt1.Hash, short, at, grace)
	checkErr(t, err, signin.ErrRefreshReused)
	if total, live := familyState(t, s, "rt1", t0); total != 2 || live != 0 {
		t.Errorf("family: %d tokens, %d live at t0; want 2, 0 (revoked)", total, live)
	}

	// The successor's family is revoked (say, by a replayed code): the replay is refused.
	rtA := liveRefresh(t, s, "rtA", "famA", "u1", "cli-a", "", t0)
	if _, o, err := s.RotateRefresh(ctx, rtA.Hash, nextRefresh("rtB", t0), t0, grace); err != nil || o != signin.Rotated {
		t.Fatalf("rotate: %v, %v", o, err)
	}
	if err := s.RevokeRefreshFamily(ctx, "famA", t0.Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	_, _, err = s.RotateRefresh(ctx, rtA.Hash, nextRefresh("rtB", t0), t0.Add(2*time.Second), grace)
	checkErr(t, err, signin.ErrRefreshDead)
}

func testRotateRefreshDeadAndUnknown(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	clock := NewClock()
	s := openWithUser(t, open, clock)
	const grace = 30 * time.Second
	t0 := clock.Now()

	// Expired: dead, nothing written.
	exp := liveRefresh(t, s, "rt-exp", "fam-exp", "u1", "cli-a", "", t0)
	for _, at := range []time.Time{exp.ExpiresAt, exp.ExpiresAt.Add(time.Hour)} {
		old, outcome, err := s.RotateRefresh(ctx, exp.Hash, nextRefresh("rt-exp-next", at), at, grace)
		checkErr(t, err, signin.ErrRefreshDead)
		if errors.Is(err, credits.ErrStoreUnavailable) || outcome != 0 || old.Hash != exp.Hash {
			t.Errorf("expired: %+v, %v, %v", old, outcome, err)
		}
	}
	if r := refreshOf(t, s, exp.Hash); r.RotatedAt != nil || r.RevokedAt != nil {
		t.Errorf("rotating an expired token changed it: %+v", r)
	}
	if _, err := s.RefreshByHash(ctx, tokenHash("rt-exp-next")); !errors.Is(err, identity.ErrNotFound) {
		t.Errorf("rotating an expired token stored a successor: %v", err)
	}

	// Revoked: dead.
	rev := liveRefresh(t, s, "rt-rev", "fam-rev", "u1", "cli-a", "", t0)
	if err := s.RevokeRefreshFamily(ctx, "fam-rev", t0); err != nil {
		t.Fatal(err)
	}
	_, _, err := s.RotateRefresh(ctx, rev.Hash, nextRefresh("rt-rev-next", t0), t0.Add(time.Second), grace)
	checkErr(t, err, signin.ErrRefreshDead)

	// Unknown.
	old, outcome, err := s.RotateRefresh(ctx, tokenHash("never"), nextRefresh("x", t0), t0, grace)
	checkErr(t, err, identity.ErrNotFound)
	if !reflect.DeepEqual(old, signin.Refresh{}) || outcome != 0 {
		t.Errorf("unknown: %+v, %v", old, outcome)
	}

	// A successor hash that is taken: ErrConflict, and the old token stays live.
	live := liveRefresh(t, s, "rt-live", "fam-live", "u1", "cli-a", "", t0)
	_, _, err = s.RotateRefresh(ctx, live.Hash, nextRefresh("rt-rev", t0), t0, grace)
	checkErr(t, err, identity.ErrConflict)
	if r := refreshOf(t, s, live.Hash); r.RotatedAt != nil || r.Successor != nil {
		t.Errorf("a failed rotation changed the token: %+v", r)
	}
	// A next token without hash or expiry is refused.
	_, _, err = s.RotateRefresh(ctx, live.Hash, signin.Refresh{ExpiresAt: t0.Add(time.Hour)}, t0, grace)
	checkErr(t, err, errAny)
	_, _, err = s.RotateRefresh(ctx, live.Hash, signin.Refresh{Hash: tokenHash("n")}, t0, grace)
	checkErr(t, err, errAny)
	// Still rotatable; a zero creation time of next is at.
	at := t0.Add(time.Second)
	if _, o, err := s.RotateRefresh(ctx, live.Hash, signin.Refresh{Hash: tokenHash("n"), ExpiresAt: at.Add(time.Hour)}, at, grace); err != nil || o != signin.Rotated {
		t.Fatalf("rotate: %v, %v", o, err)
	}
	if r := refreshOf(t, s, tokenHash("n")); !r.CreatedAt.Equal(at) {
		t.Errorf("next created at %v, want %v", r.CreatedAt, at)
	}
}

// testConcurrentRotateRefresh: 50 rotations of one token at once through two instances, with
// a grace: exactly one
// rotates it, the others are Replayed with its successor, and the family has one live token
// (no fork); repeated.
func testConcurrentRotateRefresh(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	clock := NewClock()
	stores := open(t, clock.Now, 2)
	s := stores[0]
	addUser(t, s, "u1")
	const (
		n     = 50
		grace = 30 * time.Second
	)
	iterations := RaceIterations(t, 10)
	t0 := clock.Now()
	start := time.Now()
	for it := range iterations {
		family := fmt.Sprint("fam-", it)
		rt := liveRefresh(t, s, fmt.Sprint("rt-", it), family, "u1", "cli-a", "", t0)
		outcomes := make([]signin.RotateOutcome, n)
		olds := make([]signin.Refresh, n)
		errs := make([]error, n)
		var wg sync.WaitGroup
		ready := make(chan struct{})
		for i := range n {
			wg.Go(func() {
				<-ready
				at := t0.Add(time.Duration(i) * time.Millisecond)
				olds[i], outcomes[i], errs[i] = stores[i%2].RotateRefresh(ctx, rt.Hash, nextRefresh(fmt.Sprintf("rt-%d-%d", it, i), at), at, grace)
			})
		}
		close(ready)
		wg.Wait()
		won, replayed := -1, 0
		for i := range n {
			switch {
			case errs[i] != nil:
				t.Fatalf("iteration %d, call %d: %v", it, i, errs[i])
			case outcomes[i] == signin.Rotated:
				if won >= 0 {
					t.Fatalf("iteration %d: calls %d and %d both rotated", it, won, i)
				}
				won = i
			case outcomes[i] == signin.Replayed:
				replayed++
			default:
				t.Fatalf("iteration %d, call %d: outcome %v", it, i, outcomes[i])
			}
		}
		if won < 0 || replayed != n-1 {
			t.Fatalf("iteration %d: winner %d, %d replayed; want one winner and %d", it, won, replayed, n-1)
		}
		successor := tokenHash(fmt.Sprintf("rt-%d-%d", it, won))
		for i := range n {
			if i != won && (olds[i].Successor == nil || *olds[i].Successor != successor) {
				t.Fatalf("iteration %d, call %d: replayed with successor %v, want the winner's", it, i, olds[i].Successor)
			}
		}
		for i := range n {
			if i != won {
				notStored(t, stores[1], fmt.Sprintf("rt-%d-%d", it, i))
			}
		}
		if total, live := familyState(t, s, fmt.Sprint("rt-", it), t0.Add(time.Second)); total != 2 || live != 1 {
			t.Fatalf("iteration %d: family has %d tokens, %d live; want 2, 1", it, total, live)
		}
		if r := refreshOf(t, s, successor); r.Family != family || r.RotatedAt != nil || r.RevokedAt != nil {
			t.Fatalf("iteration %d: successor %+v", it, r)
		}
	}
	t.Logf("%d iterations of %d concurrent rotations in %v", iterations, n, time.Since(start))
}

func testRevokeRefreshByOrigin(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	clock := NewClock()
	s := openWithUser(t, open, clock)
	t0 := clock.Now()
	originA := hexHash("code A")
	originB := hexHash("code B")

	a1 := liveRefresh(t, s, "a1", "famA1", "u1", "cli-a", originA, t0)
	if _, o, err := s.RotateRefresh(ctx, a1.Hash, nextRefresh("a1-next", t0), t0, time.Second); err != nil || o != signin.Rotated {
		t.Fatalf("rotate: %v, %v", o, err)
	}
	liveRefresh(t, s, "a2", "famA2", "u1", "cli-a", originA, t0)
	earlier := t0.Add(-time.Hour)
	if err := s.RevokeRefreshFamily(ctx, "famA2", earlier); err != nil {
		t.Fatal(err)
	}
	liveRefresh(t, s, "b", "famB", "u1", "cli-a", originB, t0)
	pw := liveRefresh(t, s, "pw", "famPW", "u1", "cli-a", "", t0)

	// The empty origin names no code: nothing is revoked.
	if err := s.RevokeRefreshByOrigin(ctx, "", t0); err != nil {
		t.Fatal(err)
	}
	if r := refreshOf(t, s, pw.Hash); r.RevokedAt != nil {
		t.Fatal("revoking the empty origin revoked a password grant token")
	}

	at := t0.Add(time.Minute)
	if err := s.RevokeRefreshByOrigin(ctx, originA, at); err != nil {
		t.Fatal(err)
	}
	for tok, want := range map[string]*time.Time{"a1": &at, "a1-next": &at, "a2": &earlier, "b": nil, "pw": nil} {
		r := refreshOf(t, s, tokenHash(tok))
		switch {
		case want == nil && r.RevokedAt != nil:
			t.Errorf("%s revoked at %v, want live", tok, r.RevokedAt)
		case want != nil && (r.RevokedAt == nil || !r.RevokedAt.Equal(*want)):
			t.Errorf("%s revoked at %v, want %v", tok, r.RevokedAt, *want)
		}
	}
	// An unknown origin is not an error.
	if err := s.RevokeRefreshByOrigin(ctx, hexHash("never"), at); err != nil {
		t.Error(err)
	}
	if err := s.RevokeRefreshFamily(ctx, "no such family", at); err != nil {
		t.Error(err)
	}
}

func testExternalSubjects(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	s := openWithUser(t, open, nil)
	addUser(t, s, "u2")
	const issuer = "https://accounts.example.com"

	_, err := s.UserForSubject(ctx, issuer, "sub-1")
	checkErr(t, err, identity.ErrNotFound)
	if err := s.LinkSubject(ctx, issuer, "sub-1", "u1"); err != nil {
		t.Fatal(err)
	}
	// The same subject at another issuer is another identity.
	if err := s.LinkSubject(ctx, "https://other.example", "sub-1", "u2"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ issuer, subject, want string }{
		{issuer, "sub-1", "u1"},
		{"https://other.example", "sub-1", "u2"},
	} {
		if got, err := s.UserForSubject(ctx, tc.issuer, tc.subject); err != nil || got != tc.want {
			t.Errorf("UserForSubject(%s, %s) = %q, %v; want %q", tc.issuer, tc.subject, got, err, tc.want)
		}
	}
	checkErr(t, s.LinkSubject(ctx, issuer, "sub-1", "u2"), identity.ErrConflict)
	checkErr(t, s.LinkSubject(ctx, issuer, "sub-1", "u1"), identity.ErrConflict)
	checkErr(t, s.LinkSubject(ctx, issuer, "sub-2", "nobody"), identity.ErrNotFound)
	checkErr(t, s.LinkSubject(ctx, issuer, "", "u1"), errAny)
	if got, _ := s.UserForSubject(ctx, issuer, "sub-1"); got != "u1" {
		t.Errorf("a refused link changed the user to %q", got)
	}
}

// testSigninFailuresAreStoreUnavailable: once the store is closed, every method fails with
// credits.ErrStoreUnavailable, not a verdict.
func testSigninFailuresAreStoreUnavailable(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	s := openWithUser(t, open, nil)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	h := tokenHash("x")
	for name, call := range map[string]func() error{
		"SigningKeys":   func() error { _, err := s.SigningKeys(ctx); return err },
		"AddSigningKey": func() error { return s.AddSigningKey(ctx, testSigningKey("k", 1, now), 2) },
		"ServerSecret":  func() error { _, err := s.ServerSecret(ctx); return err },
		"CreateApp":     func() error { return s.CreateApp(ctx, signin.App{ClientID: "c"}) },
		"AppByID":       func() error { _, err := s.AppByID(ctx, "c"); return err },
		"Apps":          func() error { _, err := s.Apps(ctx); return err },
		"CreateSession": func() error {
			return s.CreateSession(ctx, signin.Session{Hash: h, UserID: "u1", ExpiresAt: now})
		},
		"SessionByHash":  func() error { _, err := s.SessionByHash(ctx, h); return err },
		"DeleteSession":  func() error { return s.DeleteSession(ctx, h) },
		"ConsentFor":     func() error { _, err := s.ConsentFor(ctx, "u1", "c"); return err },
		"SaveConsent":    func() error { return s.SaveConsent(ctx, signin.Consent{UserID: "u1", Client: "c"}) },
		"RevokeConsent":  func() error { return s.RevokeConsent(ctx, "u1", "c", now) },
		"ConsentsByUser": func() error { _, err := s.ConsentsByUser(ctx, "u1"); return err },
		"CreateCode":     func() error { return s.CreateCode(ctx, testCode("c", now)) },
		"RedeemCode":     func() error { _, err := s.RedeemCode(ctx, h, now); return err },
		"CreateRefresh": func() error {
			return s.CreateRefresh(ctx, signin.Refresh{Hash: h, Family: "f", UserID: "u1", ClientID: "c", ExpiresAt: now})
		},
		"RotateRefresh": func() error {
			_, _, err := s.RotateRefresh(ctx, h, nextRefresh("n", now), now, time.Second)
			return err
		},
		"RefreshByHash":         func() error { _, err := s.RefreshByHash(ctx, h); return err },
		"RevokeRefreshFamily":   func() error { return s.RevokeRefreshFamily(ctx, "f", now) },
		"RevokeRefreshByOrigin": func() error { return s.RevokeRefreshByOrigin(ctx, "o", now) },
		"UserForSubject":        func() error { _, err := s.UserForSubject(ctx, "i", "s"); return err },
		"Sweep":                 func() error { _, err := s.Sweep(ctx, now); return err },
		"LinkSubject":           func() error { return s.LinkSubject(ctx, "i", "s", "u1") },
	} {
		if err := call(); !errors.Is(err, credits.ErrStoreUnavailable) {
			t.Errorf("%s on a closed store: %v, want ErrStoreUnavailable", name, err)
		}
	}
}

// testSweep, on the injected clock: expired sessions go at once; codes an hour after their
// expiry; refresh families an hour after their newest token expired or they were revoked, all
// their tokens at once; a live family keeps its rotated tokens, and what is kept still works.
func testSweep(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	clock := NewClock()
	s := openWithUser(t, open, clock)
	t0 := clock.Now()

	for _, se := range []signin.Session{
		{Hash: tokenHash("s-live"), UserID: "u1", CreatedAt: t0, ExpiresAt: t0.Add(2 * time.Hour)},
		{Hash: tokenHash("s-dead"), UserID: "u1", CreatedAt: t0, ExpiresAt: t0.Add(30 * time.Minute)},
	} {
		if err := s.CreateSession(ctx, se); err != nil {
			t.Fatal(err)
		}
	}
	for _, tok := range []string{"c-used", "c-unused"} {
		if err := s.CreateCode(ctx, testCode(tok, t0)); err != nil { // expire at t0+1m
			t.Fatal(err)
		}
	}
	if _, err := s.RedeemCode(ctx, tokenHash("c-used"), t0); err != nil {
		t.Fatal(err)
	}
	later := signin.Code(testCode("c-later", t0.Add(30*time.Minute)))
	if err := s.CreateCode(ctx, later); err != nil {
		t.Fatal(err)
	}
	// Families (tokens live 24 h from their creation): "expiring" is never rotated; "revoked"
	// is revoked at t0+1m1s; "rotating" is rotated at t0 and t0+23h, so its newest token lives on.
	liveRefresh(t, s, "rt-expiring", "expiring", "u1", "cli-a", "", t0)
	liveRefresh(t, s, "rt-revoked", "revoked", "u1", "cli-a", "", t0)
	liveRefresh(t, s, "rt-rot-1", "rotating", "u1", "cli-a", "", t0)
	if _, _, err := s.RotateRefresh(ctx, tokenHash("rt-rot-1"), nextRefresh("rt-rot-2", t0), t0, 0); err != nil {
		t.Fatal(err)
	}
	if err := s.RevokeRefreshFamily(ctx, "revoked", t0.Add(61*time.Second)); err != nil {
		t.Fatal(err)
	}
	at23 := t0.Add(23 * time.Hour)
	if _, _, err := s.RotateRefresh(ctx, tokenHash("rt-rot-2"), nextRefresh("rt-rot-3", at23), at23, 0); err != nil {
		t.Fatal(err)
	}

	sweep := func(at time.Time, want signin.Swept) {
		t.Helper()
		got, err := s.Sweep(ctx, at)
		if err != nil || got != want {
			t.Fatalf("Sweep at t0+%v = %+v, %v; want %+v", at.Sub(t0), got, err, want)
		}
	}
	exists := func(what string, err error, want bool) {
		t.Helper()
		if want && err != nil || !want && err == nil {
			t.Fatalf("%s: err %v, want present %v", what, err, want)
		}
		if err != nil && err != identity.ErrNotFound {
			t.Fatalf("%s: %v", what, err)
		}
	}

	sweep(t0, signin.Swept{}) // nothing is over yet
	// t0+61m: the short session is over; the codes expired at t0+1m, an hour ago; "revoked"
	// was revoked less than an hour ago: it stays until the next sweep.
	sweep(t0.Add(61*time.Minute), signin.Swept{Sessions: 1, Codes: 2})
	_, err := s.SessionByHash(ctx, tokenHash("s-dead"))
	exists("the expired session", err, false)
	_, err = s.SessionByHash(ctx, tokenHash("s-live"))
	exists("the live session", err, true)
	_, err = s.RedeemCode(ctx, tokenHash("c-later"), t0.Add(61*time.Minute))
	exists("the code that expired less than an hour ago", err, true)

	sweep(t0.Add(61*time.Minute+time.Second), signin.Swept{RefreshTokens: 1}) // "revoked", past the hour
	_, err = s.RefreshByHash(ctx, tokenHash("rt-revoked"))
	exists("the revoked family", err, false)

	// t0+25h: "expiring" died at t0+24h, less than an hour ago; at t0+25h it has been an
	// hour. "rotating" keeps its three tokens: its newest lives until t0+47h.
	sweep(t0.Add(25*time.Hour-time.Second), signin.Swept{Sessions: 1, Codes: 1})
	sweep(t0.Add(25*time.Hour), signin.Swept{RefreshTokens: 1})
	if total, live := familyState(t, s, "rt-rot-1", t0.Add(25*time.Hour)); total != 3 || live != 1 {
		t.Fatalf("the live family: %d tokens, %d live; want 3 and 1", total, live)
	}
	// Reuse detection still works on the kept tokens: presenting the first one revokes the
	// family; an hour later it is swept whole.
	_, _, err = s.RotateRefresh(ctx, tokenHash("rt-rot-1"), nextRefresh("rt-x", t0.Add(26*time.Hour)), t0.Add(26*time.Hour), time.Minute)
	checkErr(t, err, signin.ErrRefreshReused)
	sweep(t0.Add(27*time.Hour), signin.Swept{RefreshTokens: 3})
	// Nothing is left.
	for _, tok := range []string{"s-live", "s-dead"} {
		_, err := s.SessionByHash(ctx, tokenHash(tok))
		exists("session "+tok, err, false)
	}
	for _, tok := range []string{"c-used", "c-unused", "c-later"} {
		_, err := s.RedeemCode(ctx, tokenHash(tok), t0.Add(27*time.Hour))
		exists("code "+tok, err, false)
	}
	notStored(t, s, "rt-expiring", "rt-revoked", "rt-rot-1", "rt-rot-2", "rt-rot-3", "rt-x")
}

// testSessionsPerUserBound: a user keeps at most MaxSessionsPerUser sessions, the newest; a
// new session also takes the user's expired ones away, and nobody else's.
func testSessionsPerUserBound(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	clock := NewClock()
	s := openWithUser(t, open, clock)
	if err := s.CreateUser(ctx, identity.User{ID: "u2", Email: "u2@example.com"}); err != nil {
		t.Fatal(err)
	}
	t0 := clock.Now()
	if err := s.CreateSession(ctx, signin.Session{Hash: tokenHash("other"), UserID: "u2", CreatedAt: t0, ExpiresAt: t0.Add(time.Second)}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < signin.MaxSessionsPerUser+5; i++ {
		at := t0.Add(time.Duration(i) * time.Second)
		if err := s.CreateSession(ctx, signin.Session{Hash: tokenHash(fmt.Sprint("s", i)), UserID: "u1", CreatedAt: at, ExpiresAt: at.Add(time.Hour)}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.SessionByHash(ctx, tokenHash("other")); err != nil {
		t.Fatalf("u2's session: %v", err)
	}
	for i := 0; i < signin.MaxSessionsPerUser+5; i++ {
		_, err := s.SessionByHash(ctx, tokenHash(fmt.Sprint("s", i)))
		if kept := i >= 5; kept != (err == nil) {
			t.Errorf("session %d: err %v, want kept %v", i, err, kept)
		}
	}
	// An expired session of u1 goes with the next sign-in of u1.
	clock.Advance(2 * time.Hour)
	if err := s.CreateSession(ctx, signin.Session{Hash: tokenHash("new"), UserID: "u1", ExpiresAt: clock.Now().Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	for i := 5; i < signin.MaxSessionsPerUser+5; i++ {
		if _, err := s.SessionByHash(ctx, tokenHash(fmt.Sprint("s", i))); !errors.Is(err, identity.ErrNotFound) {
			t.Errorf("expired session %d after the next sign-in: %v, want deleted", i, err)
		}
	}
	for _, tok := range []string{"new", "other"} {
		if _, err := s.SessionByHash(ctx, tokenHash(tok)); err != nil {
			t.Errorf("session %s: %v", tok, err)
		}
	}
}

// testRefreshFamiliesPerUserBound: the (MaxFamiliesPerUser+1)th live family of a user revokes
// the least recently used one; families that are over do not count, nor other users'.
func testRefreshFamiliesPerUserBound(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	clock := NewClock()
	s := openWithUser(t, open, clock)
	if err := s.CreateUser(ctx, identity.User{ID: "u2", Email: "u2@example.com"}); err != nil {
		t.Fatal(err)
	}
	t0 := clock.Now()
	liveRefresh(t, s, "other-user", "other", "u2", "cli-a", "", t0)
	liveRefresh(t, s, "revoked", "revoked", "u1", "cli-a", "", t0)
	if err := s.RevokeRefreshFamily(ctx, "revoked", t0); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < signin.MaxFamiliesPerUser; i++ {
		liveRefresh(t, s, fmt.Sprint("rt", i), fmt.Sprint("fam", i), "u1", "cli-a", "", t0.Add(time.Duration(i)*time.Second))
	}
	at := t0.Add(time.Minute)
	for i := 0; i < signin.MaxFamiliesPerUser; i++ {
		if _, live := familyState(t, s, fmt.Sprint("rt", i), at); live != 1 {
			t.Fatalf("family %d of %d is not live", i, signin.MaxFamiliesPerUser)
		}
	}
	// fam0 is used (rotated): fam1 is now the least recently used, and goes.
	if _, _, err := s.RotateRefresh(ctx, tokenHash("rt0"), nextRefresh("rt0-b", at), at, 0); err != nil {
		t.Fatal(err)
	}
	liveRefresh(t, s, "rt-new", "fam-new", "u1", "cli-b", "", at.Add(time.Second))
	check := func(family string, want int) {
		t.Helper()
		if _, live := familyState(t, s, family, at.Add(time.Second)); live != want {
			t.Errorf("family %s: %d live tokens, want %d", family, live, want)
		}
	}
	check("rt1", 0)
	check("rt0", 1)
	check("rt2", 1)
	check("rt-new", 1)
	check("other-user", 1)
	_, _, err := s.RotateRefresh(ctx, tokenHash("rt1"), nextRefresh("rt1-b", at), at.Add(2*time.Second), 0)
	checkErr(t, err, signin.ErrRefreshDead)
	live := 0
	for _, first := range append([]string{"revoked", "rt-new"}, func() (firsts []string) {
		for i := 0; i < signin.MaxFamiliesPerUser; i++ {
			firsts = append(firsts, fmt.Sprint("rt", i))
		}
		return firsts
	}()...) {
		_, n := familyState(t, s, first, at.Add(time.Second))
		live += n
	}
	if live != signin.MaxFamiliesPerUser {
		t.Fatalf("u1 has %d live families, want %d", live, signin.MaxFamiliesPerUser)
	}
}

// testConcurrentReuse: a rotated token presented 50 times at once through two instances after
// its grace: exactly one call detects the reuse (and revokes the family), the others find the
// token revoked; the whole family is revoked, nothing is stored; repeated.
func testConcurrentReuse(t *testing.T, open IdentityOpener) {
	ctx := context.Background()
	clock := NewClock()
	stores := open(t, clock.Now, 2)
	addUser(t, stores[0], "u1")
	const (
		n     = 50
		grace = 30 * time.Second
	)
	iterations := RaceIterations(t, 10)
	t0 := clock.Now()
	for it := range iterations {
		first := fmt.Sprint("reused-", it)
		rt := liveRefresh(t, stores[0], first, fmt.Sprint("fam-reused-", it), "u1", "cli-a", "", t0)
		if _, o, err := stores[1].RotateRefresh(ctx, rt.Hash, nextRefresh(first+"-next", t0), t0, grace); err != nil || o != signin.Rotated {
			t.Fatalf("iteration %d: rotate: %v, %v", it, o, err)
		}
		errs := make([]error, n)
		var wg sync.WaitGroup
		ready := make(chan struct{})
		late := t0.Add(grace + time.Second)
		for i := range n {
			wg.Go(func() {
				<-ready
				_, _, errs[i] = stores[i%2].RotateRefresh(ctx, rt.Hash, nextRefresh(fmt.Sprintf("%s-late-%d", first, i), late), late, grace)
			})
		}
		close(ready)
		wg.Wait()
		reused := 0
		for i, err := range errs {
			switch {
			case errors.Is(err, signin.ErrRefreshReused):
				reused++
			case errors.Is(err, signin.ErrRefreshDead):
			default:
				t.Fatalf("iteration %d, call %d: %v", it, i, err)
			}
			notStored(t, stores[0], fmt.Sprintf("%s-late-%d", first, i))
		}
		if reused != 1 {
			t.Fatalf("iteration %d: %d calls detected the reuse, want 1 (the others find the family revoked)", it, reused)
		}
		if total, live := familyState(t, stores[0], first, t0); total != 2 || live != 0 {
			t.Fatalf("iteration %d: family has %d tokens, %d live at t0; want 2, 0 (revoked)", it, total, live)
		}
	}
}
