package caddymodule

import (
	"errors"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// Collectors are created once and registered into every config's registry, so
// their values carry over config reloads (Caddy builds a new registry per load).
const (
	metricsNamespace = "caddy"
	metricsSubsystem = "feature_flags"
)

var (
	evaluationsTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "evaluations_total",
		Help: "Flag evaluations by flag and value (true, false or the variant).",
	}, []string{"flag", "value"})

	inconclusiveTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "inconclusive_total",
		Help: "Evaluations that could not be decided locally and served the default, by flag and reason.",
	}, []string{"flag", "reason"})

	requestsTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "requests_total",
		Help: "Requests routed by a flag, by flag, variant, upstream and status class.",
	}, []string{"flag", "variant", "upstream", "code_class"})

	requestDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "request_duration_seconds",
		Help:    "Time to handle requests routed by a flag, by flag and variant.",
		Buckets: prometheus.DefBuckets,
	}, []string{"flag", "variant"})

	definitionsLastSuccess = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "definitions_last_success_timestamp_seconds",
		Help: "When flag definitions were last loaded successfully (Unix time).",
	})

	definitionsErrors = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "definitions_errors_total",
		Help: "Failed attempts to load flag definitions (unreadable or malformed files, failed fetches).",
	})

	definitionsReady = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "definitions_ready",
		Help: "1 once flag definitions are in force (from PostHog, the stored copy or the file), 0 before.",
	})

	overridesActive = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "overrides",
		Help: "Number of flags with a runtime override (kill switch, rollout cap or forced variant).",
	})

	definitionsFlags = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "definitions_flags",
		Help: "Number of flags in the definitions in force.",
	})

	identityTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "identity_total",
		Help: "Requests by where their distinct id came from (header, posthog_cookie, cookie, placeholder, assigned, none).",
	}, []string{"source"})

	eventsSent = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "events_sent_total",
		Help: "Exposure events ($feature_flag_called) delivered to PostHog.",
	})

	eventsDropped = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "events_dropped_total",
		Help: "Exposure events given up: queue full, refused by PostHog, or retries exhausted.",
	})

	malformedIdentityTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "malformed_identity_total",
		Help: "Identity sources present but malformed (ignored), by source.",
	}, []string{"source"})
)

var (
	rolloutPercentage = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "rollout_percentage",
		Help: "Percentage a rollout currently lets through to the new side (0 once rolled back or aborted; for a dry run, what it would let through).",
	}, []string{"flag"})

	fallbacksTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "fallbacks_total",
		Help: "Requests a selection policy could not send where their flag value routes (that upstream was unavailable); they were served the default upstream, or none, and count as false.",
	}, []string{"flag", "value"})

	storageDamaged = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "storage_damaged_total",
		Help: "Damaged copies of shared documents found in storage (once per damaged content), by document (overrides, rollouts, activity).",
	}, []string{"document"})

	rollbacksTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "rollbacks_total",
		Help: "Rollouts rolled back by a guardrail, by flag and guardrail.",
	}, []string{"flag", "guardrail"})
)

var (
	postHogFlagsRequests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "posthog_flags_requests_total",
		Help: "posthog-js flags requests seen by posthog_flags, by endpoint (flags, decide) and answer (local, filled, fill_failed, inconclusive, passed, invalid).",
	}, []string{"endpoint", "answer"})

	postHogFlagsAnswers = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "posthog_flags_answers_total",
		Help: "Flag answers posthog_flags served, by source: local (decided at the edge), posthog (filled in from PostHog), inconclusive (served false).",
	}, []string{"source"})

	rolloutDryRun = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "rollout_dry_run",
		Help: "1 for a rollout that runs as a dry run (judged and reported, not enforced), 0 otherwise.",
	}, []string{"flag"})

	rolloutSampleRatioMismatch = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "rollout_sample_ratio_mismatch",
		Help: "1 while a rollout's sample-ratio check finds the split of users between the sides unlike the configured one (the ramp holds), 0 otherwise.",
	}, []string{"flag"})

	breachesTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "rollout_breaches_total",
		Help: "Guardrail breaches and sample-ratio mismatches (guardrail sample_ratio) of rollouts, by flag, guardrail, what the ramp did (rolled_back or held) and whether it was a dry run.",
	}, []string{"flag", "guardrail", "action", "dry_run"})
)

var collectors = []prometheus.Collector{
	evaluationsTotal, inconclusiveTotal, requestsTotal, requestDuration,
	definitionsLastSuccess, definitionsErrors, definitionsFlags, definitionsReady, overridesActive,
	identityTotal, malformedIdentityTotal, eventsSent, eventsDropped,
	rolloutPercentage, rollbacksTotal, fallbacksTotal,
	storageDamaged, postHogFlagsRequests, postHogFlagsAnswers,
	rolloutDryRun, rolloutSampleRatioMismatch, breachesTotal,
}

// registerMetrics adds the collectors to this config's registry.
func registerMetrics(ctx caddy.Context) {
	reg := ctx.GetMetricsRegistry()
	if reg == nil {
		return
	}
	for _, c := range collectors {
		if err := reg.Register(c); err != nil {
			var already prometheus.AlreadyRegisteredError
			if !errors.As(err, &already) {
				ctx.Logger().Warn("registering metric", zap.Error(err))
			}
		}
	}
}
