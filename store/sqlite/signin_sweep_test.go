package sqlite

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/signin"
)

// countRows counts the rows of a sign-in table.
func countRows(t *testing.T, s *Store, table string) int {
	t.Helper()
	var n int
	if err := s.read.QueryRowContext(context.Background(), `SELECT count(*) FROM `+table).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestSweep, on the injected clock: expired sessions go at once; codes an hour after their
// expiry; refresh families an hour after their newest token expired or they were revoked, all
// their tokens at once; a live family keeps its rotated tokens, and what is kept still works.
func TestSweep(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openWithUser(t, clock)
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
	if total, live := familyState(t, s, "rotating", t0.Add(25*time.Hour)); total != 3 || live != 1 {
		t.Fatalf("the live family: %d tokens, %d live; want 3 and 1", total, live)
	}
	// Reuse detection still works on the kept tokens: presenting the first one revokes the
	// family; an hour later it is swept whole.
	_, _, err = s.RotateRefresh(ctx, tokenHash("rt-rot-1"), nextRefresh("rt-x", t0.Add(26*time.Hour)), t0.Add(26*time.Hour), time.Minute)
	checkErr(t, err, signin.ErrRefreshReused)
	sweep(t0.Add(27*time.Hour), signin.Swept{RefreshTokens: 3})
	for _, table := range []string{"sessions", "auth_codes", "refresh_tokens"} {
		if n := countRows(t, s, table); n != 0 {
			t.Errorf("%s: %d rows left", table, n)
		}
	}
}

// TestSweepChunks: more rows than one statement takes are all deleted, in one call.
func TestSweepChunks(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openWithUser(t, clock)
	t0 := clock.Now()
	n := sweepChunk + sweepChunk/2
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		h := tokenHash(fmt.Sprint("s", i))
		if _, err := tx.ExecContext(ctx, `INSERT INTO sessions (hash, user_id, created_at, expires_at) VALUES (?, 'u1', ?, ?)`,
			h[:], micros(t0), micros(t0.Add(time.Minute))); err != nil {
			t.Fatal(err)
		}
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	got, err := s.Sweep(ctx, t0.Add(time.Minute))
	if err != nil || got.Sessions != int64(n) || countRows(t, s, "sessions") != 0 {
		t.Fatalf("Sweep = %+v, %v; %d sessions left", got, err, countRows(t, s, "sessions"))
	}
}

// TestSessionsPerUserBound: a user keeps at most MaxSessionsPerUser sessions, the newest; a
// new session also takes the user's expired ones away, and nobody else's.
func TestSessionsPerUserBound(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openWithUser(t, clock)
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
	if n := countRows(t, s, "sessions"); n != signin.MaxSessionsPerUser+1 {
		t.Fatalf("%d sessions, want %d of u1 and the one of u2", n, signin.MaxSessionsPerUser)
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
	if n := countRows(t, s, "sessions"); n != 2 {
		t.Fatalf("%d sessions after the others expired, want the new one and u2's", n)
	}
}

// TestRefreshFamiliesPerUserBound: the (MaxFamiliesPerUser+1)th live family of a user revokes
// the least recently used one; families that are over do not count, nor other users'.
func TestRefreshFamiliesPerUserBound(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s, _ := openWithUser(t, clock)
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
		if _, live := familyState(t, s, fmt.Sprint("fam", i), at); live != 1 {
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
	check("fam1", 0)
	check("fam0", 1)
	check("fam2", 1)
	check("fam-new", 1)
	check("other", 1)
	_, _, err := s.RotateRefresh(ctx, tokenHash("rt1"), nextRefresh("rt1-b", at), at.Add(2*time.Second), 0)
	checkErr(t, err, signin.ErrRefreshDead)
	var live int
	if err := s.read.QueryRowContext(ctx, `SELECT count(DISTINCT family) FROM refresh_tokens
		WHERE user_id = 'u1' AND rotated_at IS NULL AND revoked_at IS NULL`).Scan(&live); err != nil || live != signin.MaxFamiliesPerUser {
		t.Fatalf("u1 has %d live families (%v), want %d", live, err, signin.MaxFamiliesPerUser)
	}
}
