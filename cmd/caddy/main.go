// Command caddy is Caddy with its standard modules, the LLM gateway and its mock model backend.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-llm-gateway/caddy-llm-gateway/caddymodule"
	_ "github.com/caddy-llm-gateway/caddy-llm-gateway/caddymodule/mockbackend"
)

func main() {
	caddycmd.Main()
}
