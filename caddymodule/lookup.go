package caddymodule

import (
	"net/http"
	"sync"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// implicitHandler evaluates for matchers and selection policies on sites that do
// not use the feature_flags directive: default identity chain, no assigned
// cookie, no properties, every flag. It is set up on first use.
type implicitHandler struct {
	once    sync.Once
	handler *Handler
	err     error
}

func (a *App) implicitFlags() (*Handler, error) {
	a.implicit.once.Do(func() {
		off := false
		h := &Handler{AssignCookie: &off}
		a.implicit.err = h.setup(a, a.logger.Named("implicit"))
		a.implicit.handler = h
	})
	return a.implicit.handler, a.implicit.err
}

// requestFlags returns the request's flag state, evaluating it with the app's
// implicit handler when no feature_flags handler ran before.
func (a *App) requestFlags(r *http.Request) *requestState {
	if st := stateOf(r); st != nil {
		return st
	}
	h, err := a.implicitFlags()
	if err != nil {
		a.logger.Error("evaluating flags without a feature_flags handler", zap.Error(err))
		return nil
	}
	repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	if !ok {
		repl = caddy.NewReplacer()
	}
	return h.evaluate(r, repl, true)
}
