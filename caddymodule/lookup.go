package caddymodule

import (
	"net/http"
	"sync"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// implicitHandler evaluates for matchers and selection policies on sites that do
// not use the feature_flags directive: default identity chain, no assigned
// cookie, no properties, every flag.
type implicitHandler struct {
	once    sync.Once
	handler *Handler
	err     error
}

func (a *App) implicit() (*Handler, error) {
	a.implicitOnce.once.Do(func() {
		off := false
		h := &Handler{AssignCookie: &off}
		a.implicitOnce.err = h.setup(a, a.logger.Named("implicit"))
		a.implicitOnce.handler = h
	})
	return a.implicitOnce.handler, a.implicitOnce.err
}

// requestFlags returns the request's flag state, evaluating it with the app's
// implicit handler when no feature_flags handler ran before.
func (a *App) requestFlags(r *http.Request) *requestState {
	if st := stateOf(r); st != nil {
		return st
	}
	h, err := a.implicit()
	if err != nil {
		a.logger.Error("evaluating flags without a feature_flags handler", zap.Error(err))
		return nil
	}
	repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	if !ok {
		repl = caddy.NewReplacer()
	}
	return h.evaluate(r, repl, false)
}
