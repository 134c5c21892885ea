package caddymodule

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/identity"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/routing"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/signin"
)

// Errors of the request pipeline, beside those of the policies packages.
var (
	errMissingCredential = errors.New("no credentials: send an API key (Authorization: Bearer, X-API-Key or apikey)")
	errTokenUnsupported  = errors.New("tokens are not accepted here")
	errTooLarge          = errors.New("request body too large")
	errNoOutput          = errors.New("backend failed before sending a response")
	errUpstreamTimeout   = errors.New("backend did not answer in time")
	errCutAnswer         = errors.New("backend's answer was cut short or is not valid JSON")
	errClientLeft        = errors.New("the client went away before any answer")
	errEncodedAnswer     = errors.New("backend compressed its answer although the gateway asked for identity encoding")
	errBodyTimeout       = errors.New("the request body did not arrive in time")
	// errOriginNotAllowed: a browser page on an origin the configuration does not allow sent
	// an inference request it could send without a CORS preflight (checkOrigin).
	errOriginNotAllowed = errors.New("this origin may not call the gateway: list it in allowed_origins")
)

// badRequest is a 400 invalid_request naming the parameter at fault.
type badRequest struct {
	param   string
	message string
}

func (e *badRequest) Error() string { return e.message }

func invalid(param, format string, args ...any) error {
	return &badRequest{param: param, message: fmt.Sprintf(format, args...)}
}

// toolRefused is a 400 tool_not_priced: a tool type the surface does not serve (neither the
// client's nor a provider tool the gateway counts). The type is named, cut short.
type toolRefused struct{ param, tool string }

func (e *toolRefused) Error() string {
	t := e.tool
	if len(t) > 64 {
		t = t[:64] + "..."
	}
	return "the tool type " + strconv.Quote(t) + " is not served: the gateway bills only the tools it can count"
}

// missingScope is a 403 insufficient_scope naming the scope the route needs.
type missingScope struct{ scope string }

func (e *missingScope) Error() string { return "this credential lacks the scope " + e.scope }

// outOfCredits is a 402 with where the caller should go.
type outOfCredits struct {
	balance, required credits.Amount
	location          string
}

func (e *outOfCredits) Error() string { return credits.ErrInsufficientCredits.Error() }
func (e *outOfCredits) Unwrap() error { return credits.ErrInsufficientCredits }

// noRoute wraps a routing error with the request's model and price ceiling.
type noRoute struct {
	err      error
	model    string
	maxPrice credits.Amount
}

func (e *noRoute) Error() string { return e.err.Error() }
func (e *noRoute) Unwrap() error { return e.err }

// apiError is the JSON error of API.md §5.
type apiError struct {
	status  int
	Code    string         `json:"code"`
	Type    string         `json:"type"`
	Message string         `json:"message"`
	Param   *string        `json:"param"`
	Details map[string]any `json:"details,omitempty"`
	headers map[string]string
}

