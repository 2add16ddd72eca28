// Package proxy holds flagsplit's request-level logic, free of Caddy types: who a
// request is (the distinct id from a trusted header, the posthog-js cookie, another
// cookie, or one assigned and set in posthog-js's format), which headers the
// upstream sees (client-sent copies of flagsplit's headers removed, the evaluated
// ones added), which upstream a flag value routes to, and counts of what each
// variant's requests returned.
package proxy
