// Package identity answers "who is calling?" for the gateway without knowing about Caddy.
//
// It reads the one credential a request may carry (CredentialFrom), checks the shape of the
// gateway's API keys before any store is asked (ParseKey), keys anonymous callers by their
// client address (AnonymousKey, IPv6 by /64), and names the scopes a credential can grant
// (HasScope, ParseScopes). The stores of users and keys are the Users and Keys interfaces.
//
// Nothing here ever puts a secret into an error, and every input from the network is bounded
// in length before any work proportional to it is done.
package identity
