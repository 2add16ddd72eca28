package eval

import (
	"errors"
	"fmt"
	"math"
	"sort"
)

// Override is a runtime change to one flag, set by an operator (kill switch,
// rollout cap, forced variant). It takes precedence over the definition.
type Override struct {
	// Killed forces the flag to false for everyone.
	Killed bool `json:"killed,omitempty"`
	// RolloutPercentage caps every matching condition at min(its own
	// percentage, this), with PostHog's own rollout hash, so a user in at 5 %
	// stays in at 25 %.
	RolloutPercentage *float64 `json:"rollout_percentage,omitempty"`
	// Variant forces the flag's value for everyone: a variant key of a
	// multivariate flag, or "true"/"false" for a boolean flag.
	Variant string `json:"variant,omitempty"`
}

// IsZero reports whether the override changes nothing.
func (o Override) IsZero() bool {
	return !o.Killed && o.RolloutPercentage == nil && o.Variant == ""
}

// Validate checks the override against the flag it is for (nil when the flag is
// not known).
func (o Override) Validate(f *Flag) error {
	if o.IsZero() {
		return errors.New("override sets nothing: give killed, rollout_percentage or variant")
	}
	if p := o.RolloutPercentage; p != nil && (math.IsNaN(*p) || *p < 0 || *p > 100) {
		return fmt.Errorf("rollout_percentage %v is outside 0..100", *p)
	}
	if o.Variant != "" && f != nil {
		if len(f.variants) == 0 {
			if o.Variant != "true" && o.Variant != "false" {
				return fmt.Errorf("flag %q is boolean: variant must be \"true\" or \"false\"", f.Key)
			}
		} else if !f.HasVariant(o.Variant) {
			return fmt.Errorf("flag %q has no variant %q (variants: %v)", f.Key, o.Variant, f.Variants())
		}
	}
	return nil
}

// WithOverrides returns definitions that evaluate like d with the overrides
// applied. d is not changed; compiled parts are shared. Overrides for flags d
// does not define are ignored.
func (d *Definitions) WithOverrides(overrides map[string]Override) *Definitions {
	if len(overrides) == 0 {
		return d
	}
	out := *d
	out.flags = make([]*Flag, len(d.flags))
	out.byKey = make(map[string]*Flag, len(d.byKey))
	for i, f := range d.flags {
		nf := f
		if o, ok := overrides[f.Key]; ok && !o.IsZero() {
			cp := *f
			ov := o
			cp.override = &ov
			nf = &cp
		}
		out.flags[i] = nf
		out.byKey[nf.Key] = nf
	}
	return &out
}

func sortProperties(p Properties) {
	sort.Slice(p, func(i, j int) bool { return p[i].Key < p[j].Key })
}
