// Package posthog talks to a PostHog instance: it fetches flag definitions from
// /flags/definitions with ETag revalidation, and polls them with jitter and
// exponential back-off. It knows HTTP and PostHog's status codes; what to do with
// definitions (parse, install, persist) is the caller's.
package posthog
