package sqlite

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/signin"
)

// raceIterationsEnv sets how many times the concurrency tests repeat themselves.
const raceIterationsEnv = "LLM_GATEWAY_RACE_ITERATIONS"

// raceIterations is the number in raceIterationsEnv, or def (a tenth of it with -short).
func raceIterations(t *testing.T, def int) int {
	t.Helper()
	v := os.Getenv(raceIterationsEnv)
	if v == "" {
		if testing.Short() {
			return max(1, def/10)
		}
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		t.Fatalf("%s=%q: want a positive number", raceIterationsEnv, v)
	}
	return n
}

// tokenHash is the SHA-256 of a token, as the sign-in store keeps it.
func tokenHash(token string) [32]byte { return sha256.Sum256([]byte(token)) }

// hexHash is the SHA-256 (hex) of a token: a refresh token's origin.
func hexHash(token string) string {
	h := tokenHash(token)
	return hex.EncodeToString(h[:])
}

// addUser creates one more user.
func addUser(t *testing.T, s *Store, id string) {
	t.Helper()
	if err := s.CreateUser(context.Background(), identity.User{ID: id, Email: id + "@example.com"}); err != nil {
		t.Fatal(err)
	}
}

// testSigningKey is a signing key whose private key is derived from seed.
func testSigningKey(kid string, seed byte, created time.Time) signin.SigningKey {
	return signin.SigningKey{
		KID:       kid,
		Private:   ed25519.NewKeyFromSeed(bytes.Repeat([]byte{seed}, ed25519.SeedSize)),
		CreatedAt: created,
	}
}

