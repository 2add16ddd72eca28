package eval

import (
	"time"
	"unicode/utf8"
)

// parseRelativeDate reads PostHog's relative date filter values the way
// posthog-python's relative_date_parse_for_feature_flag_matching does: the
// whole value matches ^-?[0-9]+[a-z]$ (python's $ also matches before one
// final newline), the number is below 10000 and the letter is a unit (h, d,
// w, m, y). Both "-7d" and "7d" mean seven days ago. Anything else is not a
// relative date and is parsed as an absolute one.
func parseRelativeDate(s string) (n int, unit byte, ok bool) {
	if len(s) > 0 && s[len(s)-1] == '\n' {
		s = s[:len(s)-1]
	}
	if len(s) > 0 && s[0] == '-' {
		s = s[1:]
	}
	if len(s) < 2 {
		return 0, 0, false
	}
	unit = s[len(s)-1]
	switch unit {
	case 'h', 'd', 'w', 'm', 'y':
	default:
		return 0, 0, false
	}
	digits := s[:len(s)-1]
	for i := 0; i < len(digits); i++ {
		c := digits[i]
		if c < '0' || c > '9' {
			return 0, 0, false
		}
		n = n*10 + int(c-'0')
		if n >= 10000 {
			return 0, 0, false
		}
	}
	return n, unit, true
}

// subtractRelative moves now back by n units. Months and years are calendar
// arithmetic that clamps to the end of a shorter month (31 March minus one
// month is 28 or 29 February), as posthog-python does. ok is false when the
// result leaves python's years 1-9999, where posthog-python gives up on the
// relative date and the filter is inconclusive.
func subtractRelative(now time.Time, n int, unit byte) (time.Time, bool) {
	var t time.Time
	switch unit {
	case 'h':
		t = now.Add(-time.Duration(n) * time.Hour)
	case 'd':
		t = now.Add(-time.Duration(n) * 24 * time.Hour)
	case 'w':
		t = now.Add(-time.Duration(n) * 7 * 24 * time.Hour)
	case 'm':
		t = addMonthsClamped(now, -n)
	case 'y':
		t = addMonthsClamped(now, -12*n)
	default:
		return now, false
	}
	return t, t.Year() >= 1 && t.Year() <= 9999
}

func addMonthsClamped(t time.Time, months int) time.Time {
	y, m, d := t.Date()
	total := y*12 + int(m-1) + months
	ny := floorDiv(total, 12)
	nm := time.Month(total-ny*12) + 1
	if last := daysIn(ny, nm); d > last {
		d = last
	}
	hh, mm, ss := t.Clock()
	return time.Date(ny, nm, d, hh, mm, ss, t.Nanosecond(), t.Location())
}

func floorDiv(a, b int) int {
	q := a / b
	if (a%b != 0) && ((a < 0) != (b < 0)) {
		q--
	}
	return q
}

func daysIn(year int, month time.Month) int {
	return time.Date(year, month+1, 0, 0, 0, 0, 0, time.UTC).Day()
}

// parseDate parses an absolute date exactly as posthog-python's
// parse_datetime does, no more (ruling of 2026-12-02):
//
//   - strip white space (python's str.strip);
//   - a trailing upper-case "Z", or " UTC" in any case, becomes "+00:00";
//   - otherwise four decimal digits alone are a year, with today's month and
//     day (python builds datetime(year, month, day), which fails on 29
//     February of a common year);
//   - a space before a trailing ±HH:MM is dropped;
//   - the rest is Python 3.11's datetime.fromisoformat (see fromISOFormat).
//
// So "2024-01-01", "20240101", "2024-W01-1", "2024-01-01T10:00:00.5+05:30"
// and "2024-01-01 10:00 UTC" parse; "21/08/2025", "2026-07", a lower-case
// "z" or "May 1, 2022" do not. A value without an offset is UTC, as
// posthog-python makes naive datetimes aware. usesNow reports that today's
// date filled in the month and day.
func parseDate(s string, now time.Time) (t time.Time, usesNow bool, ok bool) {
	s = trimSpace(s)
	text := isoText{a: s}
	switch {
	case len(s) > 0 && s[len(s)-1] == 'Z':
		text = isoText{a: s[:len(s)-1], tail: "+00:00"}
	case len(s) >= 4 && s[len(s)-4] == ' ' && asciiEqualFold(s[len(s)-3:], "utc"):
		// python tests text.upper().endswith(" UTC"); only ASCII letters
		// upper-case to U, T and C in that position.
		text = isoText{a: s[:len(s)-4], tail: "+00:00"}
	default:
		if year, ok := fourDigitYear(s); ok {
			// datetime(int(text), now.month, now.day)
			if year < 1 || now.Day() > daysIn(year, now.Month()) {
				return time.Time{}, true, false
			}
			return time.Date(year, now.Month(), now.Day(), 0, 0, 0, 0, time.UTC), true, true
		}
	}
	text.dropSpaceBeforeOffset()
	t, ok = fromISOFormat(&text)
	return t, false, ok
}

