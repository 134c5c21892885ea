package caddymodule_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/chromedp"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
)

// TestBrowserPeerwaveFlow drives headless Chromium through the Peerwave flow with the demo app
// (llm_demo_app) on an origin of its own: it chats anonymously until the allowance runs out,
// the 402's Location takes it to the gateway's sign-in, it signs up, approves the app, comes
// back with the token in the fragment (which the page keeps and strips from the URL), chats as
// the user, who is charged exactly what the answers say, and a second visit of
// /auth/authorize skips the consent. No token reaches a log. Screenshots of every page are
// saved in the test's artifact directory (go test -artifacts keeps them).
func TestBrowserPeerwaveFlow(t *testing.T) {
	chrome := lookBinary(t, "chromium", "chromium", "chromium-browser", "google-chrome")

	const (
		email    = "ada.browser@example.com"
		password = "correct horse battery staple"
		inPrice  = "1"  // credits per 1M tokens: one micro-credit a prompt token
		outPrice = "20" // twenty micro-credits a completion token
		outBound = 10   // max_tokens_default, and what the mock answers: every answer is 0.0002 credits of output
	)
	e := startGateway(t, setup{
		gateway: `
		max_tokens_default 10
		allowed_origins http://127.0.0.1:{port.demo}
		anonymous {
			credits 0.0005
			period 24h
			signin_url {gw}/auth/authorize
		}
		signin {
			issuer {gw}
			signup_credits 1
			return_origins http://127.0.0.1:{port.demo}
		}` + backendBlock("mock", "m", "mock-small", inPrice, outPrice),
		mocks: []mockSpec{{key: "m", lines: "models mock-small\n\t\tcompletion_tokens 10"}},
		sites: `
http://127.0.0.1:{port.demo} {
	bind 127.0.0.1
	llm_demo_app {
		gateway_url {gw}
		title "Demo chat (browser test)"
	}
}
`,
	})
	demoOrigin := fmt.Sprintf("http://127.0.0.1:%d", e.port("demo"))
	demoURL := demoOrigin + "/chat"

	// How many anonymous chats fit: the page sends the whole conversation, the gateway reserves
	// its prompt estimate plus the output bound and charges the mock's counts (the words of
	// every message, and outBound tokens). With 0.0005 credits, two.
	prompts := []string{"hello", "tell me more", "and more", "once more", "again", "still more"}
	allowance := credits.Amount(micro(t, "0.0005"))
	wantAnon, balance, words := 0, allowance, 0
	var conv []map[string]string
	for _, p := range prompts {
		conv = append(conv, map[string]string{"role": "user", "content": p})
		raw, _ := json.Marshal(conv)
		words += len(strings.Fields(p))
		// The page's body: JSON.stringify({model, messages, stream: false}).
		sent := `{"model":"cheapest","messages":` + string(raw) + `,"stream":false}`
		if balance < cost(t, inputBound(sent), outBound, inPrice, outPrice) {
			break
		}
		balance -= cost(t, int64(words), outBound, inPrice, outPrice)
		wantAnon++
		conv = append(conv, map[string]string{"role": "assistant", "content": tokens(outBound)})
		words += outBound
	}
	if wantAnon < 1 || wantAnon >= len(prompts) {
		t.Fatalf("test setup: %d anonymous chats fit", wantAnon)
	}

	b := newChromeTab(t, chrome)

	// 1. The demo page chats anonymously.
	b.navigate(demoURL)
	s := b.waitPage("the demo page", func(s pageState) bool { return s.Path == "/chat" && s.Status != "" })
	if s.Status != "anonymous" {
		t.Errorf("#status %q before signing in, want anonymous", s.Status)
	}
	b.shot("1-demo-anonymous")

	// 2. It chats until the anonymous credits run out and the 402 sends it to the sign-in.
	answered := 0
	for i := 0; ; i++ {
		if i == len(prompts) {
			t.Fatalf("still on the demo page after %d prompts: %+v", i, s)
		}
		before := s.Assistant
		b.setValue("#prompt", prompts[i])
		b.click("#send")
		s = b.waitPage("an answer or the sign-in", func(s pageState) bool {
			return s.Assistant > before || s.Origin != demoOrigin || (s.Error != "" && !strings.Contains(s.Error, "signing in"))
		})
		if s.Origin != demoOrigin {
			break
		}
		if s.Assistant <= before {
			t.Fatalf("prompt %d: no answer, #error %q", i+1, s.Error)
		}
		answered++
		if answered == 1 {
			if s.Balance == "" || s.Balance == "–" {
				t.Errorf("#balance %q after an answer", s.Balance)
			}
			b.shot("2-demo-anonymous-answer")
		}
	}
	if answered != wantAnon {
		t.Errorf("%d anonymous answers before the 402, want %d", answered, wantAnon)
	}

	// 3. The sign-in: /auth/authorize sent it to /auth/login, whose link leads to the sign-up.
	s = b.waitPage("the login page", func(s pageState) bool { return s.Origin == e.gw && s.Path == "/auth/login" && s.Has["signup-link"] })
	if next := s.query(t).Get("next"); !strings.Contains(next, "/auth/authorize") || !strings.Contains(next, url.QueryEscape(demoURL)) {
		t.Errorf("login page next=%q, want the authorize URI with redirect=%s", next, demoURL)
	}
	if !b.sawPath(e.gw, "/auth/login") {
		t.Errorf("navigations %v lack /auth/login", b.navigations())
	}
	b.shot("3-login")
	b.click("#signup-link")
	s = b.waitPage("the sign-up page", func(s pageState) bool { return s.Path == "/auth/signup" && s.Has["signup"] })
	b.setValue("input[name=email]", email)
	b.setValue("input[name=password]", password)
	b.shot("4-signup")
	b.click("#signup")

	// 4. The consent page names the demo app's origin.
	s = b.waitPage("the consent page", func(s pageState) bool { return s.Has["approve"] || s.Origin == demoOrigin })
	if !s.Has["approve"] {
		t.Fatalf("no consent page: landed on %s", s.Href)
	}
	if s.Path != "/auth/authorize" && s.Path != "/auth/consent" {
		t.Errorf("consent page at %s", s.Path)
	}
	if !strings.Contains(s.Client, demoOrigin) {
		t.Errorf("consent page #client %q does not name %s", s.Client, demoOrigin)
	}
	if !s.ClientVisible || !strings.Contains(s.Text, demoOrigin) {
		t.Errorf("the demo origin %s is not visible on the consent page: %q", demoOrigin, truncate(s.Text, 600))
	}
	b.shot("5-consent")
	b.click("#approve")

	// 5. Back on the demo page, signed in; the token is in sessionStorage, not in the URL.
	s = b.waitPage("the demo page, signed in", func(s pageState) bool { return s.Origin == demoOrigin && s.Status == "signed in" })
	if s.Href != demoURL {
		t.Errorf("demo page URL %q after the sign-in, want %q (the fragment stripped)", s.Href, demoURL)
	}
	if s.Token == "" || strings.Count(s.Token, ".") != 2 {
		t.Fatalf("sessionStorage token %q, want a JWT", s.Token)
	}
	if frag := b.fragmentOf(demoOrigin); !strings.Contains(frag, "token="+s.Token) {
		t.Errorf("the demo page arrived with fragment %q, want token=<the stored token>", frag)
	}
	issued := []string{s.Token}
	b.shot("6-demo-signed-in")

	// 6. It chats as the user, who pays exactly what X-Credits-Charged says.
	userID := e.userIDByEmail(email)
	before := e.settledAudit(userID).Balance
	if want := credits.Amount(micro(t, "1")); before != want {
		t.Errorf("balance after the sign-up %s, want the signup_credits %s", before, want)
	}
	n := s.Assistant
	b.setValue("#prompt", "now as a user")
	b.click("#send")
	s = b.waitPage("an answer as the user", func(s pageState) bool { return s.Assistant > n || s.Error != "" })
	if s.Assistant <= n {
		t.Fatalf("no answer as the user: #error %q", s.Error)
	}
	if s.Status != "signed in" {
		t.Errorf("#status %q after chatting with the token", s.Status)
	}
	charged := amountOf(t, s.Charged)
	if charged <= 0 {
		t.Errorf("X-Credits-Charged %s", charged)
	}
	e.settledAudit(userID)
	after := e.balance(userID)
	if after != before-charged {
		t.Errorf("balance %s -> %s, want it down by exactly the X-Credits-Charged %s", before, after, charged)
	}
	if got := amountOf(t, s.Balance); got != after {
		t.Errorf("#balance (X-Credits-Remaining) %s, want the user's balance %s", got, after)
	}
	b.shot("7-demo-user-answer")

	// 7. A second visit skips the consent: forget the token, ask /auth/authorize again.
	b.click("#forget")
	s = b.waitPage("the demo page, anonymous again", func(s pageState) bool { return s.Status == "anonymous" && s.Token == "" })
	mark := len(b.navigations())
	b.navigate(e.gw + "/auth/authorize?redirect=" + url.QueryEscape(demoURL))
	s = b.waitPage("the demo page, signed in again", func(s pageState) bool { return s.Origin == demoOrigin && s.Status == "signed in" })
	if s.Href != demoURL || s.Token == "" {
		t.Errorf("second visit: at %q with token %q", s.Href, s.Token)
	}
	for _, nav := range b.navigations()[mark:] {
		if u, _ := url.Parse(nav); u == nil || u.Scheme+"://"+u.Host != demoOrigin {
			t.Errorf("second visit showed %s: want straight back to the demo page (navigations %v)", nav, b.navigations()[mark:])
		}
	}
	if b.sawApprove() > 1 {
		t.Errorf("the consent page was shown %d times, want once", b.sawApprove())
	}
	issued = append(issued, s.Token)
	b.shot("8-demo-second-visit")

	// The account page lists the demo app among the connected apps.
	b.navigate(e.gw + "/account")
	s = b.waitPage("the account page", func(s pageState) bool {
		return strings.HasPrefix(s.Href, e.gw+"/account") && strings.Contains(s.Text, "Connected apps")
	})
	if !strings.Contains(s.Text, demoOrigin) {
		t.Errorf("the account page does not list %s: %q", demoOrigin, truncate(s.Text, 600))
	}
	b.shot("9-account")

	// No token in any log.
	for _, name := range []string{"access.log", "caddy.log"} {
		raw, err := os.ReadFile(filepath.Join(e.dir, name))
		if err != nil {
			t.Errorf("reading %s: %v", name, err)
			continue
		}
		for _, tok := range issued {
			sig := tok[strings.LastIndex(tok, ".")+1:]
			for _, line := range strings.Split(string(raw), "\n") {
				if strings.Contains(line, sig) {
					t.Errorf("%s logs a token issued to the browser: %s", name, truncate(line, 1500))
					break
				}
			}
		}
	}
	e.checkAllAccounts(0)
}

