// Package flagsplit registers the flagsplit Caddy modules, so that
// `xcaddy build --with github.com/flagsplit/flagsplit` builds Caddy with them.
// The code lives in the subpackages: eval (PostHog-exact flag evaluation),
// proxy (request-level logic) and caddymodule (the Caddy glue).
package flagsplit

import (
	// Register the Caddy modules, Caddyfile directives and CLI commands.
	_ "github.com/flagsplit/flagsplit/caddymodule"
)