func TestSigningKeys(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openTestStore(t, clock)
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

func TestServerSecret(t *testing.T) {
	ctx := context.Background()
	path := t.TempDir() + "/gateway.db"
	s := openAt(t, path, Options{})

	// Concurrent first calls agree on one secret.
	const n = 8
	secrets := make([][]byte, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { secrets[i], errs[i] = s.ServerSecret(ctx) })
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
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	// It survives a restart.
	s = openAt(t, path, Options{})
	defer s.Close()
	again, err := s.ServerSecret(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(again, secrets[0]) {
		t.Error("the secret changed across a restart")
	}

	// Another store has another secret.
	other, _ := openTestStore(t, nil)
	o, err := other.ServerSecret(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(o, again) {
		t.Error("two stores have the same secret")
	}
}

func TestApps(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openTestStore(t, clock)
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

func TestSessions(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openWithUser(t, clock)
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
func liveRefresh(t *testing.T, s *Store, token, family, user, client, origin string, created time.Time) signin.Refresh {
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
func refreshOf(t *testing.T, s *Store, hash [32]byte) signin.Refresh {
	t.Helper()
	r, err := s.RefreshByHash(context.Background(), hash)
	if err != nil {
		t.Fatalf("refresh token: %v", err)
	}
	return r
}

func TestConsents(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openWithUser(t, clock)
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

func TestRedeemCode(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openWithUser(t, clock)
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

// TestConcurrentRedeemCode: 50 redemptions of one code at once: exactly one redeems it, the
// others get ErrCodeUsed with the code; repeated.
func TestConcurrentRedeemCode(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openWithUser(t, clock)
	now := clock.Now()
	const n = 50
	iterations := raceIterations(t, 200)
	start := time.Now()
	for it := range iterations {
		c := testCode(fmt.Sprint("concurrent-code-", it), now)
		if err := s.CreateCode(ctx, c); err != nil {
			t.Fatal(err)
		}
		codes := make([]signin.Code, n)
		errs := make([]error, n)
		var wg sync.WaitGroup
		ready := make(chan struct{})
		for i := range n {
			wg.Go(func() {
				<-ready
				codes[i], errs[i] = s.RedeemCode(ctx, c.Hash, now.Add(time.Duration(i)*time.Microsecond))
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

// familyState counts the tokens of a family, and the live ones at at.
func familyState(t *testing.T, s *Store, family string, at time.Time) (total, live int) {
	t.Helper()
	err := s.read.QueryRowContext(context.Background(), `SELECT count(*),
		coalesce(sum(rotated_at IS NULL AND revoked_at IS NULL AND expires_at > ?), 0)
		FROM refresh_tokens WHERE family = ?`, micros(at), family).Scan(&total, &live)
	if err != nil {
		t.Fatal(err)
	}
	return total, live
}

// nextRefresh is the successor handed to RotateRefresh: only its hash, times and nothing else
// (the store fills in the rest from the old token).
func nextRefresh(token string, created time.Time) signin.Refresh {
	return signin.Refresh{Hash: tokenHash(token), CreatedAt: created, ExpiresAt: created.Add(24 * time.Hour)}
}

func TestCreateRefresh(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openWithUser(t, clock)
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

func TestRotateRefresh(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openWithUser(t, clock)
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
		if total, live := familyState(t, s, "fam", at.Add(d)); total != 2 || live != 1 {
			t.Errorf("replay %v after: %d tokens, %d live; want 2, 1", d, total, live)
		}
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
	if total, live := familyState(t, s, "fam", reuse); total != 2 || live != 0 {
		t.Errorf("after reuse: %d tokens, %d live; want 2, 0", total, live)
	}
}

// TestRotateRefreshReuseOfAnAncestor: RT1 presented within its grace after RT2 was itself
// rotated: its successor is no longer live, so it is reuse.
func TestRotateRefreshReuseOfAnAncestor(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openWithUser(t, clock)
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

// TestRotateRefreshSuccessorGone: within the grace, a successor that expired or was revoked
// makes the replay a reuse.
func TestRotateRefreshSuccessorGone(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openWithUser(t, clock)
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
	if total, live := familyState(t, s, "fam", t0); total != 2 || live != 0 {
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

func TestRotateRefreshDeadAndUnknown(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openWithUser(t, clock)
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

// TestConcurrentRotateRefresh: 20 rotations of one token at once, with a grace: exactly one
// rotates it, the others are Replayed with its successor, and the family has one live token
// (no fork); repeated.
func TestConcurrentRotateRefresh(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openWithUser(t, clock)
	const (
		n     = 20
		grace = 30 * time.Second
	)
	iterations := raceIterations(t, 100)
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
				olds[i], outcomes[i], errs[i] = s.RotateRefresh(ctx, rt.Hash, nextRefresh(fmt.Sprintf("rt-%d-%d", it, i), at), at, grace)
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
		if total, live := familyState(t, s, family, t0.Add(time.Second)); total != 2 || live != 1 {
			t.Fatalf("iteration %d: family has %d tokens, %d live; want 2, 1", it, total, live)
		}
		if r := refreshOf(t, s, successor); r.Family != family || r.RotatedAt != nil || r.RevokedAt != nil {
			t.Fatalf("iteration %d: successor %+v", it, r)
		}
	}
	t.Logf("%d iterations of %d concurrent rotations in %v", iterations, n, time.Since(start))
}

func TestRevokeRefreshByOrigin(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openWithUser(t, clock)
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

func TestExternalSubjects(t *testing.T) {
	ctx := context.Background()
	s, _ := openWithUser(t, nil)
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

// TestSigninFailuresAreStoreUnavailable: once the store is closed, every method fails with
// credits.ErrStoreUnavailable, not a verdict.
func TestSigninFailuresAreStoreUnavailable(t *testing.T) {
	ctx := context.Background()
	s, _ := openWithUser(t, nil)
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

// TestSigninPlaintextNeverStored writes a session, an authorization code, refresh tokens (one
// rotated to another) and an app's secret with known plaintexts, and looks for the plaintexts,
// in raw, hex and base64 forms, in every byte of the database file and its WAL: only their
// hashes may be there.
func TestSigninPlaintextNeverStored(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, path := openWithUser(t, clock)
	now := clock.Now()
	const (
		sessionToken = "sess_Hq3vL8pX2nW6tR0yK4mB9cJ7"
		codeToken    = "code_Vb5nM1qZ8wE3rT6yU0iO4pA2"
		refreshToken = "rt_Gd7fS2hJ9kL4zX1cV6bN3mQ8"
		nextToken    = "rt_Pw0oE9iR4uT7yZ2xC5vB8nM1"
		appSecret    = "cs_Ty6uI1oP3aS8dF5gH0jK7lZ4"
	)
	if err := s.CreateSession(ctx, signin.Session{Hash: tokenHash(sessionToken), UserID: "u1", ExpiresAt: now.Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	code := testCode(codeToken, now)
	if err := s.CreateCode(ctx, code); err != nil {
		t.Fatal(err)
	}
	if _, err := s.RedeemCode(ctx, code.Hash, now); err != nil {
		t.Fatal(err)
	}
	origin := hex.EncodeToString(code.Hash[:])
	rt := liveRefresh(t, s, refreshToken, "fam", "u1", "cli-a", origin, now)
	if _, o, err := s.RotateRefresh(ctx, rt.Hash, nextRefresh(nextToken, now), now, time.Second); err != nil || o != signin.Rotated {
		t.Fatalf("rotate: %v, %v", o, err)
	}
	secretHash := tokenHash(appSecret)
	if err := s.CreateApp(ctx, signin.App{ClientID: "cli-a", SecretHash: secretHash[:], RedirectURIs: []string{"https://a.example/cb"}}); err != nil {
		t.Fatal(err)
	}
	// Read them back too, so that nothing on the read path writes them either.
	if _, err := s.SessionByHash(ctx, tokenHash(sessionToken)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.RefreshByHash(ctx, tokenHash(nextToken)); err != nil {
		t.Fatal(err)
	}

	secrets := []string{sessionToken, codeToken, refreshToken, nextToken, appSecret}
	scan := func(label string) {
		t.Helper()
		all := storeFileBytes(t, path, label)
		for _, secret := range secrets {
			_, body, _ := strings.Cut(secret, "_")
			for _, form := range []string{
				secret,
				body,
				hex.EncodeToString([]byte(secret)),
				base64.StdEncoding.EncodeToString([]byte(secret)),
				base64.RawURLEncoding.EncodeToString([]byte(secret)),
				base64.StdEncoding.EncodeToString([]byte(body)),
			} {
				if bytes.Contains(all, []byte(form)) {
					t.Errorf("%s: the database holds %q", label, form)
				}
			}
			// The scan can see what is there: the hash is.
			h := tokenHash(secret)
			if !bytes.Contains(all, h[:]) {
				t.Errorf("%s: the hash of %s is not in the files: the scan sees nothing", label, secret)
			}
		}
	}
	scan("open") // still in the WAL
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	scan("closed") // checkpointed into the file
}
