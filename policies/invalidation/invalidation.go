// Package invalidation tells every instance of the gateway that something it may hold in
// memory is no longer true: an API key revoked or rotated, the JWT signing keys rotated. A Bus carries Messages to every subscriber: Local within one process
// (the single instance, and several gateway configurations sharing one store), Redis to every
// process subscribed to one channel.
//
// Delivery is best effort: a message published while a subscriber is disconnected is lost to
// it. Redis tells its subscribers when their subscription is (re)established with a message of
// Kind All, so that they drop everything they hold: what they may have missed is then read
// again from the store. The caches' own TTLs stay the backstop.
package invalidation

import (
	"context"
	"sync"
	"time"
)

// The kinds of Message.
const (
	// Key: the API keys IDs were revoked, rotated or otherwise changed.
	Key = "key"
	// SigningKeys: the JWT signing keys changed; IDs is empty.
	SigningKeys = "signing_keys"
	// All: anything may have changed (a subscription was (re)established, so messages may
	// have been missed); IDs is empty. Never published, only delivered.
	All = "all"
)

// Message is one invalidation.
type Message struct {
	// Kind is Key, SigningKeys or All.
	Kind string `json:"kind"`
	// IDs are the keys' ids.
	IDs []string `json:"ids,omitempty"`
	// Origin is the publishing instance (Bus.Origin): an instance skips its own messages,
	// which it applied before publishing.
	Origin string `json:"origin,omitempty"`
	// Sent is when the message was published, by the publisher's clock: a receiver's
	// lag is its own clock minus Sent (clock skew between machines included).
	Sent time.Time `json:"sent"`
}

// Bus carries messages to subscribers.
type Bus interface {
	// Publish sends m (its Origin and Sent filled in) to every subscriber, this process's
	// included. An error means the message may not have reached other processes.
	Publish(ctx context.Context, m Message) error
	// Subscribe calls f with every message until stop is called. f may be called from
	// several goroutines at once and must return quickly.
	Subscribe(f func(Message)) (stop func())
}

// Local is a Bus within one process: Publish calls every subscriber before it returns.
type Local struct {
	mu   sync.Mutex
	next int
	subs map[int]func(Message)
}

var _ Bus = (*Local)(nil)

// NewLocal is an empty in-process bus.
func NewLocal() *Local { return &Local{subs: map[int]func(Message){}} }

// Publish calls every subscriber with m, in this goroutine.
func (b *Local) Publish(_ context.Context, m Message) error {
	if m.Sent.IsZero() {
		m.Sent = time.Now()
	}
	b.deliver(m)
	return nil
}

// deliver calls every subscriber with m.
func (b *Local) deliver(m Message) {
	b.mu.Lock()
	fs := make([]func(Message), 0, len(b.subs))
	for _, f := range b.subs {
		fs = append(fs, f)
	}
	b.mu.Unlock()
	for _, f := range fs {
		f(m)
	}
}

// Subscribe adds f until stop is called.
func (b *Local) Subscribe(f func(Message)) (stop func()) {
	b.mu.Lock()
	id := b.next
	b.next++
	b.subs[id] = f
	b.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			b.mu.Lock()
			delete(b.subs, id)
			b.mu.Unlock()
		})
	}
}