// chromeTab is one headless Chromium tab, bounded by the test's deadline.
type chromeTab struct {
	t     *testing.T
	ctx   context.Context // the tab; every action runs with a timeout derived from it
	shots int

	mu       sync.Mutex
	navs     []string // the main frame's documents, in order (URLs without fragments)
	frags    map[string]string
	approves int             // documents that had an #approve button (counted by waitPage)
	docs     map[string]bool // the documents waitPage read, by their pageState.Doc
	lastHref string
}

// actionTimeout bounds one browser action; pageTimeout one wait for a page state.
const (
	actionTimeout = 20 * time.Second
	pageTimeout   = 30 * time.Second
)

func newChromeTab(t *testing.T, chrome string) *chromeTab {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 4*time.Minute)
	t.Cleanup(cancel)
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chrome),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.WindowSize(1000, 800),
	)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(ctx, opts...)
	t.Cleanup(cancelAlloc)
	tabCtx, cancelTab := chromedp.NewContext(allocCtx)
	t.Cleanup(cancelTab)
	b := &chromeTab{t: t, ctx: tabCtx, frags: map[string]string{}, docs: map[string]bool{}}
	if err := chromedp.Do(tabCtx); err != nil { // starts the browser, for the test's lifetime
		t.Fatalf("starting %s: %v", chrome, err)
	}
	if err := chromedp.Listen(tabCtx, func(ev any) {
		if nav, ok := ev.(*page.EventFrameNavigated); ok && nav.Frame != nil && nav.Frame.ParentID == "" {
			b.mu.Lock()
			b.navs = append(b.navs, nav.Frame.URL)
			if u, err := url.Parse(nav.Frame.URL); err == nil {
				b.frags[u.Scheme+"://"+u.Host] = nav.Frame.URLFragment
			}
			b.mu.Unlock()
		}
	}); err != nil {
		t.Fatal(err)
	}
	return b
}

