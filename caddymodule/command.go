package caddymodule

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"

	"github.com/caddy-llm-gateway/caddy-llm-gateway/policies/credits"
	"github.com/caddy-llm-gateway/caddy-llm-gateway/store/transfer"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "llm-gateway",
		Usage: "<users|credits|ledger|keys|apps|signing-keys|backends|migrate-store> ...",
		Short: "Manages the LLM gateway's users, credits and API keys on a running instance",
		Long: `
Manages the LLM gateway of a running Caddy through its admin API (default localhost:2019):

  caddy llm-gateway users create --email a@example.com [--credits 10] [--password P] [--tier T]
  caddy llm-gateway users get <user id>
  caddy llm-gateway credits add <user id> <amount> [--reason R] [--idempotency-key K]
  caddy llm-gateway ledger <user id>
  caddy llm-gateway keys create <user id> [--name N] [--scopes chat:write,models:read] [--expires-in-days D]
        [--allowed-ips 10.0.0.0/8,2001:db8::/32] [--credit-cap C [--credit-cap-period day|month|<duration>]]
  caddy llm-gateway keys list <user id>
  caddy llm-gateway keys rotate <key id> [--grace-hours H]
  caddy llm-gateway keys revoke <key id>
  caddy llm-gateway apps create --name N [--redirect-uri URI]... [--first-party] [--scopes S,S] [--confidential]
  caddy llm-gateway apps list
  caddy llm-gateway signing-keys rotate
  caddy llm-gateway backends
  caddy llm-gateway migrate-store --from <sqlite file> --to <postgres dsn | {env.X}>

Answers are printed as JSON. migrate-store works offline, on the files themselves: it copies a
stopped embedded store into an empty PostgreSQL database and prints what it copied. A new API key (or app client secret) is printed once: store it.`,
		CobraFunc: gatewayCommand,
	})
}