// fourDigitYear reports whether s is exactly four decimal digits (python's
// re.fullmatch(r"\d{4}"), where \d is any Unicode decimal digit) and returns
// their value.
func fourDigitYear(s string) (int, bool) {
	if len(s) == 4 {
		y := 0
		for i := 0; i < 4; i++ {
			if s[i] < '0' || s[i] > '9' {
				return 0, false
			}
			y = y*10 + int(s[i]-'0')
		}
		return y, true
	}
	if len(s) > 16 || utf8.RuneCountInString(s) != 4 {
		return 0, false
	}
	y := 0
	for _, r := range s {
		d, ok := pyDecimalValue(r)
		if !ok {
			return 0, false
		}
		y = y*10 + int(d)
	}
	return y, true
}

// isoText is the string parse_datetime hands to fromisoformat, built without
// allocating: a, less one byte when drop is set, then tail.
type isoText struct {
	a    string
	drop int // 1 + the index in a of the byte left out; 0 for none
	tail string
}

func (t *isoText) len() int {
	if t.drop > 0 {
		return len(t.a) - 1 + len(t.tail)
	}
	return len(t.a) + len(t.tail)
}

// at returns the byte at i, or 0 past the end: fromisoformat reads the NUL
// that ends a C string, and an embedded NUL ends it early the same way.
func (t *isoText) at(i int) byte {
	if i < 0 {
		return 0
	}
	if t.drop > 0 && i >= t.drop-1 {
		i++
	}
	if i < len(t.a) {
		return t.a[i]
	}
	i -= len(t.a)
	if i < len(t.tail) {
		return t.tail[i]
	}
	return 0
}

