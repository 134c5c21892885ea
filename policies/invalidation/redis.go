package invalidation

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// Redis is a Bus on a Redis pub/sub channel: every process subscribed to the channel gets
// every message, within the pub/sub delivery time, unless its subscription is down then (it
// gets a message of Kind All when the subscription is back). Subscribers in this process get
// the messages published here at once, before Publish sends them to Redis.
type Redis struct {
	rdb     redis.UniversalClient
	channel string
	origin  string
	local   *Local
	opts    RedisOptions

	startOnce sync.Once
	ps        *redis.PubSub
	done      chan struct{}
}

// RedisOptions are a Redis bus's settings.
type RedisOptions struct {
	// OnReceive, when set, is told of every message from another process and its lag (the
	// receiver's clock minus the message's Sent).
	OnReceive func(m Message, lag time.Duration)
	// OnResubscribe, when set, is told each time the subscription is (re)established.
	OnResubscribe func()
	// HealthCheck is how often an idle subscription is pinged (a dead connection is found
	// and re-dialled within about this time). 0: 1 second.
	HealthCheck time.Duration
}

var _ Bus = (*Redis)(nil)

// NewRedis is a bus on channel of rdb; it subscribes on the first Subscribe. Close ends it.
func NewRedis(rdb redis.UniversalClient, channel string, o RedisOptions) *Redis {
	if o.HealthCheck <= 0 {
		o.HealthCheck = time.Second
	}
	return &Redis{rdb: rdb, channel: channel, origin: rand.Text(), local: NewLocal(), opts: o,
		done: make(chan struct{})}
}

// Origin is this bus's instance id, carried by the messages it publishes.
func (b *Redis) Origin() string { return b.origin }

// Publish delivers m to this process's subscribers, then publishes it on the channel.
func (b *Redis) Publish(ctx context.Context, m Message) error {
	m.Origin = b.origin
	if m.Sent.IsZero() {
		m.Sent = time.Now()
	}
	b.local.deliver(m)
	raw, err := json.Marshal(m)
	if err != nil {
		return err
	}
	if err := b.rdb.Publish(ctx, b.channel, raw).Err(); err != nil {
		return fmt.Errorf("invalidation: publishing on redis: %w", err)
	}
	return nil
}

// Subscribe calls f with every message: those published here, and those of other processes
// received on the channel.
func (b *Redis) Subscribe(f func(Message)) (stop func()) {
	stop = b.local.Subscribe(f)
	b.startOnce.Do(b.start)
	return stop
}

// start subscribes to the channel and passes what arrives to the local subscribers.
func (b *Redis) start() {
	b.ps = b.rdb.Subscribe(context.Background(), b.channel)
	ch := b.ps.ChannelWithSubscriptions(redis.WithChannelHealthCheckInterval(b.opts.HealthCheck),
		redis.WithChannelPingTimeout(b.opts.HealthCheck), redis.WithChannelReconnectTimeout(2*b.opts.HealthCheck))
	go func() {
		defer close(b.done)
		for v := range ch {
			switch v := v.(type) {
			case *redis.Subscription:
				if v.Kind == "subscribe" {
					if b.opts.OnResubscribe != nil {
						b.opts.OnResubscribe()
					}
					b.local.deliver(Message{Kind: All, Sent: time.Now()})
				}
			case *redis.Message:
				var m Message
				if err := json.Unmarshal([]byte(v.Payload), &m); err != nil || m.Origin == b.origin || m.Kind == All {
					continue
				}
				if b.opts.OnReceive != nil {
					b.opts.OnReceive(m, time.Since(m.Sent))
				}
				b.local.deliver(m)
			}
		}
	}()
}

// Close ends the subscription (not the client).
func (b *Redis) Close() error {
	b.startOnce.Do(func() {}) // no subscription after Close; waits for a start under way
	if b.ps == nil {
		return nil
	}
	err := b.ps.Close()
	<-b.done
	return err
}
