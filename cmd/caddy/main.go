// Command caddy is Caddy with the flagsplit plugin and Caddy's standard modules,
// built from this repository's go.mod (development, tests and benchmarks; end
// users build with xcaddy.sh).
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/flagsplit/flagsplit/caddymodule"
)

func main() {
	caddycmd.Main()
}