// dropSpaceBeforeOffset is parse_datetime's
// re.sub(r" ([+-]\d{2}:\d{2})$", r"\1", text). Only ASCII digits matter: an
// offset spelled with other digits fails fromisoformat with or without the
// space.
func (t *isoText) dropSpaceBeforeOffset() {
	t.drop = 0
	n := t.len()
	if n < 7 {
		return
	}
	if t.at(n-7) != ' ' || (t.at(n-6) != '+' && t.at(n-6) != '-') || t.at(n-3) != ':' ||
		!isDigit(t.at(n-5)) || !isDigit(t.at(n-4)) || !isDigit(t.at(n-2)) || !isDigit(t.at(n-1)) {
		return
	}
	// The space is in a: the tail is at most "+00:00", six bytes.
	t.drop = n - 7 + 1
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

// digits reads n ASCII digits at i (parse_digits).
func (t *isoText) digits(i, n int) (int, bool) {
	v := 0
	for k := 0; k < n; k++ {
		c := t.at(i + k)
		if !isDigit(c) {
			return 0, false
		}
		v = v*10 + int(c-'0')
	}
	return v, true
}

// fromISOFormat is CPython 3.11's C datetime.fromisoformat
// (Modules/_datetimemodule.c), ported check for check over the UTF-8 bytes it
// reads: at least 7 characters; a date in one of the forms YYYY-MM-DD,
// YYYYMMDD, YYYY-Www, YYYYWww, YYYY-Www-D, YYYYWwwD; then, after any one
// separator character, HH[:MM[:SS[.f…]]] or the same without colons (the
// fraction, after "." or ",", may follow any component and has any number of
// digits, truncated to microseconds); then nothing, "Z", or an offset
// ±HH[:MM[:SS[.f…]]] strictly inside ±24 h. Its quirks are kept: a character
// between the time and the offset is ignored, and so is a fraction of no
// digits before an offset. Field ranges are checked as the datetime
// constructor does.
func fromISOFormat(t *isoText) (time.Time, bool) {
	n := t.len()
	// _sanitize_isoformat_str: all valid strings have at least 7 characters.
	if n < 7 || t.runeCount() < 7 {
		return time.Time{}, false
	}
	sep := t.separator(n)
	if sep < 0 {
		return time.Time{}, false
	}
	year, month, day, ok := t.date(sep)
	if !ok {
		return time.Time{}, false
	}
	var hour, minute, second, usec, offset, offsetUsec int
	hasOffset := false
	if n > sep {
		// Skip the separator, one UTF-8 encoded character.
		p := sep + 1
		switch c := t.at(sep); {
		case c < 0x80:
		case c&0xf0 == 0xe0:
			p = sep + 3
		case c&0xf0 == 0xf0:
			p = sep + 4
		default:
			p = sep + 2
		}
		if hour, minute, second, usec, offset, offsetUsec, hasOffset, ok = t.timeOfDay(p, n); !ok {
			return time.Time{}, false
		}
	}
	if year < 1 || month < 1 || month > 12 || day < 1 || day > daysIn(year, time.Month(month)) ||
		hour > 23 || minute > 59 || second > 59 {
		return time.Time{}, false
	}
	if hasOffset && (offset >= 86400 || offset <= -86400) {
		// timezone() wants an offset strictly between -24 h and 24 h; the
		// microseconds share the sign, so whole seconds decide.
		return time.Time{}, false
	}
	d := time.Date(year, time.Month(month), day, hour, minute, second, usec*1000, time.UTC)
	if hasOffset {
		d = d.Add(-time.Duration(offset)*time.Second - time.Duration(offsetUsec)*time.Microsecond)
	}
	return d, true
}

func (t *isoText) runeCount() int {
	a := t.a
	if t.drop > 0 {
		return utf8.RuneCountInString(a) - 1 + len(t.tail)
	}
	return utf8.RuneCountInString(a) + len(t.tail)
}

// separator is _find_isoformat_datetime_separator: where the date ends.
func (t *isoText) separator(n int) int {
	if n == 7 {
		return 7
	}
	if t.at(4) == '-' {
		if t.at(5) != 'W' {
			return 10 // YYYY-MM-DD
		}
		if n > 8 && t.at(8) == '-' {
			if n == 9 {
				return -1
			}
			if n > 10 && isDigit(t.at(10)) {
				return 8 // YYYY-Www, then a "-" separator
			}
			return 10 // YYYY-Www-D
		}
		return 8 // YYYY-Www
	}
	if t.at(4) == 'W' {
		// YYYYWww or YYYYWwwD: count the digits from index 7.
		idx := 7
		for idx < n && isDigit(t.at(idx)) {
			idx++
		}
		if idx < 9 {
			return idx
		}
		if idx%2 == 0 {
			return 7
		}
		return 8
	}
	return 8 // YYYYMMDD
}

// date is parse_isoformat_date over the first sep bytes.
func (t *isoText) date(sep int) (year, month, day int, ok bool) {
	if year, ok = t.digits(0, 4); !ok {
		return 0, 0, 0, false
	}
	p := 4
	dashes := t.at(p) == '-'
	if dashes {
		p++
	}
	if t.at(p) == 'W' {
		p++
		week, ok := t.digits(p, 2)
		if !ok {
			return 0, 0, 0, false
		}
		p += 2
		weekday := 1
		if p < sep {
			if dashes {
				if t.at(p) != '-' {
					return 0, 0, 0, false
				}
				p++
			}
			if weekday, ok = t.digits(p, 1); !ok {
				return 0, 0, 0, false
			}
		}
		return isoWeekDate(year, week, weekday)
	}
	if month, ok = t.digits(p, 2); !ok {
		return 0, 0, 0, false
	}
	p += 2
	if dashes {
		if t.at(p) != '-' {
			return 0, 0, 0, false
		}
		p++
	}
	if day, ok = t.digits(p, 2); !ok {
		return 0, 0, 0, false
	}
	return year, month, day, true
}

// isoWeekDate is iso_to_ymd: the date of weekday 1-7 of ISO week 1-52 (53 in
// years that have one).
func isoWeekDate(year, week, weekday int) (int, int, int, bool) {
	if year < 1 || year > 9999 {
		return 0, 0, 0, false
	}
	jan1 := time.Date(year, 1, 1, 0, 0, 0, 0, time.UTC).Weekday() // Sunday = 0
	if week <= 0 || week >= 53 {
		leap := daysIn(year, time.February) == 29
		if week != 53 || !(jan1 == time.Thursday || (jan1 == time.Wednesday && leap)) {
			return 0, 0, 0, false
		}
	}
	if weekday <= 0 || weekday >= 8 {
		return 0, 0, 0, false
	}
	// Monday of week 1 is the Monday of the week holding 4 January.
	jan4 := time.Date(year, 1, 4, 0, 0, 0, 0, time.UTC)
	back := (int(jan4.Weekday()) + 6) % 7 // days since Monday
	d := jan4.AddDate(0, 0, -back+(week-1)*7+weekday-1)
	return d.Year(), int(d.Month()), d.Day(), true
}

// timeOfDay is parse_isoformat_time over bytes [p, end).
func (t *isoText) timeOfDay(p, end int) (hour, minute, second, usec, offset, offsetUsec int, hasOffset, ok bool) {
	tz := p
	for {
		if c := t.at(tz); c == 'Z' || c == '+' || c == '-' {
			break
		}
		tz++
		if tz >= end {
			break
		}
	}
	rv, hour, minute, second, usec := t.clock(p, tz)
	switch {
	case rv < 0:
		return
	case tz == end:
		// No offset: anything left over is an error.
		ok = rv == 0
		return
	}
	hasOffset = true
	if t.at(tz) == 'Z' {
		ok = t.at(tz+1) == 0
		return
	}
	sign := 1
	if t.at(tz) == '-' {
		sign = -1
	}
	rv, oh, om, os, ous := t.clock(tz+1, end)
	offset = sign * (oh*3600 + om*60 + os)
	offsetUsec = sign * ous
	ok = rv == 0
	return
}

// clock is parse_hh_mm_ss_ff over bytes [p, end): -1 on error, 1 when
// something follows, 0 at the end of the string.
func (t *isoText) clock(p, end int) (rv, hour, minute, second, usec int) {
	var vals [3]int
	hasSep := true
	for i := 0; i < 3; i++ {
		v, ok := t.digits(p, 2)
		if !ok {
			return -1, 0, 0, 0, 0
		}
		vals[i] = v
		p += 2
		c := t.at(p)
		p++
		if i == 0 {
			hasSep = c == ':'
		}
		if p >= end {
			if c != 0 {
				return 1, vals[0], vals[1], vals[2], 0
			}
			return 0, vals[0], vals[1], vals[2], 0
		}
		if hasSep && c == ':' {
			continue
		}
		if c == '.' || c == ',' {
			break
		}
		if !hasSep {
			p--
			continue
		}
		return -1, 0, 0, 0, 0
	}
	// A fraction: after "." or ",", or after a third component followed by
	// anything (the C code does not check, so "10:00:00:5" has 0.5 s).
	n := end - p
	if n > 6 {
		n = 6
	}
	f, ok := t.digits(p, n)
	if !ok {
		return -1, 0, 0, 0, 0
	}
	for k := n; k < 6; k++ {
		f *= 10
	}
	p += n
	for isDigit(t.at(p)) {
		p++
	}
	if t.at(p) != 0 {
		return 1, vals[0], vals[1], vals[2], f
	}
	return 0, vals[0], vals[1], vals[2], f
}
