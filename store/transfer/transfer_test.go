package transfer

import (
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"database/sql"
	"errors"
	"net/netip"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/signin"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/postgres"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/postgres/pgtest"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/sqlite"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/storetest"
)

// fixture is what the source store was given, to check the target against.
type fixture struct {
	users    []identity.User
	accounts []credits.AccountID
	audits   map[credits.AccountID]credits.Audit
	entries  map[credits.AccountID][]credits.Entry
	keys     map[string]identity.NewAPIKey // by key id
	stored   map[string]identity.Key
	chain    string
	spent    credits.Amount
	response string
	owner    credits.ResponseOwner
	code     [32]byte
	refresh  [32]byte
	session  [32]byte
	signing  []signin.SigningKey
	secret   []byte
	apps     []signin.App
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func hash(s string) [32]byte { return sha256.Sum256([]byte(s)) }

// buildSource makes an embedded store, through its API, with a bit of everything.
func buildSource(t *testing.T, path string) fixture {
	ctx := context.Background()
	now := time.Now().UTC().Truncate(time.Microsecond)
	s, err := sqlite.Open(ctx, path, sqlite.Options{})
	must(t, err)
	defer func() { must(t, s.Close()) }()
	f := fixture{audits: map[credits.AccountID]credits.Audit{}, entries: map[credits.AccountID][]credits.Entry{},
		keys: map[string]identity.NewAPIKey{}, stored: map[string]identity.Key{}}

	f.users = []identity.User{
		{ID: "u1", Email: "Ada@example.com", Tier: "pro", PasswordHash: "$argon2id$v=19$fake-but-opaque", CreatedAt: now},
		{ID: "u2", Email: "bob@example.com", Tier: "", CreatedAt: now.Add(time.Second)},
	}
	for _, u := range f.users {
		must(t, s.CreateUser(ctx, u))
	}
	u1, u2, anon := credits.UserAccount("u1"), credits.UserAccount("u2"), credits.AccountID("anon:203.0.113.0/24")
	f.accounts = []credits.AccountID{u1, u2, anon}
	if _, _, err := s.Credit(ctx, u1, 100*credits.Credit, "top-up", "top-1"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.Credit(ctx, u2, 7*credits.Credit, "top-up", "top-2"); err != nil {
		t.Fatal(err)
	}

	// Keys: one capped, with scopes, IPs, metadata and models, rotated once (a chain of two).
	k1, err := identity.NewKey("sk")
	must(t, err)
	exp := now.Add(90 * 24 * time.Hour)
	must(t, s.CreateKey(ctx, identity.Key{ID: k1.ID, UserID: "u1", Prefix: k1.Prefix, Hash: k1.Hash, Name: "ci",
		Scopes: []string{"chat", "embeddings"}, AllowedIPs: []string{"127.0.0.0/8"}, Metadata: map[string]string{"team": "ml"},
		Tier: "gold", CreditCap: 20 * credits.Credit, CreditCapPeriod: "day", Models: []string{"gpt-*"}, CreatedAt: now, ExpiresAt: &exp}))
	k2, err := identity.NewKey("sk")
	must(t, err)
	if _, err := s.RotateKey(ctx, k1.ID, identity.Key{ID: k2.ID, UserID: "u1", Prefix: k2.Prefix, Hash: k2.Hash, Name: "ci",
		Scopes: []string{"chat", "embeddings"}, AllowedIPs: []string{"127.0.0.0/8"}, Tier: "gold",
		CreditCap: 20 * credits.Credit, CreditCapPeriod: "day", CreatedAt: now.Add(time.Minute)}, now.Add(time.Minute), now.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	k3, err := identity.NewKey("team")
	must(t, err)
	must(t, s.CreateKey(ctx, identity.Key{ID: k3.ID, UserID: "u2", Prefix: k3.Prefix, Hash: k3.Hash, CreatedAt: now}))
	for _, k := range []identity.NewAPIKey{k1, k2, k3} {
		f.keys[k.ID] = k
		stored, err := s.KeyByID(ctx, k.ID)
		must(t, err)
		f.stored[k.ID] = stored
	}
	f.chain = k1.ID

	// Settlements with token kinds, a response id and the key; a released reservation; a refill grant.
	r, _, err := s.Reserve(ctx, u1, 2*credits.Credit, time.Minute, nil)
	must(t, err)
	f.response = "resp_abc123"
	if _, err := s.Settle(ctx, r.ID, 1500, credits.Usage{Model: "gpt-4o", Backend: "openai", InputTokens: 1200, OutputTokens: 300,
		CachedInputTokens: 1000, CacheWriteTokens: 100, ReasoningTokens: 120, ResponseID: f.response, KeyID: k2.ID}); err != nil {
		t.Fatal(err)
	}
	r, _, err = s.Reserve(ctx, u1, credits.Credit, time.Minute, nil)
	must(t, err)
	if _, err := s.Release(ctx, r.ID); err != nil {
		t.Fatal(err)
	}
	r, _, err = s.Reserve(ctx, anon, 100, time.Minute, &credits.Refill{Cap: credits.Credit, Period: 42})
	must(t, err)
	if _, err := s.Settle(ctx, r.ID, 30, credits.Usage{Model: "llama3", Backend: "ollama", InputTokens: 10, OutputTokens: 5}); err != nil {
		t.Fatal(err)
	}
	must(t, s.Flush(ctx))
	f.spent, err = s.ChainSpent(ctx, f.chain, now.Add(-time.Hour))
	must(t, err)
	f.owner, err = s.ResponseOwner(ctx, f.response)
	must(t, err)
	for _, a := range f.accounts {
		f.audits[a], err = s.Audit(ctx, a)
		must(t, err)
		f.entries[a], err = s.Entries(ctx, a, 100)
		must(t, err)
	}

	// Sign-in state.
	_, priv, err := ed25519.GenerateKey(nil)
	must(t, err)
	must(t, s.AddSigningKey(ctx, signin.SigningKey{KID: "kid-1", Private: priv, CreatedAt: now}, 3))
	_, priv2, err := ed25519.GenerateKey(nil)
	must(t, err)
	must(t, s.AddSigningKey(ctx, signin.SigningKey{KID: "kid-2", Private: priv2, CreatedAt: now.Add(time.Second)}, 3))
	f.signing, err = s.SigningKeys(ctx)
	must(t, err)
	f.secret, err = s.ServerSecret(ctx)
	must(t, err)
	secretHash := hash("client-secret")
	must(t, s.CreateApp(ctx, signin.App{ClientID: "cli", Name: "CLI", RedirectURIs: []string{"http://127.0.0.1/cb"}, FirstParty: true,
		Scopes: []string{"chat"}, CreatedAt: now}))
	must(t, s.CreateApp(ctx, signin.App{ClientID: "web", Name: "Web", RedirectURIs: []string{"https://app.example/cb"},
		SecretHash: secretHash[:], CreatedAt: now}))
	f.apps, err = s.Apps(ctx)
	must(t, err)
	f.session = hash("session-cookie")
	must(t, s.CreateSession(ctx, signin.Session{Hash: f.session, UserID: "u1", CreatedAt: now, ExpiresAt: now.Add(24 * time.Hour)}))
	must(t, s.SaveConsent(ctx, signin.Consent{UserID: "u1", Client: "cli", Scopes: []string{"chat"}, CreatedAt: now}))
	f.code = hash("live-code")
	must(t, s.CreateCode(ctx, signin.Code{Hash: f.code, ClientID: "cli", UserID: "u1", RedirectURI: "http://127.0.0.1/cb",
		Scopes: []string{"chat"}, Challenge: "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM", CreatedAt: now, ExpiresAt: now.Add(time.Hour)}))
	// A refresh family of two: the first rotated to the second.
	first := hash("refresh-1")
	must(t, s.CreateRefresh(ctx, signin.Refresh{Hash: first, Family: "fam-1", UserID: "u1", ClientID: "cli", Scopes: []string{"chat"},
		Origin: "origin-hex", CreatedAt: now, ExpiresAt: now.Add(30 * 24 * time.Hour)}))
	f.refresh = hash("refresh-2")
	if _, outcome, err := s.RotateRefresh(ctx, first, signin.Refresh{Hash: f.refresh, Family: "fam-1", UserID: "u1", ClientID: "cli",
		Scopes: []string{"chat"}, Origin: "origin-hex", CreatedAt: now, ExpiresAt: now.Add(30 * 24 * time.Hour)}, now, 0); err != nil || outcome != signin.Rotated {
		t.Fatalf("rotate refresh: %v, %v", outcome, err)
	}
	must(t, s.LinkSubject(ctx, "https://accounts.example", "sub-1", "u1"))
	return f
}

func utcEntries(es []credits.Entry) []credits.Entry {
	out := slices.Clone(es)
	for i := range out {
		out[i].CreatedAt = out[i].CreatedAt.UTC()
	}
	return out
}

// TestCopy: everything the embedded store holds behaves the same in PostgreSQL after the copy.
func TestCopy(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "gateway.db")
	f := buildSource(t, path)
	dsn := pgtest.NewDatabase(t)

	sum, err := Copy(ctx, path, dsn)
	if err != nil {
		t.Fatalf("copy: %v (summary %+v)", err, sum)
	}
	wantRows := map[string]int{"users": 2, "accounts": 3, "ledger": 5, "api_keys": 3, "signing_keys": 2, "server_secret": 1,
		"apps": 2, "sessions": 1, "consents": 1, "auth_codes": 1, "refresh_tokens": 2, "external_subjects": 1}
	if !reflect.DeepEqual(sum.Tables, wantRows) || !sum.Committed || len(sum.Mismatches) > 0 || sum.Accounts != 3 {
		t.Errorf("summary %+v, want tables %v, committed, 3 accounts", sum, wantRows)
	}
	var credited, settled, balance credits.Amount
	for _, a := range f.audits {
		credited, settled, balance = credited+a.Credited, settled+a.Settled, balance+a.Balance
	}
	if sum.Credited != credited || sum.Settled != settled || sum.Balance != balance {
		t.Errorf("summary totals %d/%d/%d, want %d/%d/%d", sum.Credited, sum.Settled, sum.Balance, credited, settled, balance)
	}

	s, err := postgres.Open(ctx, dsn)
	must(t, err)
	defer s.Close()
	now := time.Now()

	for _, u := range f.users {
		got, err := s.UserByEmail(ctx, u.Email)
		must(t, err)
		if got.ID != u.ID || got.Email != u.Email || got.Tier != u.Tier || got.PasswordHash != u.PasswordHash || !got.CreatedAt.Equal(u.CreatedAt) {
			t.Errorf("user %+v, want %+v", got, u)
		}
	}
	for _, a := range f.accounts {
		audit, err := s.Audit(ctx, a)
		must(t, err)
		if audit != f.audits[a] {
			t.Errorf("%s: audit %+v, want %+v", a, audit, f.audits[a])
		}
		entries, err := s.Entries(ctx, a, 100)
		must(t, err)
		if !reflect.DeepEqual(utcEntries(entries), utcEntries(f.entries[a])) {
			t.Errorf("%s: entries\n%+v\nwant\n%+v", a, entries, f.entries[a])
		}
	}
	// Each key verifies and resolves to the same user, scopes, cap and chain.
	for id, nk := range f.keys {
		k, err := s.KeyByID(ctx, id)
		must(t, err)
		parsed, err := identity.ParseKey(nk.Full)
		must(t, err)
		if err := identity.CheckKey(k, parsed, netip.MustParseAddr("127.0.0.1"), now); err != nil {
			t.Errorf("key %s no longer verifies: %v", id, err)
		}
		want := f.stored[id]
		if k.UserID != want.UserID || !slices.Equal(k.Scopes, want.Scopes) || k.CreditCap != want.CreditCap || k.CreditCapPeriod != want.CreditCapPeriod ||
			k.ChainID != want.ChainID || k.RotatedTo != want.RotatedTo || !slices.Equal(k.AllowedIPs, want.AllowedIPs) ||
			!reflect.DeepEqual(k.Metadata, want.Metadata) || !slices.Equal(k.Models, want.Models) || k.Tier != want.Tier ||
			!equalTime(k.ExpiresAt, want.ExpiresAt) || !equalTime(k.DeprecatedAt, want.DeprecatedAt) || !k.CreatedAt.Equal(want.CreatedAt) {
			t.Errorf("key %s:\n%+v\nwant\n%+v", id, k, want)
		}
	}
	if spent, err := s.ChainSpent(ctx, f.chain, now.Add(-2*time.Hour)); err != nil || spent != f.spent || spent == 0 {
		t.Errorf("chain spent %d, %v; want %d", spent, err, f.spent)
	}
	if owner, err := s.ResponseOwner(ctx, f.response); err != nil || owner != f.owner {
		t.Errorf("response owner %+v, %v; want %+v", owner, err, f.owner)
	}
	// The code redeems once, the live refresh token rotates once, the rotated one not at all.
	if c, err := s.RedeemCode(ctx, f.code, now); err != nil || c.UserID != "u1" || c.ClientID != "cli" {
		t.Errorf("redeem code: %+v, %v", c, err)
	}
	if _, err := s.RedeemCode(ctx, f.code, now); err == nil {
		t.Error("the code redeemed twice")
	}
	next := signin.Refresh{Hash: hash("refresh-3"), Family: "fam-1", UserID: "u1", ClientID: "cli", CreatedAt: now, ExpiresAt: now.Add(time.Hour)}
	if _, outcome, err := s.RotateRefresh(ctx, f.refresh, next, now, 0); err != nil || outcome != signin.Rotated {
		t.Errorf("rotate the live refresh token: %v, %v", outcome, err)
	}
	next.Hash = hash("refresh-4")
	if _, outcome, err := s.RotateRefresh(ctx, f.refresh, next, now.Add(time.Second), 0); err == nil || outcome == signin.Rotated {
		t.Errorf("the refresh token rotated twice: %v, %v", outcome, err)
	}
	if se, err := s.SessionByHash(ctx, f.session); err != nil || se.UserID != "u1" {
		t.Errorf("session: %+v, %v", se, err)
	}
	if c, err := s.ConsentFor(ctx, "u1", "cli"); err != nil || !slices.Equal(c.Scopes, []string{"chat"}) {
		t.Errorf("consent: %+v, %v", c, err)
	}
	if id, err := s.UserForSubject(ctx, "https://accounts.example", "sub-1"); err != nil || id != "u1" {
		t.Errorf("subject: %q, %v", id, err)
	}
	signing, err := s.SigningKeys(ctx)
	must(t, err)
	if len(signing) != len(f.signing) {
		t.Fatalf("signing keys %d, want %d", len(signing), len(f.signing))
	}
	for i := range signing {
		if signing[i].KID != f.signing[i].KID || !slices.Equal(signing[i].Private, f.signing[i].Private) {
			t.Errorf("signing key %d: %s, want %s (newest first)", i, signing[i].KID, f.signing[i].KID)
		}
	}
	if secret, err := s.ServerSecret(ctx); err != nil || !slices.Equal(secret, f.secret) {
		t.Errorf("server secret changed: %v", err)
	}
	apps, err := s.Apps(ctx)
	must(t, err)
	if len(apps) != len(f.apps) {
		t.Fatalf("apps %+v, want %+v", apps, f.apps)
	}
	for i := range apps {
		a, w := apps[i], f.apps[i]
		if a.ClientID != w.ClientID || a.FirstParty != w.FirstParty || !slices.Equal(a.SecretHash, w.SecretHash) ||
			!slices.Equal(a.RedirectURIs, w.RedirectURIs) || !slices.Equal(a.Scopes, w.Scopes) {
			t.Errorf("app %d: %+v, want %+v", i, a, w)
		}
	}
	// A replayed idempotent top-up is not credited twice; new money moves, after the copied entries.
	u1 := credits.UserAccount("u1")
	if _, replayed, err := s.Credit(ctx, u1, 100*credits.Credit, "top-up", "top-1"); err != nil || !replayed {
		t.Errorf("replayed top-up: replayed %v, %v", replayed, err)
	}
	r, _, err := s.Reserve(ctx, u1, credits.Credit, time.Minute, nil)
	must(t, err)
	if _, err := s.Settle(ctx, r.ID, 10, credits.Usage{Model: "m", InputTokens: 1}); err != nil {
		t.Fatal(err)
	}
	audit, err := s.Audit(ctx, u1)
	must(t, err)
	want := f.audits[u1]
	want.Settled += 10
	want.Balance -= 10
	if audit != want {
		t.Errorf("after a new settlement: %+v, want %+v", audit, want)
	}
	entries, err := s.Entries(ctx, u1, 1)
	must(t, err)
	if len(entries) != 1 || entries[0].Seq <= f.entries[u1][0].Seq {
		t.Errorf("a new entry's seq %+v does not follow the copied ones (last %d)", entries, f.entries[u1][0].Seq)
	}

	// Into a database that holds data: refused, nothing changes.
	if _, err := Copy(ctx, path, dsn); !errors.Is(err, ErrTargetNotEmpty) {
		t.Errorf("copy into a non-empty database: %v, want ErrTargetNotEmpty", err)
	}
	if a, err := s.Audit(ctx, u1); err != nil || a != want {
		t.Errorf("a refused copy changed the target: %+v, %v", a, err)
	}
}

func equalTime(a, b *time.Time) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.Equal(*b)
}

// TestCopyRefusesSourceInUse: a store an instance holds is not copied, and the target stays empty.
func TestCopyRefusesSourceInUse(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "gateway.db")
	s, err := sqlite.Open(ctx, path, sqlite.Options{})
	must(t, err)
	defer s.Close()
	if _, _, err := s.Credit(ctx, credits.UserAccount("u"), credits.Credit, "", ""); err != nil {
		t.Fatal(err)
	}
	dsn := pgtest.NewDatabase(t)
	if _, err := Copy(ctx, path, dsn); !errors.Is(err, ErrSourceInUse) {
		t.Fatalf("copy of a store in use: %v, want ErrSourceInUse", err)
	}
	if _, err := Copy(ctx, filepath.Join(t.TempDir(), "missing.db"), dsn); err == nil {
		t.Error("copied a store that does not exist")
	}
}

