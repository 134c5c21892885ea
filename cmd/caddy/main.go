// Command caddy is Caddy with its standard modules, the LLM gateway, its mock model backend and
// its demo chat app.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-llm-gateway/caddy-llm-gateway/caddymodule"
	_ "github.com/caddy-llm-gateway/caddy-llm-gateway/caddymodule/demoapp"
	_ "github.com/caddy-llm-gateway/caddy-llm-gateway/caddymodule/mockbackend"
)

func main() {
	caddycmd.Main()
}