// errorResponse is the one place where domain errors become HTTP answers.
func errorResponse(err error) *apiError {
	e := &apiError{Message: err.Error()}
	set := func(status int, code, typ string) { e.status, e.Code, e.Type = status, code, typ }
	// RFC 6750 §3.1: every credential that is not accepted is an invalid_token.
	bearer := func() {
		e.headers = map[string]string{"WWW-Authenticate": `Bearer realm="llm_gateway", error="invalid_token"`}
	}
	var (
		br *badRequest
		ek *identity.ExpiredKeyError
		kc *keyCapReached
		ms *missingScope
		oc *outOfCredits
		nr *noRoute
		se *statusError
		rl *rateLimited
		tt *tooManyTokens
		ur *unknownRoute
		uq *unknownResponse
		tr *toolRefused
		tn *routing.ToolNotPriced
	)
	switch {
	case errors.As(err, &br):
		set(http.StatusBadRequest, "invalid_request", "invalid_request_error")
		if br.param != "" {
			e.Param = &br.param
		}
	case errors.Is(err, identity.ErrTwoCredentials):
		set(http.StatusBadRequest, "invalid_request", "invalid_request_error")
		e.Message = "send one credential per request"
	case errors.Is(err, errBodyTimeout):
		set(http.StatusRequestTimeout, "request_timeout", "invalid_request_error")
	case errors.Is(err, errTooLarge):
		set(http.StatusRequestEntityTooLarge, "request_too_large", "invalid_request_error")
	case errors.Is(err, errMissingCredential):
		set(http.StatusUnauthorized, "missing_api_key", "authentication_error")
		e.headers = map[string]string{"WWW-Authenticate": `Bearer realm="llm_gateway"`}
	case errors.Is(err, identity.ErrMalformedCredential), errors.Is(err, identity.ErrMalformedKey), errors.Is(err, identity.ErrUnknownKey):
		set(http.StatusUnauthorized, "invalid_api_key", "authentication_error")
		e.Message = "invalid api key"
		bearer()
	case errors.As(err, &ek):
		set(http.StatusUnauthorized, "expired_api_key", "authentication_error")
		e.Details = map[string]any{"expired_at": ek.At.UTC().Format(time.RFC3339)}
		bearer()
	case errors.Is(err, identity.ErrRevokedKey):
		set(http.StatusUnauthorized, "revoked_api_key", "authentication_error")
		bearer()
	case errors.Is(err, identity.ErrIPNotAllowed):
		set(http.StatusForbidden, "ip_not_allowed", "permission_error")
	case errors.Is(err, errOriginNotAllowed):
		set(http.StatusForbidden, "origin_not_allowed", "permission_error")
	case errors.Is(err, errInvalidToken):
		set(http.StatusUnauthorized, "invalid_token", "authentication_error")
		e.Message = "invalid token"
		bearer()
	case errors.Is(err, errTokenUnsupported):
		set(http.StatusUnauthorized, "invalid_token", "authentication_error")
		bearer()
	case errors.As(err, &ms):
		set(http.StatusForbidden, "insufficient_scope", "permission_error")
		e.headers = map[string]string{"WWW-Authenticate": `Bearer realm="llm_gateway", error="insufficient_scope", scope="` + ms.scope + `"`}
	case errors.As(err, &rl):
		set(http.StatusTooManyRequests, "rate_limit_exceeded", "rate_limit_error")
		secs, _ := strconv.ParseInt(retrySeconds(rl.d.RetryAfter), 10, 64)
		e.Details = map[string]any{"retry_after": secs, "limit": rl.d.Refused, "tier": rl.tier}
		if rl.scope != "" {
			e.Details["scope"] = rl.scope
		}
	case errors.As(err, &tt):
		set(http.StatusBadRequest, "invalid_request", "invalid_request_error")
		p := "max_tokens"
		e.Param = &p
		e.Details = map[string]any{"limit": "tokens_per_minute", "tokens_per_minute": tt.limit, "token_bound": tt.bound}
	case errors.As(err, &kc):
		// The owner may have credits left: the key's own cap is what refuses (no Location).
		set(http.StatusPaymentRequired, "insufficient_credits", "insufficient_credits")
		e.Details = map[string]any{"key_credit_cap": kc.cap, "key_spent": kc.spent, "key_reserved": kc.reserved,
			"required": kc.required, "login_url": nil}
		if kc.period != "" {
			e.Details["key_credit_cap_period"] = kc.period
		}
	case errors.As(err, &oc):
		set(http.StatusPaymentRequired, "insufficient_credits", "insufficient_credits")
		e.Details = map[string]any{"balance": oc.balance, "required": oc.required, "login_url": nil}
		if oc.location != "" {
			e.Details["login_url"] = oc.location
			e.headers = map[string]string{"Location": oc.location}
		}
	case errors.As(err, &tr):
		set(http.StatusBadRequest, "tool_not_priced", "invalid_request_error")
		e.Param = &tr.param
	case errors.As(err, &nr) && errors.As(nr.err, &tn):
		set(http.StatusBadRequest, "tool_not_priced", "invalid_request_error")
		e.Message = "the tool " + strconv.Quote(tn.Fee) + " is billed by the provider per call and no model " +
			strconv.Quote(nr.model) + " serving this request prices it"
		e.Details = map[string]any{"tool": tn.Fee}
		p := "tools"
		e.Param = &p
	case errors.As(err, &nr):
		switch {
		case errors.Is(nr.err, routing.ErrModelNotAllowed):
			set(http.StatusForbidden, "model_not_allowed", "permission_error")
			e.Message = "this credential may not use model " + strconv.Quote(nr.model)
		case errors.Is(nr.err, routing.ErrNoBackend):
			set(http.StatusServiceUnavailable, "no_backend_available", "api_error")
			e.Message = "no healthy backend serves " + strconv.Quote(nr.model) + " now"
		case errors.Is(nr.err, routing.ErrOverMaxPrice):
			set(http.StatusNotFound, "model_not_found", "invalid_request_error")
			e.Message = "no model serves this request within max_price"
			e.Details = map[string]any{"max_price": nr.maxPrice}
		default:
			set(http.StatusNotFound, "model_not_found", "invalid_request_error")
			e.Message = "the model " + strconv.Quote(nr.model) + " does not exist"
		}
		p := "model"
		e.Param = &p
	case errors.As(err, &uq):
		set(http.StatusNotFound, "not_found", "invalid_request_error")
		if uq.param != "" {
			e.Param = &uq.param
		}
	case errors.As(err, &ur):
		if ur.notImplemented {
			set(http.StatusNotImplemented, "not_implemented", "invalid_request_error")
		} else {
			set(http.StatusNotFound, "not_found", "invalid_request_error")
		}
	case errors.Is(err, identity.ErrNotFound), errors.Is(err, errRouteAbsent):
		set(http.StatusNotFound, "not_found", "invalid_request_error")
		e.Message = "not found"
	case errors.Is(err, identity.ErrNotRotatable):
		set(http.StatusConflict, "conflict", "invalid_request_error")
		e.Message = "the key was already rotated, or is revoked or expired"
	case errors.Is(err, identity.ErrConflict):
		set(http.StatusConflict, "conflict", "invalid_request_error")
		e.Message = "already exists"
	case errors.Is(err, credits.ErrIdempotencyConflict):
		set(http.StatusUnprocessableEntity, "idempotency_conflict", "invalid_request_error")
	case errors.As(err, &se):
		e.status, e.Code, e.Type = se.status, strings.ToLower(strings.ReplaceAll(http.StatusText(se.status), " ", "_")), "invalid_request_error"
	case errors.Is(err, errLimitsUnavailable):
		set(http.StatusServiceUnavailable, "limits_unavailable", "api_error")
		e.Message = "the shared rate limits are unavailable (redis does not answer); nothing was forwarded"
		e.headers = map[string]string{"Retry-After": "1"}
	case errors.Is(err, credits.ErrStoreUnavailable):
		set(http.StatusServiceUnavailable, "store_unavailable", "api_error")
		e.Message = "the credit store is unavailable; nothing was forwarded"
	case errors.Is(err, errUpstreamTimeout):
		set(http.StatusGatewayTimeout, "upstream_timeout", "api_error")
		e.Message = "the backend did not answer in time; no credits were charged"
	case errors.Is(err, errClientLeft):
		// Nobody reads it: the code is what the request is counted as.
		set(499, "client_gone", "api_error")
		e.Message = "the client went away before any answer; no credits were charged"
	case errors.Is(err, errNoOutput), errors.Is(err, errCutAnswer), errors.Is(err, errEncodedAnswer):
		set(http.StatusBadGateway, "upstream_error", "api_error")
		e.Message = "the backend failed; no credits were charged"
	default:
		set(http.StatusInternalServerError, "internal_error", "api_error")
		e.Message = "internal error"
	}
	return e
}

