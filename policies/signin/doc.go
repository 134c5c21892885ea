// Package signin is the gateway's sign-in policy, without knowing about Caddy: the checks and
// tokens behind its OAuth 2.0 server (RFC 6749 with PKCE, RFC 7636), the Peerwave fragment
// flow (API.md §7) and the JWTs it issues and accepts (RFC 7519, RFC 8725, RFC 9068).
//
// The pieces:
//
//   - Opaque tokens (NewToken, HashToken): session cookies, authorization codes, refresh tokens,
//     client ids and secrets are 256 random bits behind a short prefix; only their SHA-256 is
//     stored. Successor derives the token a refresh token is rotated to, so that two concurrent
//     refreshes of one token are answered with the same successor. CSRFToken and CheckCSRF bind
//     a form to a session.
//   - PKCE (CheckChallenge, VerifyPKCE): S256 only; "plain" and a missing challenge are refused.
//   - Redirects (ReturnPolicy, MatchRedirectURI, ValidRedirectURI): an OAuth redirect_uri must
//     equal a registered one byte for byte (RFC 9700 §4.1.3); the fragment flow's return URL
//     must be in canonical form and come from an allowed origin. Anything else is refused, and
//     the caller must then answer with an error page, never a redirect (RFC 6749 §4.1.2.1).
//   - The gateway's own JWTs (Keyset, Verifier): Ed25519 ("EdDSA") only, with a key id naming
//     one key of the set and a "typ" telling an access token from a fragment token.
//   - An external issuer's JWTs (ExternalIssuer): verified with keys fetched from its JWKS URL,
//     with an algorithm allowlist; nothing in a token's header is ever fetched or opened.
//
// The store of sign-in state is the Store interface; the single-use steps (redeeming a code,
// rotating a refresh token) are atomic there.
//
// Nothing here ever puts a secret (a token, code, key or password) into an error, and every
// input from the network is bounded in length before work proportional to it is done.
package signin
