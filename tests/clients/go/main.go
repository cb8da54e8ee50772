// go-redis v9 against two cachecast sidecars, on its default options:
// subscribe through one sidecar, publish through the other, and check
// that every message arrives once, in order, in RESP2 and RESP3; then
// again after the subscribers' sidecar has restarted (go-redis reconnects
// and resubscribes by itself). Driven by tests/resp.rs.
//
// Usage: go-check SUB_PORT SUB_PASSWORD|- PUB_PORT PUB_PASSWORD|-
// Prints `ok <client> <phase> <n>` per client and phase, `restart` when
// the first phase is over (then reads one line from stdin once the
// sidecar is back), and `done`; the first failure prints `FAIL ...` and
// exits 1.
package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

const n = 200

func fail(format string, args ...any) {
	fmt.Printf("FAIL "+format+"\n", args...)
	os.Exit(1)
}

type check struct {
	name    string
	channel string
	pub     *redis.Client
	sub     *redis.PubSub
	mu      sync.Mutex
	got     []string
}

func password(p string) string {
	if p == "-" {
		return ""
	}
	return p
}

func start(ctx context.Context, protocol int, subPort, subPw, pubPort, pubPw string) *check {
	c := &check{name: fmt.Sprintf("go-redis-resp%d", protocol), channel: fmt.Sprintf("go-redis-%d", protocol)}
	subClient := redis.NewClient(&redis.Options{Addr: "127.0.0.1:" + subPort, Password: password(subPw), Protocol: protocol})
	c.pub = redis.NewClient(&redis.Options{Addr: "127.0.0.1:" + pubPort, Password: password(pubPw), Protocol: protocol})
	c.sub = subClient.Subscribe(ctx, c.channel)
	if _, err := c.sub.Receive(ctx); err != nil {
		fail("%s subscribe: %v", c.name, err)
	}
	msgs := c.sub.Channel()
	go func() {
		for m := range msgs {
			c.mu.Lock()
			c.got = append(c.got, m.Payload)
			c.mu.Unlock()
		}
	}()
	return c
}

// mine returns what the subscriber got in phase, probes aside, and whether
// it got a probe.
func (c *check) mine(phase string) ([]string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	probed := false
	for _, m := range c.got {
		if m == phase+"-probe" {
			probed = true
		} else if strings.HasPrefix(m, phase+"-") {
			out = append(out, m)
		}
	}
	return out, probed
}

// delivers publishes probes until the subscriber hears one (it may be
// resubscribing still), then n numbered messages, each awaited; checks that
// the subscriber gets exactly those, in order.
func (c *check) delivers(ctx context.Context, phase string) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, probed := c.mine(phase); probed {
			break
		}
		if time.Now().After(deadline) {
			fail("%s %s: not subscribed after 30 s", c.name, phase)
		}
		c.pub.Publish(ctx, c.channel, phase+"-probe")
		time.Sleep(100 * time.Millisecond)
	}
	for k := 1; k <= n; k++ {
		if err := c.pub.Publish(ctx, c.channel, fmt.Sprintf("%s-%d", phase, k)).Err(); err != nil {
			fail("%s %s: publish %d: %v", c.name, phase, k, err)
		}
	}
	deadline = time.Now().Add(10 * time.Second)
	for {
		got, _ := c.mine(phase)
		if len(got) >= n || time.Now().After(deadline) {
			if len(got) != n {
				fail("%s %s: got %d of %d", c.name, phase, len(got), n)
			}
			for i, m := range got {
				if m != fmt.Sprintf("%s-%d", phase, i+1) {
					fail("%s %s: message %d is %q", c.name, phase, i+1, m)
				}
			}
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	fmt.Printf("ok %s %s %d\n", c.name, phase, n)
}

func main() {
	if len(os.Args) != 5 {
		fail("usage: go-check SUB_PORT SUB_PASSWORD|- PUB_PORT PUB_PASSWORD|-")
	}
	a := os.Args[1:]
	ctx := context.Background()
	checks := []*check{start(ctx, 2, a[0], a[1], a[2], a[3]), start(ctx, 3, a[0], a[1], a[2], a[3])}
	for _, c := range checks {
		c.delivers(ctx, "before")
	}
	fmt.Println("restart")
	bufio.NewReader(os.Stdin).ReadString('\n')
	for _, c := range checks {
		c.delivers(ctx, "after")
	}
	for _, c := range checks {
		c.sub.Close()
		c.pub.Close()
	}
	fmt.Println("done")
}