// TestCopyFailureLeavesTargetEmpty: a row PostgreSQL refuses (a NUL in a text column, which
// SQLite keeps) fails the copy after earlier tables were copied, and the target is left with
// no data, ready for a copy of the repaired store.
func TestCopyFailureLeavesTargetEmpty(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "gateway.db")
	s, err := sqlite.Open(ctx, path, sqlite.Options{})
	must(t, err)
	now := time.Now()
	must(t, s.CreateUser(ctx, identity.User{ID: "u1", Email: "a@example.com", CreatedAt: now}))
	if _, _, err := s.Credit(ctx, credits.UserAccount("u1"), credits.Credit, "", ""); err != nil {
		t.Fatal(err)
	}
	must(t, s.CreateCode(ctx, signin.Code{Hash: hash("c"), ClientID: "cli", UserID: "u1", RedirectURI: "http://x/\x00",
		CreatedAt: now, ExpiresAt: now.Add(time.Hour)}))
	must(t, s.Close())

	dsn := pgtest.NewDatabase(t)
	sum, err := Copy(ctx, path, dsn)
	if err == nil || sum.Committed {
		t.Fatalf("a copy PostgreSQL refuses a row of committed: %+v, %v", sum, err)
	}
	t.Logf("refused: %v", err)
	p, err := postgres.Open(ctx, dsn)
	must(t, err)
	defer p.Close()
	if _, err := p.UserByID(ctx, "u1"); !errors.Is(err, identity.ErrNotFound) {
		t.Errorf("a failed copy left the user behind: %v", err)
	}
	if _, err := p.Balance(ctx, credits.UserAccount("u1")); !errors.Is(err, credits.ErrUnknownAccount) {
		t.Errorf("a failed copy left the account behind: %v", err)
	}
}