// oauthErrorFor maps a domain error of the token endpoints to its RFC 6749 §5.2 error.
func oauthErrorFor(err error) *oauthError {
	switch {
	case errors.Is(err, signin.ErrCodeUsed), errors.Is(err, signin.ErrRefreshReused), errors.Is(err, signin.ErrRefreshDead),
		errors.Is(err, identity.ErrNotFound):
		return grantError("invalid grant")
	case errors.Is(err, credits.ErrStoreUnavailable):
		return &oauthError{http.StatusServiceUnavailable, "temporarily_unavailable", "the store is unavailable; try again"}
	default:
		return &oauthError{http.StatusInternalServerError, "server_error", "internal error"}
	}
}

// writeError writes err as the JSON error of API.md §5, in the shape the client of r's path
// reads (errorShapeOf).
func writeError(w http.ResponseWriter, r *http.Request, err error) *apiError {
	e := errorResponse(err)
	h := w.Header()
	for k, v := range e.headers {
		h.Set(k, v)
	}
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	h.Del("Content-Length")
	var body []byte
	switch errorShapeOf(r.URL.Path) {
	case shapeOllama:
		body, _ = json.Marshal(struct {
			Error   string         `json:"error"`
			Code    string         `json:"code"`
			Param   *string        `json:"param,omitempty"`
			Details map[string]any `json:"details,omitempty"`
		}{e.Message, e.Code, e.Param, e.Details})
	case shapeAnthropic:
		// The contract's code also goes where Anthropic puts its stable codes
		// (error.details.error_code: anthropic-sdk-go's Error.ErrorCode reads it).
		type innerDetails struct {
			ErrorCode string `json:"error_code"`
		}
		type inner struct {
			Type    string       `json:"type"`
			Message string       `json:"message"`
			Details innerDetails `json:"details"`
		}
		body, _ = json.Marshal(struct {
			Type    string         `json:"type"`
			Error   inner          `json:"error"`
			Code    string         `json:"code"`
			Details map[string]any `json:"details,omitempty"`
		}{"error", inner{anthropicErrorType(e), e.Message, innerDetails{e.Code}}, e.Code, e.Details})
	default:
		body, _ = json.Marshal(struct {
			Success bool      `json:"success"`
			Error   *apiError `json:"error"`
		}{false, e})
	}
	w.WriteHeader(e.status)
	_, _ = w.Write(append(body, '\n'))
	return e
}

