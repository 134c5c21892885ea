package sqlite

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"os"
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