// TestLedgerConformanceAfterCopy: a PostgreSQL database made by a copy (of a store with an
// account and entries of its own) passes the ledger conformance suite.
func TestLedgerConformanceAfterCopy(t *testing.T) {
	storetest.TestLedger(t, func(t *testing.T) credits.Ledger {
		ctx := context.Background()
		path := filepath.Join(t.TempDir(), "gateway.db")
		s, err := sqlite.Open(ctx, path, sqlite.Options{})
		must(t, err)
		seed := credits.UserAccount("copied-seed")
		if _, _, err := s.Credit(ctx, seed, 3*credits.Credit, "seed", "seed-1"); err != nil {
			t.Fatal(err)
		}
		r, _, err := s.Reserve(ctx, seed, credits.Credit, time.Minute, nil)
		must(t, err)
		if _, err := s.Settle(ctx, r.ID, 1, credits.Usage{}); err != nil {
			t.Fatal(err)
		}
		must(t, s.Close())
		dsn := pgtest.NewDatabase(t)
		if _, err := Copy(ctx, path, dsn); err != nil {
			t.Fatal(err)
		}
		p, err := postgres.Open(ctx, dsn)
		must(t, err)
		t.Cleanup(func() { _ = p.Close() })
		return p
	})
}

// TestCheckFindsMismatches: the check a copy commits on tells a balance that differs from the
// source's, and a table whose row count does.
func TestCheckFindsMismatches(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "gateway.db")
	s, err := sqlite.Open(ctx, path, sqlite.Options{})
	must(t, err)
	must(t, s.CreateUser(ctx, identity.User{ID: "u1", Email: "a@example.com", CreatedAt: time.Now()}))
	if _, _, err := s.Credit(ctx, credits.UserAccount("u1"), credits.Credit, "", ""); err != nil {
		t.Fatal(err)
	}
	must(t, s.Close())
	dsn := pgtest.NewDatabase(t)
	if _, err := Copy(ctx, path, dsn); err != nil {
		t.Fatal(err)
	}
	src, err := sqlite.Open(ctx, path, sqlite.Options{})
	must(t, err)
	defer src.Close()
	conn, err := pgx.Connect(ctx, dsn)
	must(t, err)
	defer conn.Close(ctx)
	err = src.Snapshot(ctx, func(stx *sql.Tx) error {
		tx, err := conn.Begin(ctx)
		if err != nil {
			return err
		}
		defer tx.Rollback(ctx)
		if _, err := tx.Exec(ctx, `UPDATE accounts SET balance = balance + 1`); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `DELETE FROM users`); err != nil {
			return err
		}
		sum := Summary{Tables: map[string]int{}}
		for _, tb := range tables {
			var n int
			if err := stx.QueryRowContext(ctx, `SELECT count(*) FROM `+tb.name).Scan(&n); err != nil {
				return err
			}
			sum.Tables[tb.name] = n
		}
		if err := check(ctx, stx, tx, &sum); err != nil {
			return err
		}
		joined := strings.Join(sum.Mismatches, "\n")
		if len(sum.Mismatches) != 2 || !strings.Contains(joined, "account user:u1") || !strings.Contains(joined, "users: 1 rows") {
			t.Errorf("mismatches:\n%s\nwant the account's balance and the users count", joined)
		}
		return nil
	})
	must(t, err)
}
