package eval

import (
	"strings"
	"time"
)

// parseRelativeDate reads PostHog's relative date filter values: an optional "-",
// a number below 10000 and a unit (h, d, w, m, y). Both "-7d" and "7d" mean seven
// days ago.
func parseRelativeDate(s string) (n int, unit byte, ok bool) {
	if strings.HasPrefix(s, "-") {
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
// arithmetic that clamps to the end of a shorter month (31 March minus one month is
// 28 or 29 February), as Python's dateutil relativedelta does.
func subtractRelative(now time.Time, n int, unit byte) time.Time {
	switch unit {
	case 'h':
		return now.Add(-time.Duration(n) * time.Hour)
	case 'd':
		return now.Add(-time.Duration(n) * 24 * time.Hour)
	case 'w':
		return now.Add(-time.Duration(n) * 7 * 24 * time.Hour)
	case 'm':
		return addMonthsClamped(now, -n)
	case 'y':
		return addMonthsClamped(now, -12*n)
	}
	return now
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

var monthNames = map[string]time.Month{
	"jan": time.January, "january": time.January,
	"feb": time.February, "february": time.February,
	"mar": time.March, "march": time.March,
	"apr": time.April, "april": time.April,
	"may": time.May,
	"jun": time.June, "june": time.June,
	"jul": time.July, "july": time.July,
	"aug": time.August, "august": time.August,
	"sep": time.September, "sept": time.September, "september": time.September,
	"oct": time.October, "october": time.October,
	"nov": time.November, "november": time.November,
	"dec": time.December, "december": time.December,
}

// dateParser is a small scanner over a date string.
type dateParser struct {
	s   string
	pos int
}

func (p *dateParser) eof() bool { return p.pos >= len(p.s) }

func (p *dateParser) peek() byte {
	if p.eof() {
		return 0
	}
	return p.s[p.pos]
}

func (p *dateParser) digits(min, max int) (int, int, bool) {
	start := p.pos
	n := 0
	for !p.eof() && p.pos-start < max && p.s[p.pos] >= '0' && p.s[p.pos] <= '9' {
		n = n*10 + int(p.s[p.pos]-'0')
		p.pos++
	}
	count := p.pos - start
	if count < min {
		p.pos = start
		return 0, 0, false
	}
	return n, count, true
}

func (p *dateParser) skipSpaces() {
	for !p.eof() && (p.s[p.pos] == ' ' || p.s[p.pos] == '\t') {
		p.pos++
	}
}

func (p *dateParser) word() string {
	start := p.pos
	for !p.eof() && isASCIILetter(p.s[p.pos]) {
		p.pos++
	}
	return p.s[start:p.pos]
}

func isASCIILetter(c byte) bool { return (c|0x20) >= 'a' && (c|0x20) <= 'z' }

// parseDate parses the date and date-time spellings PostHog users write and
// Python's dateutil accepts: ISO 8601 (with T or a space, optional seconds and
// fraction, Z, UTC, GMT or a numeric offset), YYYY/MM/DD, YYYYMMDD, MM/DD/YYYY,
// "May 1, 2022", "1 May 2022", a year-month or a bare year (the missing parts come
// from today, as dateutil does). A value without an offset is UTC. usesNow reports
// whether today's date filled in missing parts.
func parseDate(s string, now time.Time) (t time.Time, usesNow bool, ok bool) {
	s = strings.TrimSpace(s)
	if s == "" {
		return time.Time{}, false, false
	}
	p := &dateParser{s: s}
	year, month, day := 0, time.Month(0), 0
	if isASCIILetter(p.peek()) {
		// "May 1, 2022" / "May 1 2022"
		m, known := monthNames[strings.ToLower(p.word())]
		if !known {
			return time.Time{}, false, false
		}
		p.skipSpaces()
		d, _, okD := p.digits(1, 2)
		if !okD {
			return time.Time{}, false, false
		}
		if p.peek() == ',' {
			p.pos++
		}
		p.skipSpaces()
		y, n, okY := p.digits(4, 4)
		if !okY || n != 4 {
			return time.Time{}, false, false
		}
		year, month, day = y, m, d
	} else {
		first, n, okFirst := p.digits(1, 8)
		if !okFirst {
			return time.Time{}, false, false
		}
		switch {
		case n == 8: // YYYYMMDD
			year, month, day = first/10000, time.Month(first/100%100), first%100
		case n == 4: // YYYY[-MM[-DD]]
			year = first
			sep := p.peek()
			if sep != '-' && sep != '/' && sep != '.' {
				if p.eof() {
					// A bare year: month and day from today.
					month, day, usesNow = now.Month(), now.Day(), true
					if last := daysIn(year, month); day > last {
						day = last
					}
					break
				}
				return time.Time{}, false, false
			}
			p.pos++
			m, _, okM := p.digits(1, 2)
			if !okM {
				return time.Time{}, false, false
			}
			month = time.Month(m)
			if p.peek() == sep {
				p.pos++
				d, _, okD := p.digits(1, 2)
				if !okD {
					return time.Time{}, false, false
				}
				day = d
			} else {
				day, usesNow = now.Day(), true
				if month >= 1 && month <= 12 {
					if last := daysIn(year, month); day > last {
						day = last
					}
				}
			}
		case n <= 2:
			sep := p.peek()
			if sep == ' ' && isASCIILetter(p.peekAfterSpaces()) {
				// "1 May 2022"
				p.skipSpaces()
				m, known := monthNames[strings.ToLower(p.word())]
				if !known {
					return time.Time{}, false, false
				}
				p.skipSpaces()
				y, ny, okY := p.digits(4, 4)
				if !okY || ny != 4 {
					return time.Time{}, false, false
				}
				year, month, day = y, m, first
				break
			}
			if sep != '/' && sep != '-' && sep != '.' {
				return time.Time{}, false, false
			}
			p.pos++
			second, _, okS := p.digits(1, 2)
			if !okS || p.peek() != sep {
				return time.Time{}, false, false
			}
			p.pos++
			y, ny, okY := p.digits(4, 4)
			if !okY || ny != 4 {
				return time.Time{}, false, false
			}
			// Month first, as dateutil reads it, unless that cannot be a month.
			month, day = time.Month(first), second
			if first > 12 && second <= 12 {
				month, day = time.Month(second), first
			}
			year = y
		default:
			return time.Time{}, false, false
		}
	}
	if year < 1 || month < 1 || month > 12 || day < 1 || day > daysIn(year, month) {
		return time.Time{}, false, false
	}
	hour, minute, sec, nsec := 0, 0, 0, 0
	loc := time.UTC
	if !p.eof() {
		c := p.peek()
		if c == 'T' || c == 't' || c == ' ' {
			p.pos++
			p.skipSpaces()
		}
		if !p.eof() && p.peek() >= '0' && p.peek() <= '9' {
			var okT bool
			if hour, minute, sec, nsec, okT = p.clock(); !okT {
				return time.Time{}, false, false
			}
		}
		var okZ bool
		if loc, hour, okZ = p.zone(hour); !okZ {
			return time.Time{}, false, false
		}
	}
	return time.Date(year, month, day, hour, minute, sec, nsec, loc).UTC(), usesNow, true
}

func (p *dateParser) peekAfterSpaces() byte {
	i := p.pos
	for i < len(p.s) && p.s[i] == ' ' {
		i++
	}
	if i < len(p.s) {
		return p.s[i]
	}
	return 0
}

// clock reads HH:MM[:SS[.fraction]] (or the compact HHMM[SS]).
func (p *dateParser) clock() (hour, minute, sec, nsec int, ok bool) {
	h, n, okH := p.digits(1, 2)
	if !okH {
		return 0, 0, 0, 0, false
	}
	hour = h
	compact := n == 2 && p.peek() >= '0' && p.peek() <= '9'
	if compact {
		if minute, _, ok = p.digits(2, 2); !ok {
			return 0, 0, 0, 0, false
		}
		if p.peek() >= '0' && p.peek() <= '9' {
			if sec, _, ok = p.digits(2, 2); !ok {
				return 0, 0, 0, 0, false
			}
		}
	} else {
		if p.peek() != ':' {
			return 0, 0, 0, 0, false
		}
		p.pos++
		if minute, _, ok = p.digits(1, 2); !ok {
			return 0, 0, 0, 0, false
		}
		if p.peek() == ':' {
			p.pos++
			if sec, _, ok = p.digits(1, 2); !ok {
				return 0, 0, 0, 0, false
			}
		}
	}
	if p.peek() == '.' || p.peek() == ',' {
		p.pos++
		start := p.pos
		frac, n, okF := p.digits(1, 32)
		if !okF {
			return 0, 0, 0, 0, false
		}
		// Microsecond precision, as Python's datetime keeps.
		digits := p.s[start : start+n]
		frac = 0
		for i := 0; i < 6; i++ {
			frac *= 10
			if i < len(digits) {
				frac += int(digits[i] - '0')
			}
		}
		nsec = frac * 1000
	}
	if hour > 23 || minute > 59 || sec > 59 {
		return 0, 0, 0, 0, false
	}
	return hour, minute, sec, nsec, true
}

// zone reads what follows the clock: nothing, AM/PM, Z, UTC, GMT or an offset.
func (p *dateParser) zone(hour int) (*time.Location, int, bool) {
	p.skipSpaces()
	if p.eof() {
		return time.UTC, hour, true
	}
	if isASCIILetter(p.peek()) {
		w := strings.ToLower(p.word())
		switch w {
		case "am", "pm":
			if hour < 1 || hour > 12 {
				return nil, 0, false
			}
			if w == "pm" && hour != 12 {
				hour += 12
			} else if w == "am" && hour == 12 {
				hour = 0
			}
			return p.zone(hour)
		case "z", "utc", "gmt":
			p.skipSpaces()
			if p.eof() {
				return time.UTC, hour, true
			}
			if c := p.peek(); c != '+' && c != '-' {
				return nil, 0, false
			}
		default:
			return nil, 0, false
		}
	}
	sign := p.peek()
	if sign != '+' && sign != '-' {
		return nil, 0, false
	}
	p.pos++
	oh, n, ok := p.digits(1, 4)
	if !ok {
		return nil, 0, false
	}
	om := 0
	switch {
	case n == 4:
		oh, om = oh/100, oh%100
	case n == 3:
		return nil, 0, false
	case p.peek() == ':':
		p.pos++
		if om, _, ok = p.digits(2, 2); !ok {
			return nil, 0, false
		}
	}
	p.skipSpaces()
	if !p.eof() || oh > 23 || om > 59 {
		return nil, 0, false
	}
	offset := oh*3600 + om*60
	if sign == '-' {
		offset = -offset
	}
	return time.FixedZone("", offset), hour, true
}
