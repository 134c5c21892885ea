package caddymodule

import (
	"bytes"
	"context"
	"embed"
	"errors"
	"html/template"
	"net/http"
	"net/mail"
	"net/url"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/signin"
)

// The sign-in pages: plain server-rendered HTML, usable without JavaScript, every form with a
// CSRF token, every page with frame-ancestors 'none', no referrer and no caching.
//
//	GET|POST /auth/login     sign in (email, password); throttled per account and per address
//	GET|POST /auth/signup    make an account (unless disable_signup), granted signup_credits
//	GET|POST /auth/logout    sign out (POST; GET shows the button)
//	GET      /auth/authorize the fragment flow (alias /api/third-party/auth): redirect=URL, state=S
//	POST     /auth/consent   approve or deny a fragment flow or an OAuth authorization
//	GET      /account        balance, usage, API keys, connected apps
//	POST     /account/keys, /account/keys/{id}/rotate, /account/keys/{id}/revoke, /account/apps/revoke

//go:embed pages
var pageFiles embed.FS

var pages = template.Must(template.ParseFS(pageFiles, "pages/*.html"))

// pageData is what a page template shows.
type pageData struct {
	Title   string
	Email   string // the signed-in user's, "" when signed out
	CSRF    string
	Next    string
	Error   string
	Signup  bool
	Form    struct{ Email string }
	Consent *consentView
	Account *accountView
}

// consentView is the consent page's question: which client wants what.
type consentView struct {
	Client  string // the origin or the app's redirect origin, named plainly
	AppName string
	Scopes  []scopeView
	Hidden  []hiddenField // the request, carried to the POST (and checked again there)
}

type hiddenField struct{ Name, Value string }

// scopeView is a scope and what it lets a client do, in words.
type scopeView struct{ Name, About string }

var scopeAbout = map[string]string{
	identity.ScopeChatWrite:       "chat with the models, paid from your credits",
	identity.ScopeEmbeddingsWrite: "make embeddings, paid from your credits",
	identity.ScopeModelsRead:      "list the models and their prices",
	identity.ScopeKeysRead:        "see your API keys (never their secrets)",
	identity.ScopeKeysWrite:       "create, rotate and revoke your API keys",
	identity.ScopeCreditsRead:     "see your balance and credit history",
	identity.ScopeUsageRead:       "see your usage",
	identity.ScopeOfflineAccess:   "stay signed in when you are away",
	identity.ScopeAll:             "everything your account can do",
}

// scopeViews describes scopes for the consent page.
func scopeViews(scopes []string) []scopeView {
	out := make([]scopeView, 0, len(scopes))
	for _, s := range scopes {
		out = append(out, scopeView{s, scopeAbout[s]})
	}
	return out
}

// pageHeaders are set on every sign-in page: no framing, no referrer, no caching, no sniffing,
// and nothing loaded from elsewhere. formTargets are origins a form on the page may submit to
// (redirect to, after the POST), beside the gateway itself.
func pageHeaders(w http.ResponseWriter, formTargets ...string) {
	h := w.Header()
	action := "'self'"
	for _, t := range formTargets {
		action += " " + t
	}
	h.Set("Content-Security-Policy", "default-src 'none'; style-src 'self'; img-src 'self'; form-action "+action+
		"; frame-ancestors 'none'; base-uri 'none'")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
}