func (b *chromeTab) do(what string, steps ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, actionTimeout)
	defer cancel()
	if err := chromedp.Do(ctx, steps...); err != nil {
		b.shot("failed")
		b.mu.Lock()
		at := b.lastHref
		b.mu.Unlock()
		b.t.Fatalf("%s: %v (last seen at %s)", what, err, at)
	}
}

func (b *chromeTab) navigate(u string) { b.t.Helper(); b.do("navigating to "+u, chromedp.Navigate(u)) }

func (b *chromeTab) click(sel string) {
	b.t.Helper()
	b.do("clicking "+sel, chromedp.Click(chromedp.CSS(sel)))
}

func (b *chromeTab) setValue(sel, v string) {
	b.t.Helper()
	b.do("filling "+sel, chromedp.SetValue(chromedp.CSS(sel), v))
}

// shot saves a PNG of the whole page in the artifact directory.
func (b *chromeTab) shot(name string) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, actionTimeout)
	defer cancel()
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		b.t.Logf("screenshot %s: %v", name, err)
		return
	}
	b.shots++
	file := filepath.Join(b.t.ArtifactDir(), fmt.Sprintf("%02d-%s.png", b.shots, name))
	if err := os.WriteFile(file, png, 0o644); err != nil {
		b.t.Errorf("saving %s: %v", file, err)
	}
}

