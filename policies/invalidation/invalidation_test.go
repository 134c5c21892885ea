package invalidation

import (
	"context"
	crand "crypto/rand"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// recorder keeps the messages a subscriber got.
type recorder struct {
	mu  sync.Mutex
	got []Message
	ch  chan Message
}

func newRecorder() *recorder { return &recorder{ch: make(chan Message, 100)} }

func (r *recorder) f(m Message) {
	r.mu.Lock()
	r.got = append(r.got, m)
	r.mu.Unlock()
	r.ch <- m
}

func (r *recorder) kinds() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var ks []string
	for _, m := range r.got {
		ks = append(ks, m.Kind)
	}
	return ks
}

// next is the next message of a kind other than All, or fails after a minute.
func (r *recorder) next(t *testing.T) Message {
	t.Helper()
	timeout := time.After(time.Minute)
	for {
		select {
		case m := <-r.ch:
			if m.Kind != All {
				return m
			}
		case <-timeout:
			t.Fatal("no message within a minute")
		}
	}
}

func TestLocalDeliversToEverySubscriberUntilStopped(t *testing.T) {
	b := NewLocal()
	r1, r2 := newRecorder(), newRecorder()
	stop1 := b.Subscribe(r1.f)
	defer b.Subscribe(r2.f)()
	if err := b.Publish(context.Background(), Message{Kind: Key, IDs: []string{"k1"}}); err != nil {
		t.Fatal(err)
	}
	stop1()
	stop1() // twice is harmless
	_ = b.Publish(context.Background(), Message{Kind: SigningKeys})
	if got := r1.kinds(); !slices.Equal(got, []string{Key}) {
		t.Errorf("stopped subscriber got %v, want [key]", got)
	}
	if got := r2.kinds(); !slices.Equal(got, []string{Key, SigningKeys}) {
		t.Errorf("subscriber got %v, want [key signing_keys]", got)
	}
	if m := r2.got[0]; m.Sent.IsZero() || !slices.Equal(m.IDs, []string{"k1"}) {
		t.Errorf("message %+v: want Sent set and IDs [k1]", m)
	}
}

// connect is a client of the test Redis; without one the test is skipped, except in CI.
func connect(t *testing.T) *redis.Client {
	t.Helper()
	rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:6379"})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := rdb.Ping(ctx).Err(); err != nil {
		_ = rdb.Close()
		if ci := os.Getenv("CI"); ci == "1" || ci == "true" {
			t.Fatalf("redis: %v", err)
		}
		t.Skipf("no redis at 127.0.0.1:6379 (%v)", err)
	}
	t.Cleanup(func() { _ = rdb.Close() })
	return rdb
}

// TestRedisCrossProcess: two buses on one channel (two instances): a message published on
// one reaches the other's subscribers once with its lag observed, and its own subscribers
// once (at once, not again from Redis); a subscription's start is announced as All.
func TestRedisCrossProcess(t *testing.T) {
	channel := "llmgw-test:" + crand.Text() + ":invalidation"
	var lags []time.Duration
	var mu sync.Mutex
	a := NewRedis(connect(t), channel, RedisOptions{})
	b := NewRedis(connect(t), channel, RedisOptions{OnReceive: func(_ Message, lag time.Duration) {
		mu.Lock()
		lags = append(lags, lag)
		mu.Unlock()
	}})
	defer a.Close()
	defer b.Close()
	ra, rb := newRecorder(), newRecorder()
	a.Subscribe(ra.f)
	b.Subscribe(rb.f)
	// Both subscriptions are up once each has announced All.
	for _, r := range []*recorder{ra, rb} {
		select {
		case m := <-r.ch:
			if m.Kind != All {
				t.Fatalf("first message %+v, want All", m)
			}
		case <-time.After(time.Minute):
			t.Fatal("subscription not established")
		}
	}
	if err := a.Publish(context.Background(), Message{Kind: Key, IDs: []string{"key_1"}}); err != nil {
		t.Fatal(err)
	}
	if m := rb.next(t); m.Kind != Key || !slices.Equal(m.IDs, []string{"key_1"}) || m.Origin != a.Origin() {
		t.Fatalf("b got %+v", m)
	}
	// A marker from b: once a has it, a would have had its own message back from Redis too.
	if err := b.Publish(context.Background(), Message{Kind: SigningKeys}); err != nil {
		t.Fatal(err)
	}
	if m := ra.next(t); m.Kind != Key {
		t.Fatalf("a's first message %+v, want its own key message", m)
	}
	if m := ra.next(t); m.Kind != SigningKeys {
		t.Fatalf("a got %+v, want b's signing_keys (its own message only once)", m)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(lags) != 1 || lags[0] < 0 {
		t.Errorf("b observed lags %v, want one non-negative", lags)
	}
}
