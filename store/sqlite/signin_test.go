package sqlite

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"strings"
	"testing"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/signin"
)

// tokenHash is the SHA-256 of a token, as the sign-in store keeps it.
func tokenHash(token string) [32]byte { return sha256.Sum256([]byte(token)) }

// TestServerSecretSurvivesRestart: the secret is the file's (the conformance suite checks the
// rest of ServerSecret).
func TestServerSecretSurvivesRestart(t *testing.T) {
	ctx := context.Background()
	path := t.TempDir() + "/gateway.db"
	s := openAt(t, path, Options{})
	first, err := s.ServerSecret(ctx)
	if err != nil || len(first) != 32 {
		t.Fatalf("ServerSecret = %x, %v", first, err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openAt(t, path, Options{})
	defer s.Close()
	again, err := s.ServerSecret(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(again, first) {
		t.Error("the secret changed across a restart")
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

// nextRefresh is the successor handed to RotateRefresh: only its hash, times and nothing else
// (the store fills in the rest from the old token).
func nextRefresh(token string, created time.Time) signin.Refresh {
	return signin.Refresh{Hash: tokenHash(token), CreatedAt: created, ExpiresAt: created.Add(24 * time.Hour)}
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