// gatewayCommand builds the llm-gateway verbs.
func gatewayCommand(cmd *cobra.Command) {
	var admin string
	cmd.PersistentFlags().StringVar(&admin, "address", "localhost:2019", "the admin API address of the running instance")
	call := func(method, path string, body any, header map[string]string) error {
		return adminCall(cmd.OutOrStdout(), admin, method, path, body, header)
	}

	users := &cobra.Command{Use: "users", Short: "Creates and shows users"}
	var email, password, tier, amount string
	create := &cobra.Command{Use: "create", Short: "Creates a user", Args: cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			body := map[string]any{"email": email}
			if password != "" {
				body["password"] = password
			}
			if tier != "" {
				body["tier"] = tier
			}
			if amount != "" {
				body["credits"] = json.Number(amount)
			}
			return call(http.MethodPost, "/llm_gateway/users", body, nil)
		}}
	create.Flags().StringVar(&email, "email", "", "the user's e-mail address (required)")
	create.Flags().StringVar(&password, "password", "", "a password for signing in")
	create.Flags().StringVar(&tier, "tier", "", "the user's rate-limit tier")
	create.Flags().StringVar(&amount, "credits", "", "initial credits")
	_ = create.MarkFlagRequired("email")
	users.AddCommand(create, &cobra.Command{Use: "get <user id>", Short: "Shows a user and its balance", Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			return call(http.MethodGet, "/llm_gateway/users/"+pathSegment(args[0]), nil, nil)
		}})

	creditsCmd := &cobra.Command{Use: "credits", Short: "Adds or takes away credits"}
	var reason, idem string
	add := &cobra.Command{Use: "add <user id> <amount>", Short: "Adds credits (a negative amount takes away)", Args: cobra.ExactArgs(2),
		RunE: func(_ *cobra.Command, args []string) error {
			h := map[string]string{}
			if idem != "" {
				h["Idempotency-Key"] = idem
			}
			return call(http.MethodPost, "/llm_gateway/users/"+pathSegment(args[0])+"/credits",
				map[string]any{"amount": json.Number(args[1]), "reason": reason}, h)
		}}
	add.Flags().StringVar(&reason, "reason", "", "why (kept in the ledger)")
	add.Flags().StringVar(&idem, "idempotency-key", "", "the same key never credits twice")
	creditsCmd.AddCommand(add)

	ledger := &cobra.Command{Use: "ledger <user id>", Short: "Shows a user's newest ledger entries", Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			return call(http.MethodGet, "/llm_gateway/users/"+pathSegment(args[0])+"/ledger", nil, nil)
		}}

	keys := &cobra.Command{Use: "keys", Short: "Creates, lists, rotates and revokes API keys"}
	var name, scopes, allowedIPs, capAmount, capPeriod string
	var days int
	kcreate := &cobra.Command{Use: "create <user id>", Short: "Creates an API key and prints it once", Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			body := map[string]any{"name": name}
			if scopes != "" {
				body["scopes"] = strings.Split(scopes, ",")
			}
			if days > 0 {
				body["expires_in_days"] = days
			}
			if allowedIPs != "" {
				body["allowed_ips"] = strings.Split(allowedIPs, ",")
			}
			if capAmount != "" {
				c, err := credits.ParseAmount(capAmount)
				if err != nil {
					return fmt.Errorf("--credit-cap: %w", err)
				}
				body["credit_cap"] = c
			}
			if capPeriod != "" {
				body["credit_cap_period"] = capPeriod
			}
			return call(http.MethodPost, "/llm_gateway/users/"+pathSegment(args[0])+"/keys", body, nil)
		}}
	kcreate.Flags().StringVar(&name, "name", "", "a name for the key")
	kcreate.Flags().StringVar(&scopes, "scopes", "", "comma-separated scopes (default: inference, models, credits and usage)")
	kcreate.Flags().IntVar(&days, "expires-in-days", 0, "days until the key expires (default: never)")
	kcreate.Flags().StringVar(&allowedIPs, "allowed-ips", "", "comma-separated addresses or CIDR prefixes the key may be used from (default: any)")
	kcreate.Flags().StringVar(&capAmount, "credit-cap", "", "the most credits the key may spend (default: no cap)")
	kcreate.Flags().StringVar(&capPeriod, "credit-cap-period", "", `the cap's period: "day", "month" or a duration (default: the key's life)`)
	var graceHours float64
	krotate := &cobra.Command{Use: "rotate <key id>", Short: "Replaces a key by a new one, printed once; the old one works until the grace period ends",
		Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			return call(http.MethodPost, "/llm_gateway/keys/"+pathSegment(args[0])+"/rotate",
				map[string]any{"grace_period_hours": graceHours}, nil)
		}}
	krotate.Flags().Float64Var(&graceHours, "grace-hours", 24, "hours the old key keeps working")
	keys.AddCommand(kcreate,
		&cobra.Command{Use: "list <user id>", Short: "Lists a user's keys (never the secrets)", Args: cobra.ExactArgs(1),
			RunE: func(_ *cobra.Command, args []string) error {
				return call(http.MethodGet, "/llm_gateway/users/"+pathSegment(args[0])+"/keys", nil, nil)
			}},
		krotate,
		&cobra.Command{Use: "revoke <key id>", Short: "Revokes a key at once", Args: cobra.ExactArgs(1),
			RunE: func(_ *cobra.Command, args []string) error {
				return call(http.MethodDelete, "/llm_gateway/keys/"+pathSegment(args[0]), nil, nil)
			}})

	backends := &cobra.Command{Use: "backends", Short: "Shows the backends, their models, prices and health", Args: cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error { return call(http.MethodGet, "/llm_gateway/backends", nil, nil) }}

	apps := &cobra.Command{Use: "apps", Short: "Registers and lists OAuth apps"}
	var appName, appScopes string
	var redirectURIs []string
	var firstParty, confidential bool
	acreate := &cobra.Command{Use: "create", Short: "Registers an OAuth app (a confidential app's secret is printed once)", Args: cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			body := map[string]any{"name": appName, "redirect_uris": redirectURIs, "first_party": firstParty,
				"confidential": confidential}
			if redirectURIs == nil {
				body["redirect_uris"] = []string{}
			}
			if appScopes != "" {
				body["scopes"] = strings.Split(appScopes, ",")
			}
			return call(http.MethodPost, "/llm_gateway/apps", body, nil)
		}}
	acreate.Flags().StringVar(&appName, "name", "", "the app's name, shown on the consent page (required)")
	acreate.Flags().StringArrayVar(&redirectURIs, "redirect-uri", nil, "a redirect URI, matched exactly (repeat for several)")
	acreate.Flags().BoolVar(&firstParty, "first-party", false, "the operator's own app: may use the password grant")
	acreate.Flags().StringVar(&appScopes, "scopes", "", "comma-separated scopes the app may ask for (default: inference, models, credits and usage)")
	acreate.Flags().BoolVar(&confidential, "confidential", false, "a server-side app with a client secret")
	_ = acreate.MarkFlagRequired("name")
	apps.AddCommand(acreate, &cobra.Command{Use: "list", Short: "Lists the registered apps", Args: cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error { return call(http.MethodGet, "/llm_gateway/apps", nil, nil) }})

	signingKeys := &cobra.Command{Use: "signing-keys", Short: "Rotates the JWT signing key"}
	signingKeys.AddCommand(&cobra.Command{Use: "rotate", Short: "Makes a new signing key; the previous one stays published until the next rotation",
		Args: cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			return call(http.MethodPost, "/llm_gateway/signing_keys/rotate", nil, nil)
		}})

	var from, to string
	migrateStore := &cobra.Command{Use: "migrate-store --from <sqlite file> --to <postgres dsn>",
		Short: "Copies a stopped embedded store into an empty PostgreSQL database (offline: no admin API)",
		Args:  cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			// The DSN may hold a password: it is never printed, and Copy's errors never hold it.
			dsn := caddy.NewReplacer().ReplaceKnown(to, "")
			sum, err := transfer.Copy(c.Context(), from, dsn)
			if len(sum.Tables) > 0 {
				out, merr := json.MarshalIndent(sum, "", "  ")
				if merr != nil {
					return merr
				}
				fmt.Fprintf(c.OutOrStdout(), "%s\n", out)
			}
			return err
		}}
	migrateStore.Flags().StringVar(&from, "from", "", "the embedded store's file (the gateway using it must be stopped)")
	migrateStore.Flags().StringVar(&to, "to", "", `the PostgreSQL database, a URL or key=value DSN; "{env.X}" reads it from the environment`)
	_ = migrateStore.MarkFlagRequired("from")
	_ = migrateStore.MarkFlagRequired("to")

	cmd.AddCommand(users, creditsCmd, ledger, keys, apps, signingKeys, backends, migrateStore)
}

// pathSegment keeps an argument inside one path segment.
func pathSegment(s string) string {
	return strings.NewReplacer("/", "%2F", "?", "%3F", "#", "%23").Replace(s)
}

// adminCall sends one request to the admin API and prints the answer.
func adminCall(out io.Writer, addr, method, path string, body any, header map[string]string) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	if !strings.Contains(addr, "://") {
		addr = "http://" + addr
	}
	req, err := http.NewRequest(method, strings.TrimSuffix(addr, "/")+path, rd)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	for k, v := range header {
		req.Header.Set(k, v)
	}
	client := &http.Client{Timeout: 30 * time.Second}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("calling the admin API at %s: %w", addr, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if err != nil {
		return err
	}
	_, _ = out.Write(b)
	if resp.StatusCode >= 300 {
		fmt.Fprintf(os.Stderr, "%s %s: %s\n", method, path, resp.Status)
		return fmt.Errorf("the admin API answered %s", resp.Status)
	}
	return nil
}