// anthropicErrorType is the error.type Anthropic's API gives an error of e's status
// (Anthropic's SDKs choose what to do by the status: they retry 408, 409, 429 and every 5xx,
// and surface the rest as an *anthropic.Error with its StatusCode). The gateway's 503s
// (no backend, the store) keep their status: the SDKs retry them as they would a 529.
func anthropicErrorType(e *apiError) string {
	switch {
	case e.status == http.StatusUnauthorized:
		return "authentication_error"
	case e.status == http.StatusPaymentRequired:
		return "billing_error"
	case e.status == http.StatusForbidden:
		return "permission_error"
	case e.status == http.StatusNotFound:
		return "not_found_error"
	case e.status == http.StatusRequestEntityTooLarge:
		return "request_too_large"
	case e.status == http.StatusTooManyRequests:
		return "rate_limit_error"
	case e.Code == "no_backend_available", e.status == 529:
		return "overloaded_error"
	case e.status == http.StatusGatewayTimeout:
		return "timeout_error"
	case e.status >= 500:
		return "api_error"
	default:
		return "invalid_request_error"
	}
}

// errorShape is the JSON error body a family of clients reads.
type errorShape int

const (
	// shapeOpenAI: {"success": false, "error": {"code", "type", "message", "param", "details"}}
	// (OpenAI SDKs read error.message; the generic seed's clients read success).
	shapeOpenAI errorShape = iota
	// shapeOllama: {"error": "<message>", "code", "details"}: Ollama clients read error as a
	// string (ollama-js shows an object as "[object Object]").
	shapeOllama
	// shapeAnthropic: {"type": "error", "error": {"type", "message", "details": {"error_code"}},
	// "code", "details"}: error.type is Anthropic's for the status (anthropicErrorType).
	shapeAnthropic
)

// errorShapeOf is the error shape of a request path: its surface's (routing.Surfaces), else
// Ollama's on /api/*, Anthropic's on /v1/messages*, OpenAI's elsewhere (the admin API included).
func errorShapeOf(path string) errorShape {
	if f, ok := routing.SurfaceAt(path); ok {
		switch f.Surface().Errors {
		case routing.ErrorsOllama:
			return shapeOllama
		case routing.ErrorsAnthropic:
			return shapeAnthropic
		default:
			return shapeOpenAI
		}
	}
	switch {
	case strings.HasPrefix(path, "/api/"):
		return shapeOllama
	case path == "/v1/messages" || strings.HasPrefix(path, "/v1/messages/"):
		return shapeAnthropic
	default:
		return shapeOpenAI
	}
}