// render writes a page.
func (g *Gateway) render(w http.ResponseWriter, status int, name string, d *pageData) {
	var buf bytes.Buffer
	if err := pages.ExecuteTemplate(&buf, name, d); err != nil {
		g.logger.Error("rendering a page", zap.String("page", name), zap.Error(err))
		status = http.StatusInternalServerError
		buf.Reset()
		buf.WriteString("internal error\n")
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write(buf.Bytes())
}

// renderError shows an error page (never a redirect: the request could not be trusted).
func (g *Gateway) renderError(w http.ResponseWriter, r *http.Request, status int, title, msg string) {
	pageHeaders(w)
	d := &pageData{Title: title, Error: msg}
	if u, _, ok := g.sessionUser(r); ok {
		d.Email = u.Email
	}
	g.render(w, status, "error", d)
}

func serveStyle(w http.ResponseWriter, r *http.Request) {
	css, _ := pageFiles.ReadFile("pages/style.css")
	w.Header().Set("Content-Type", "text/css; charset=utf-8")
	w.Header().Set("Cache-Control", "public, max-age=3600")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	http.ServeContent(w, r, "style.css", time.Time{}, bytes.NewReader(css))
}

// servePage routes the pages.
func (g *Gateway) servePage(w http.ResponseWriter, r *http.Request) {
	pageHeaders(w)
	p := r.URL.Path
	get, post := r.Method == http.MethodGet || r.Method == http.MethodHead, r.Method == http.MethodPost
	switch {
	case p == "/auth/login" && get:
		g.loginPage(w, r, http.StatusOK, "", "")
	case p == "/auth/login" && post:
		g.login(w, r)
	case p == "/auth/signup" && get && !g.Signin.DisableSignup:
		g.signupPage(w, r, http.StatusOK, "", "")
	case p == "/auth/signup" && post && !g.Signin.DisableSignup:
		g.signup(w, r)
	case p == "/auth/logout" && get:
		g.logoutPage(w, r)
	case p == "/auth/logout" && post:
		g.logout(w, r)
	case (p == "/auth/authorize" || p == "/api/third-party/auth") && get:
		g.fragmentAuthorize(w, r)
	case p == "/auth/consent" && post:
		g.consent(w, r)
	case p == "/account" && get:
		g.accountPage(w, r, http.StatusOK, "", "")
	case strings.HasPrefix(p, "/account/") && post:
		g.accountAction(w, r)
	case p == "/auth/signup" && g.Signin.DisableSignup:
		g.renderError(w, r, http.StatusNotFound, "Not found", "Accounts are made by the operator here.")
	default:
		w.Header().Set("Allow", "GET, POST")
		g.renderError(w, r, http.StatusMethodNotAllowed, "Method not allowed", "This page does not take "+r.Method+" requests.")
	}
}

// --- CSRF and sessions ---

// csrfToken is the CSRF token for the forms of this response: bound to a random cookie of
// the browser's, set now when it has none.
func (g *Gateway) csrfToken(w http.ResponseWriter, r *http.Request) string {
	binding := g.readCookie(r, csrfCookieName)
	if len(binding) < 32 {
		binding = signin.NewToken("csrf")
		http.SetCookie(w, g.cookie(r, csrfCookieName, binding, 0))
	}
	return signin.CSRFToken(g.Signin.secret, binding)
}

// errCSRF is a form post without a valid CSRF token or from another site.
var errCSRF = errors.New("this form expired or did not come from this site: reload the page and try again")

// checkForm parses a posted form and checks its CSRF token and the request's Origin, which
// must be the issuer's (behind a TLS-terminating proxy the request itself says http while the
// browser says https: the configured issuer is the truth).
func (g *Gateway) checkForm(r *http.Request) error {
	if err := r.ParseForm(); err != nil {
		return invalid("", "unreadable form")
	}
	if o := r.Header.Get("Origin"); o != "" && o != "null" && !strings.EqualFold(o, g.Signin.origin()) {
		return errCSRF
	}
	if !signin.CheckCSRF(g.Signin.secret, g.readCookie(r, csrfCookieName), r.PostForm.Get("csrf")) {
		return errCSRF
	}
	return nil
}

// origin is the origin the pages are served from: the issuer's, without a default port.
func (s *Signin) origin() string {
	u, err := url.Parse(s.Issuer)
	if err != nil {
		return s.Issuer
	}
	host := u.Host
	if p := u.Port(); (u.Scheme == "https" && p == "443") || (u.Scheme == "http" && p == "80") {
		host = u.Hostname()
		if strings.Contains(host, ":") {
			host = "[" + host + "]"
		}
	}
	return u.Scheme + "://" + host
}

// secureCookies reports whether the issuer is https: the browser talks TLS to the gateway (or
// to the proxy in front of it), so the cookies are Secure, with the __Host- prefix.
func (s *Signin) secureCookies() bool {
	return strings.HasPrefix(strings.ToLower(s.Issuer), "https://")
}

// cookie is one of the gateway's cookies: HttpOnly, SameSite=Lax, for the whole site, and
// Secure with the __Host- prefix when the issuer is https (whether or not this request came
// over TLS: a TLS-terminating proxy forwards plain HTTP). maxAge < 0 deletes it; 0 makes a
// browser-session cookie.
func (g *Gateway) cookie(_ *http.Request, name, value string, maxAge int) *http.Cookie {
	c := &http.Cookie{Name: name, Value: value, Path: "/", HttpOnly: true, SameSite: http.SameSiteLaxMode, MaxAge: maxAge}
	if g.Signin.secureCookies() {
		c.Name, c.Secure = "__Host-"+name, true
	}
	return c
}

// readCookie reads one of the gateway's cookies, by the name cookie gives it.
func (g *Gateway) readCookie(r *http.Request, name string) string {
	if g.Signin.secureCookies() {
		name = "__Host-" + name
	}
	c, err := r.Cookie(name)
	if err != nil || len(c.Value) > 128 {
		return ""
	}
	return c.Value
}

// sessionUser is the signed-in user of the request, with the session's hash.
func (g *Gateway) sessionUser(r *http.Request) (identity.User, [32]byte, bool) {
	tok := g.readCookie(r, sessionCookieName)
	if tok == "" {
		return identity.User{}, [32]byte{}, false
	}
	h := signin.HashToken(tok)
	ctx, cancel := context.WithTimeout(r.Context(), storeTimeout)
	defer cancel()
	s, err := g.store.signin.SessionByHash(ctx, h)
	if err != nil || !g.clock().Before(s.ExpiresAt) {
		return identity.User{}, h, false
	}
	u, err := g.store.users.UserByID(ctx, s.UserID)
	if err != nil {
		return identity.User{}, h, false
	}
	return u, h, true
}

// startSession signs the browser in as userID with a new session (the old one, if any, is
// ended: the session id changes at every sign-in).
func (g *Gateway) startSession(w http.ResponseWriter, r *http.Request, userID string) error {
	ctx := r.Context()
	if old := g.readCookie(r, sessionCookieName); old != "" {
		_ = g.store.signin.DeleteSession(ctx, signin.HashToken(old))
	}
	tok := signin.NewToken("ses")
	now := g.clock()
	ttl := time.Duration(g.Signin.SessionTTL)
	if err := g.store.signin.CreateSession(ctx, signin.Session{Hash: signin.HashToken(tok), UserID: userID,
		CreatedAt: now, ExpiresAt: now.Add(ttl)}); err != nil {
		return err
	}
	http.SetCookie(w, g.cookie(r, sessionCookieName, tok, int(ttl/time.Second)))
	return nil
}

// localNext is the page to go to after signing in: a path on this site, else /account.
func localNext(next string) string {
	if next == "" || len(next) > 4096 || !strings.HasPrefix(next, "/") || strings.HasPrefix(next, "//") ||
		strings.ContainsAny(next, "\\\r\n\t") {
		return "/account"
	}
	u, err := url.Parse(next)
	if err != nil || u.Scheme != "" || u.Host != "" || u.User != nil {
		return "/account"
	}
	return next
}

// --- sign in, sign up, sign out ---

func (g *Gateway) loginPage(w http.ResponseWriter, r *http.Request, status int, email, msg string) {
	d := &pageData{Title: "Sign in", CSRF: g.csrfToken(w, r), Next: localNext(r.FormValue("next")), Error: msg,
		Signup: !g.Signin.DisableSignup}
	if u, _, ok := g.sessionUser(r); ok {
		d.Email = u.Email // signed in already: the form signs in as someone else
	}
	d.Form.Email = email
	g.render(w, status, "login", d)
}

func (g *Gateway) signupPage(w http.ResponseWriter, r *http.Request, status int, email, msg string) {
	d := &pageData{Title: "Create an account", CSRF: g.csrfToken(w, r), Next: localNext(r.FormValue("next")), Error: msg}
	d.Form.Email = email
	g.render(w, status, "signup", d)
}

// wrongCredentials is the one answer to a wrong email or a wrong password.
const wrongCredentials = "Wrong email or password."

func (g *Gateway) login(w http.ResponseWriter, r *http.Request) {
	if err := g.checkForm(r); err != nil {
		g.renderError(w, r, http.StatusForbidden, "Try again", err.Error())
		return
	}
	email := strings.TrimSpace(r.PostForm.Get("email"))
	u, err := g.checkPassword(w, r, email, r.PostForm.Get("password"))
	if err != nil {
		status, msg := g.signinFailure(w, err)
		g.loginPage(w, r, status, email, msg)
		return
	}
	if err := g.startSession(w, r, u.ID); err != nil {
		g.loginPage(w, r, http.StatusServiceUnavailable, email, "Signing in is unavailable right now; try again.")
		return
	}
	http.Redirect(w, r, localNext(r.PostForm.Get("next")), http.StatusSeeOther)
}

// signinFailure is the status and message of a failed sign-in, with the 429's headers.
func (g *Gateway) signinFailure(w http.ResponseWriter, err error) (int, string) {
	var rl *rateLimited
	switch {
	case errors.As(err, &rl):
		e := errorResponse(err)
		for k, v := range e.headers {
			w.Header().Set(k, v)
		}
		w.Header().Set("Retry-After", retrySeconds(rl.d.RetryAfter))
		return http.StatusTooManyRequests, "Too many attempts: try again in " + retrySeconds(rl.d.RetryAfter) + " seconds."
	case errors.Is(err, errWrongPassword):
		return http.StatusUnauthorized, wrongCredentials
	case errors.Is(err, errHashBusy):
		w.Header().Set("Retry-After", hashBusyRetry)
		return http.StatusServiceUnavailable, "Too many sign-ins at once: try again in a few seconds."
	default:
		return http.StatusServiceUnavailable, "Signing in is unavailable right now; try again."
	}
}

// errWrongPassword is an unknown email or a wrong password: the same answer for both.
var errWrongPassword = errors.New("wrong email or password")

// dummyHash is checked for unknown emails, so that they take as long as known ones.
var dummyHash = sync.OnceValue(func() string {
	h, err := identity.HashPassword(signin.NewToken("dummy"))
	if err != nil {
		panic(err)
	}
	return h
})

// checkPassword admits a sign-in attempt by the throttles (per client address, per account,
// and per account from this address), then checks the password holding a hashing slot; a
// wrong one counts against every throttle, a right one (or none checked: no slot) against none.
func (g *Gateway) checkPassword(w http.ResponseWriter, r *http.Request, email, password string) (identity.User, error) {
	addr, account := signinAddress(r), strings.ToLower(email)
	if len(account) > 254 { // no account has a longer email: the throttles' keys stay small
		account = account[:254]
	}
	// The per account and address limiter comes last: its headers are the ones that stay.
	giveBack, err := g.admitNamed(w, namedAttempt{LimiterSigninIP, addr}, namedAttempt{LimiterSigninAccountWide, account},
		namedAttempt{LimiterSigninAccount, account + " " + addr})
	if err != nil {
		return identity.User{}, err
	}
	ctx, cancel := context.WithTimeout(r.Context(), storeTimeout)
	defer cancel()
	u, err := g.store.users.UserByEmail(ctx, email)
	if err != nil && !errors.Is(err, identity.ErrNotFound) {
		return identity.User{}, err
	}
	var ok bool
	err = passwordHashing.do(r.Context(), func() {
		hash := u.PasswordHash
		if hash == "" { // an unknown email, or a user without a password: the same work
			hash = dummyHash()
		}
		ok, _ = identity.CheckPassword(hash, password)
	})
	if err != nil {
		giveBack()
		return identity.User{}, err
	}
	if !ok || u.PasswordHash == "" {
		return identity.User{}, errWrongPassword
	}
	giveBack() // a right password is not an attempt to throttle
	return u, nil
}

func (g *Gateway) signup(w http.ResponseWriter, r *http.Request) {
	if err := g.checkForm(r); err != nil {
		g.renderError(w, r, http.StatusForbidden, "Try again", err.Error())
		return
	}
	email := strings.TrimSpace(r.PostForm.Get("email"))
	addr, err := mail.ParseAddress(email)
	if err != nil || addr.Address != email || len(email) > 254 {
		g.signupPage(w, r, http.StatusBadRequest, email, "Enter a plain email address, like ada@example.com.")
		return
	}
	if pw := r.PostForm.Get("password"); len(pw) < identity.MinPasswordLen || len(pw) > identity.MaxPasswordLen {
		g.signupPage(w, r, http.StatusBadRequest, email, "The password must be 8 to 256 characters.")
		return
	}
	// A sign-up is a password hash (the address's sign-in attempts) and an account, maybe with
	// credits (the address's sign-ups, whose headers stay).
	from := signinAddress(r)
	giveBack, err := g.admitNamed(w, namedAttempt{LimiterSigninIP, from}, namedAttempt{LimiterSignupIP, from})
	if err != nil {
		status, msg := g.signinFailure(w, err)
		g.signupPage(w, r, status, email, msg)
		return
	}
	var hash string
	if herr := passwordHashing.do(r.Context(), func() { hash, err = identity.HashPassword(r.PostForm.Get("password")) }); herr != nil {
		giveBack()
		status, msg := g.signinFailure(w, herr)
		g.signupPage(w, r, status, email, msg)
		return
	}
	if err != nil {
		g.signupPage(w, r, http.StatusBadRequest, email, "The password must be 8 to 256 characters.")
		return
	}
	u := identity.User{ID: newID("usr"), Email: email, PasswordHash: hash, CreatedAt: g.clock().UTC()}
	ctx := r.Context()
	switch err := g.store.users.CreateUser(ctx, u); {
	case errors.Is(err, identity.ErrConflict):
		g.signupPage(w, r, http.StatusConflict, email, "An account with this email exists already: sign in instead.")
		return
	case err != nil:
		g.signupPage(w, r, http.StatusServiceUnavailable, email, "Accounts cannot be made right now; try again.")
		return
	}
	if amount := g.Signin.SignupCredits; amount > 0 {
		if _, _, err := g.store.ledger.Credit(ctx, credits.UserAccount(u.ID), amount, "signup credits", "signup"); err != nil {
			g.logger.Error("granting signup credits", zap.String("user_id", u.ID), zap.Error(err))
		}
	}
	if err := g.startSession(w, r, u.ID); err != nil {
		g.signupPage(w, r, http.StatusServiceUnavailable, email, "Signing in is unavailable right now; try again.")
		return
	}
	http.Redirect(w, r, localNext(r.PostForm.Get("next")), http.StatusSeeOther)
}

func (g *Gateway) logoutPage(w http.ResponseWriter, r *http.Request) {
	d := &pageData{Title: "Sign out", CSRF: g.csrfToken(w, r)}
	if u, _, ok := g.sessionUser(r); ok {
		d.Email = u.Email
	}
	g.render(w, http.StatusOK, "logout", d)
}

func (g *Gateway) logout(w http.ResponseWriter, r *http.Request) {
	if err := g.checkForm(r); err != nil {
		g.renderError(w, r, http.StatusForbidden, "Try again", err.Error())
		return
	}
	if tok := g.readCookie(r, sessionCookieName); tok != "" {
		_ = g.store.signin.DeleteSession(r.Context(), signin.HashToken(tok))
	}
	http.SetCookie(w, g.cookie(r, sessionCookieName, "", -1))
	http.Redirect(w, r, "/auth/login", http.StatusSeeOther)
}

// requireSession is the signed-in user; when there is none it sends the browser to sign in
// and back to this request, and reports false.
func (g *Gateway) requireSession(w http.ResponseWriter, r *http.Request) (identity.User, bool) {
	u, _, ok := g.sessionUser(r)
	if !ok {
		http.Redirect(w, r, "/auth/login?next="+url.QueryEscape(r.URL.RequestURI()), http.StatusSeeOther)
	}
	return u, ok
}

// --- the fragment flow (the Peerwave seed's) ---

// fragmentRequest is a checked /auth/authorize request.
type fragmentRequest struct {
	redirect *url.URL
	origin   string
	state    string
}

// maxStateLen bounds the state a client passes through.
const maxStateLen = 1024

// parseFragmentRequest checks redirect= against the return policy and bounds state=.
func (g *Gateway) parseFragmentRequest(v url.Values) (fragmentRequest, error) {
	if len(v["redirect"]) != 1 || len(v["state"]) > 1 {
		return fragmentRequest{}, errors.New("give exactly one redirect (and at most one state)")
	}
	u, origin, err := g.Signin.policy.Check(v.Get("redirect"))
	if err != nil {
		return fragmentRequest{}, errors.New("this app may not receive sign-in tokens: its return address is not allowed")
	}
	state := v.Get("state")
	if len(state) > maxStateLen {
		return fragmentRequest{}, errors.New("state is too long")
	}
	return fragmentRequest{redirect: u, origin: origin, state: state}, nil
}

// fragmentClient is the consent's client name of a fragment flow origin.
func fragmentClient(origin string) string { return "origin:" + origin }

func (g *Gateway) fragmentAuthorize(w http.ResponseWriter, r *http.Request) {
	fr, err := g.parseFragmentRequest(r.URL.Query())
	if err != nil {
		g.renderError(w, r, http.StatusBadRequest, "Cannot sign in to this app", err.Error())
		return
	}
	u, ok := g.requireSession(w, r)
	if !ok {
		return
	}
	if g.consented(r.Context(), u.ID, fragmentClient(fr.origin), fragmentScopes) {
		g.fragmentRedirect(w, r, u.ID, fr)
		return
	}
	pageHeaders(w, fr.origin)
	d := &pageData{Title: "Allow access", Email: u.Email, CSRF: g.csrfToken(w, r), Consent: &consentView{
		Client: fr.origin, Scopes: scopeViews(fragmentScopes),
		Hidden: []hiddenField{{"flow", "fragment"}, {"redirect", fr.redirect.String()}, {"state", fr.state}},
	}}
	g.render(w, http.StatusOK, "consent", d)
}

// consented reports whether the user's live consent for client covers scopes.
func (g *Gateway) consented(ctx context.Context, userID, client string, scopes []string) bool {
	c, err := g.store.signin.ConsentFor(ctx, userID, client)
	return err == nil && c.RevokedAt == nil && signin.Covers(c.Scopes, scopes)
}

// fragmentRedirect sends the browser back to the app with an IP-bound token in the fragment
// (never in the query, so it reaches neither servers nor Referer headers).
func (g *Gateway) fragmentRedirect(w http.ResponseWriter, r *http.Request, userID string, fr fragmentRequest) {
	tok, err := g.mint(signin.TypeFragment, userID, fr.origin, fragmentScopes, clientAddr(r), time.Duration(g.Signin.FragmentTokenTTL))
	if err != nil {
		g.renderError(w, r, http.StatusInternalServerError, "Sign-in failed", "The token could not be made; try again.")
		return
	}
	redirectWithFragment(w, r, fr, "token", tok)
}

// redirectWithFragment redirects to the app's return address with name=value (token=<JWT>,
// or error=access_denied) and the request's state in the fragment, in that order.
func redirectWithFragment(w http.ResponseWriter, r *http.Request, fr fragmentRequest, name, value string) {
	frag := name + "=" + url.QueryEscape(value)
	if fr.state != "" {
		frag += "&state=" + url.QueryEscape(fr.state)
	}
	redirectWithSecret(w, r, fr.redirect.String()+"#"+frag)
}

// redirectWithSecret redirects to loc, which carries a token or a code: once the headers are
// on the wire, Location is taken out of the header map again, so that Caddy's access log,
// which reads the response headers after the handler returns, never holds it.
func redirectWithSecret(w http.ResponseWriter, r *http.Request, loc string) {
	status := http.StatusFound
	if r.Method == http.MethodPost {
		status = http.StatusSeeOther
	}
	h := w.Header()
	h.Set("Location", loc)
	h.Set("Content-Length", "0")
	w.WriteHeader(status)
	if err := http.NewResponseController(w).Flush(); err == nil {
		h.Del("Location")
	}
}

// consent takes the answer of a consent page: the fragment flow's or OAuth's.
func (g *Gateway) consent(w http.ResponseWriter, r *http.Request) {
	if err := g.checkForm(r); err != nil {
		g.renderError(w, r, http.StatusForbidden, "Try again", err.Error())
		return
	}
	u, _, ok := g.sessionUser(r)
	if !ok {
		g.renderError(w, r, http.StatusForbidden, "Signed out", "Sign in again, then retry from the app.")
		return
	}
	approve := r.PostForm.Get("decision") == "approve"
	switch r.PostForm.Get("flow") {
	case "fragment":
		fr, err := g.parseFragmentRequest(url.Values{"redirect": r.PostForm["redirect"], "state": r.PostForm["state"]})
		if err != nil {
			g.renderError(w, r, http.StatusBadRequest, "Cannot sign in to this app", err.Error())
			return
		}
		if !approve {
			redirectWithFragment(w, r, fr, "error", "access_denied")
			return
		}
		if err := g.store.signin.SaveConsent(r.Context(), signin.Consent{UserID: u.ID, Client: fragmentClient(fr.origin),
			Scopes: fragmentScopes, CreatedAt: g.clock().UTC()}); err != nil {
			g.renderError(w, r, http.StatusServiceUnavailable, "Try again", "Your answer could not be saved; try again.")
			return
		}
		g.fragmentRedirect(w, r, u.ID, fr)
	case "oauth":
		g.oauthConsent(w, r, u, approve)
	default:
		g.renderError(w, r, http.StatusBadRequest, "Bad request", "Unknown consent form.")
	}
}

// --- the account page ---

// accountView is what /account shows.
type accountView struct {
	Balance credits.Amount
	NewKey  string
	Usage   []usageRow
	Keys    []accountKey
	Apps    []accountApp
}

type usageRow struct {
	Day, Model                          string
	Requests, InputTokens, OutputTokens int64
	Credits                             credits.Amount
}

type accountKey struct {
	ID, Name, Created, LastUsed, State string
	Live                               bool
}

type accountApp struct{ Client, Name, Scopes, Since string }

func (g *Gateway) accountPage(w http.ResponseWriter, r *http.Request, status int, newKey, msg string) {
	u, ok := g.requireSession(w, r)
	if !ok {
		return
	}
	ctx := r.Context()
	a := &accountView{NewKey: newKey}
	var err error
	if a.Balance, err = g.store.ledger.Balance(ctx, credits.UserAccount(u.ID)); err != nil && !errors.Is(err, credits.ErrUnknownAccount) {
		msg = "Your balance cannot be read right now."
	}
	now := g.clock().UTC()
	if days, err := g.store.usage(ctx, credits.UserAccount(u.ID), usageSince(now, 30)); err == nil {
		for _, d := range days {
			a.Usage = append(a.Usage, usageRow{Day: d.Day, Model: d.Model, Requests: d.Requests,
				InputTokens: d.InputTokens, OutputTokens: d.OutputTokens, Credits: d.Credits})
		}
	}
	keys, _ := g.store.keys.KeysByUser(ctx, u.ID)
	for _, k := range keys {
		ak := accountKey{ID: k.ID, Name: k.Name, Created: k.CreatedAt.UTC().Format("2006-01-02"), LastUsed: "never"}
		if k.LastUsedAt != nil {
			ak.LastUsed = k.LastUsedAt.UTC().Format("2006-01-02 15:04")
		}
		switch {
		case k.RevokedAt != nil:
			ak.State = "revoked"
		case k.ExpiresAt != nil && !now.Before(*k.ExpiresAt):
			ak.State = "expired"
		case k.RotatedTo != "":
			ak.State, ak.Live = "rotated, works until "+k.ExpiresAt.UTC().Format("2006-01-02 15:04"), false
		default:
			ak.State, ak.Live = "active", true
		}
		a.Keys = append(a.Keys, ak)
	}
	consents, _ := g.store.signin.ConsentsByUser(ctx, u.ID)
	for _, c := range consents {
		name := strings.TrimPrefix(c.Client, "origin:")
		if !strings.HasPrefix(c.Client, "origin:") {
			if app, err := g.store.signin.AppByID(ctx, c.Client); err == nil {
				name = app.Name
			}
		}
		a.Apps = append(a.Apps, accountApp{Client: c.Client, Name: name, Scopes: strings.Join(c.Scopes, " "),
			Since: c.CreatedAt.UTC().Format("2006-01-02")})
	}
	g.render(w, status, "account", &pageData{Title: "Your account", Email: u.Email, CSRF: g.csrfToken(w, r),
		Error: msg, Account: a})
}

// accountAction takes the account page's forms: create, rotate or revoke a key, disconnect
// an app. Each acts for the signed-in user only; another user's key is "not found".
func (g *Gateway) accountAction(w http.ResponseWriter, r *http.Request) {
	if err := g.checkForm(r); err != nil {
		g.renderError(w, r, http.StatusForbidden, "Try again", err.Error())
		return
	}
	u, ok := g.requireSession(w, r)
	if !ok {
		return
	}
	who := &caller{kind: "session", userID: u.ID, account: credits.UserAccount(u.ID), scopes: []string{identity.ScopeAll}}
	ctx := r.Context()
	parts := strings.Split(strings.TrimPrefix(r.URL.Path, "/account/"), "/")
	var (
		out any
		err error
	)
	switch {
	case len(parts) == 1 && parts[0] == "keys":
		name := strings.TrimSpace(r.PostForm.Get("name"))
		out, err = g.createKey(ctx, u.ID, keyRequest{Name: name}, int(g.MaxKeysPerUser))
	case len(parts) == 3 && parts[0] == "keys" && parts[2] == "rotate":
		var old identity.Key
		if old, err = g.ownKey(ctx, who, parts[1]); err == nil {
			out, err = g.rotateKey(ctx, old, rotateRequest{}, nil)
		}
	case len(parts) == 3 && parts[0] == "keys" && parts[2] == "revoke":
		if _, err = g.ownKey(ctx, who, parts[1]); err == nil {
			_, err = g.adminRevokeKey(ctx, parts[1])
		}
	case len(parts) == 2 && parts[0] == "apps" && parts[1] == "revoke":
		client := r.PostForm.Get("client")
		err = g.store.signin.RevokeConsent(ctx, u.ID, client, g.clock().UTC())
	default:
		err = errRouteAbsent
	}
	if err != nil {
		e := errorResponse(err)
		g.accountPage(w, r, e.status, "", e.Message)
		return
	}
	if key := newKeyOf(out); key != "" {
		g.accountPage(w, r, http.StatusOK, key, "")
		return
	}
	http.Redirect(w, r, "/account", http.StatusSeeOther)
}

// newKeyOf is the key shown once in a create ("api_key") or rotate ("new_key") answer; ""
// for other answers.
func newKeyOf(out any) string {
	m, _ := out.(map[string]any)
	for _, field := range []string{"api_key", "new_key"} {
		if v, ok := m[field].(keyView); ok {
			return v.Key
		}
	}
	return ""
}
