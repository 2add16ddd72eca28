package posthog

import (
	"context"
	"math/rand/v2"
	"sync"
	"time"
)

// DefaultPollInterval is how often definitions are polled (posthog-python and
// posthog-node use 30 s). Each poll costs as much as ten /flags requests in
// PostHog's billing, which is why 304 answers matter.
const DefaultPollInterval = 30 * time.Second

// DefaultMaxBackoff caps the delay between attempts after failures.
const DefaultMaxBackoff = 5 * time.Minute

// Handlers receive what the poller learns. Each is optional.
type Handlers struct {
	// Definitions receives a new definitions body and its validator (""
	// when PostHog sent none: a 200 without an ETag clears the stored one,
	// as PostHog's SDKs do). An error means the body could not be used: the
	// last good definitions and their validator stay, and the attempt
	// counts as a failure.
	Definitions func(body []byte, etag string) error
	// NotModified is called on a 304, with the validator it came with.
	NotModified func(etag string)
	// QuotaLimited is called on a 402: drop the definitions (and their
	// validator).
	QuotaLimited func(detail string)
	// Unauthorized is called on a 401 or 403: the key is wrong. The last good
	// definitions should keep serving.
	Unauthorized func(status int, detail string)
	// Failure is called for every failed attempt with the number of
	// consecutive failures and the delay before the next one: transport
	// errors, answers to retry (*StatusError), 200s without usable
	// definitions (*DocumentError: no list of flags, over a limit), which
	// never reach Definitions, and errors Definitions returned.
	Failure func(err error, consecutive int, retryIn time.Duration)
}

// Poller fetches definitions periodically. It keeps no copy of the
// definitions' validator: Validator asks for the one of the definitions in
// force, which the consumer stores with them.
type Poller struct {
	Client   *Client
	Handlers Handlers
	// Validator returns the ETag to send as If-None-Match ("" or nil: none).
	Validator func() string
	// Interval between successful polls. Default: DefaultPollInterval.
	Interval time.Duration
	// MaxBackoff caps the back-off after failures. Default: DefaultMaxBackoff.
	MaxBackoff time.Duration

	mu          sync.Mutex // serialises fetches and guards the fields below
	consecutive int
	kick        chan struct{}
}

// Run polls until ctx is done. The first fetch happens at once.
func (p *Poller) Run(ctx context.Context) {
	p.mu.Lock()
	if p.kick == nil {
		p.kick = make(chan struct{}, 1)
	}
	kick := p.kick
	p.mu.Unlock()
	for {
		wait := p.poll(ctx)
		timer := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			timer.Stop()
			return
		case <-timer.C:
		case <-kick:
			timer.Stop()
		}
	}
}

// Refresh fetches now and reports the outcome. A running poller's schedule
// restarts from this fetch.
func (p *Poller) Refresh(ctx context.Context) (Outcome, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	outcome, err := p.fetchLocked(ctx)
	if p.kick != nil && err == nil {
		select {
		case p.kick <- struct{}{}:
		default:
		}
	}
	return outcome, err
}

// poll does one fetch and returns how long to wait before the next.
func (p *Poller) poll(ctx context.Context) time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, err := p.fetchLocked(ctx)
	if err == nil || ctx.Err() != nil {
		return jitter(p.interval())
	}
	return p.backoff()
}

func (p *Poller) fetchLocked(ctx context.Context) (Outcome, error) {
	etag := ""
	if p.Validator != nil {
		etag = p.Validator()
	}
	resp, err := p.Client.FetchDefinitions(ctx, etag)
	if err == nil && resp.Outcome == Modified && p.Handlers.Definitions != nil {
		err = p.Handlers.Definitions(resp.Body, resp.ETag)
	}
	if err != nil {
		if ctx.Err() == nil {
			p.consecutive++
			if p.Handlers.Failure != nil {
				p.Handlers.Failure(err, p.consecutive, p.backoff())
			}
		}
		return 0, err
	}
	p.consecutive = 0
	switch resp.Outcome {
	case NotModified:
		if p.Handlers.NotModified != nil {
			p.Handlers.NotModified(resp.ETag)
		}
	case QuotaLimited:
		if p.Handlers.QuotaLimited != nil {
			p.Handlers.QuotaLimited(resp.Detail)
		}
	case Unauthorized:
		if p.Handlers.Unauthorized != nil {
			p.Handlers.Unauthorized(resp.StatusCode, resp.Detail)
		}
	}
	return resp.Outcome, nil
}

func (p *Poller) interval() time.Duration {
	if p.Interval > 0 {
		return p.Interval
	}
	return DefaultPollInterval
}

// backoff is interval * 2^(failures-1), capped, with jitter.
func (p *Poller) backoff() time.Duration {
	limit := p.MaxBackoff
	if limit <= 0 {
		limit = DefaultMaxBackoff
	}
	d := p.interval()
	for i := 1; i < p.consecutive && d < limit; i++ {
		d *= 2
	}
	if d > limit {
		d = limit
	}
	return jitter(d)
}

// jitter spreads d by ±10 % so that many proxies do not poll in step.
func jitter(d time.Duration) time.Duration {
	spread := int64(d) / 10
	if spread <= 0 {
		return d
	}
	return d - time.Duration(spread) + time.Duration(rand.Int64N(2*spread+1))
}
