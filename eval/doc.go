// Package eval evaluates PostHog feature flags locally, giving the answers
// PostHog's own SDKs and flags service give: the same SHA-1 bucketing hash, the
// same operators, cohorts, group flags, flag dependencies, device-id bucketing,
// multivariate variants and payloads.
//
// Parse compiles the body of PostHog's flag-definitions endpoint once (regexes,
// dates, semver ranges, variant tables, cohorts and dependency chains prepared up
// front); evaluation then reads the compiled form without allocating. A Store
// swaps definitions atomically, and a Cache keeps recent answers per subject,
// keyed by the definitions' generation so a swap invalidates it without a flush.
//
// Regex filters mean what python's re.search makes of them: RE2 runs every
// pattern it can express, and a backtracking engine, bounded by
// RegexMatchTimeout, runs the rest (look-arounds, back-references and the
// like; see Flag.BacktrackingRegexes).
//
// Where PostHog's implementations disagree, this package follows the decisions
// in the project's conformance vectors: numeric comparison when both sides are
// numbers, the flags service's string matching (full Unicode lower-casing for
// exact, ASCII for icontains and friends, a truthiness gate for boolean-like
// values), and posthog-python's answers everywhere else.
//
// A flag that cannot be decided locally (experience continuity, a static cohort,
// a missing property, an unknown operator, ...) is not an error: its Result has
// Enabled false and an inconclusive Reason saying why.
package eval