func (b *chromeTab) navigations() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]string(nil), b.navs...)
}

// fragmentOf is the fragment of the last document loaded from origin.
func (b *chromeTab) fragmentOf(origin string) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.frags[origin]
}

func (b *chromeTab) sawPath(origin, path string) bool {
	for _, n := range b.navigations() {
		if u, err := url.Parse(n); err == nil && u.Scheme+"://"+u.Host == origin && u.Path == path {
			return true
		}
	}
	return false
}

// sawApprove is how many distinct documents showed an #approve button.
func (b *chromeTab) sawApprove() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.approves
}

// pageState is what the test reads of the current page in one evaluation.
type pageState struct {
	Href          string          `json:"href"`
	Origin        string          `json:"origin"`
	Path          string          `json:"path"`
	Status        string          `json:"status"`
	Balance       string          `json:"balance"`
	Charged       string          `json:"charged"`
	Assistant     int             `json:"assistant"`
	Error         string          `json:"error"`
	Token         string          `json:"token"`
	Client        string          `json:"client"`
	ClientVisible bool            `json:"clientVisible"`
	Text          string          `json:"text"`
	Has           map[string]bool `json:"has"`
	Doc           string          `json:"doc"` // a random id per document, to count documents
}

func (s pageState) query(t *testing.T) url.Values {
	t.Helper()
	u, err := url.Parse(s.Href)
	if err != nil {
		t.Fatalf("page URL %q: %v", s.Href, err)
	}
	return u.Query()
}

const pageStateJS = `(() => {
	const el = (id) => document.getElementById(id);
	const text = (id) => (el(id) ? el(id).textContent.trim() : '');
	let token = '';
	try { token = sessionStorage.getItem('llm_gateway_token') || ''; } catch (e) {}
	window.__doc = window.__doc || Math.random().toString(36).slice(2);
	const client = el('client');
	return {
		href: location.href, origin: location.origin, path: location.pathname,
		status: text('status'), balance: text('balance'), charged: text('charged'), error: text('error'),
		assistant: document.querySelectorAll('#messages .assistant').length,
		token: token,
		client: text('client'),
		clientVisible: !!client && client.getClientRects().length > 0 && getComputedStyle(client).visibility !== 'hidden',
		text: document.body ? document.body.innerText : '',
		has: { 'signup-link': !!el('signup-link'), signup: !!el('signup'), approve: !!el('approve') },
		doc: window.__doc,
	};
})()`

// waitPage reads the page until ok accepts it (a page being replaced is read again), and
// fails the test with a screenshot when it does not within pageTimeout.
func (b *chromeTab) waitPage(what string, ok func(pageState) bool) pageState {
	b.t.Helper()
	deadline := time.Now().Add(pageTimeout)
	var last pageState
	var lastErr error
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(b.ctx, 5*time.Second)
		s, err := chromedp.Run(ctx, chromedp.Evaluate[pageState](pageStateJS))
		cancel()
		if err == nil {
			last, lastErr = s, nil
			b.mu.Lock()
			b.lastHref = s.Href
			if !b.docs[s.Doc] {
				b.docs[s.Doc] = true
				if s.Has["approve"] {
					b.approves++
				}
			}
			b.mu.Unlock()
			if ok(s) {
				return s
			}
		} else {
			lastErr = err
			if errors.Is(err, context.Canceled) || b.ctx.Err() != nil {
				break
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	b.shot("timeout")
	b.t.Fatalf("waited %s for %s; last error %v; last page %s: status %q, #error %q, %d answers, text %q; navigations %v",
		pageTimeout, what, lastErr, last.Href, last.Status, last.Error, last.Assistant, truncate(last.Text, 400), b.navigations())
	return last
}

// userIDByEmail finds a user made by the sign-up in the store file.
func (e *env) userIDByEmail(email string) string {
	e.t.Helper()
	db := e.openDB()
	var id string
	poll(e.t, 10*time.Second, "the user "+email+" in the store", func() (bool, string) {
		err := db.QueryRow(`SELECT id FROM users WHERE email_key = ?`, strings.ToLower(email)).Scan(&id)
		return err == nil, fmt.Sprint(err)
	})
	return id
}
