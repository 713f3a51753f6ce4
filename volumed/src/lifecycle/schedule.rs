//! When a schedule runs: its slots, as seconds since the epoch, in UTC.
//! Pure: parsing and slot arithmetic, no clock.
//!
//! - `every N`: slots at `offset + k * N`, aligned to the epoch, so every
//!   host with the same schedule has the same slots (and a DLM `Interval`
//!   of 12 hours with `Times` 09:00 runs at 09:00 and 21:00).
//! - cron, two dialects:
//!   - Unix, five fields: `minute hour day-of-month month day-of-week`,
//!     day of week 0-7 (0 and 7 Sunday);
//!   - AWS (`cron(...)` or six fields): `minute hour day-of-month month
//!     day-of-week year`, day of week 1-7 (1 Sunday), `?` for "any" in
//!     either day field.
//!
//!   Each field takes `*`, numbers, names (`JAN`-`DEC`, `SUN`-`SAT`),
//!   ranges `a-b`, steps `*/n`, `a/n`, `a-b/n` and lists. As in Vixie cron,
//!   when both day fields are restricted a day matching either runs. `L`,
//!   `W` and `#` are refused.

use std::fmt;

/// How far ahead (or back) a cron slot is searched for.
const SEARCH_YEARS: i32 = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    Every { period: u64, offset: u64 },
    Cron(Box<Cron>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    source: String,
    minutes: u64,
    hours: u32,
    /// Bits 1..=31.
    days: u32,
    /// Bits 1..=12.
    months: u16,
    /// Bits 0..=6, Sunday 0.
    weekdays: u8,
    days_any: bool,
    weekdays_any: bool,
    /// Inclusive ranges of years; empty for any year.
    years: Vec<(i32, i32)>,
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Every { period, offset: 0 } => write!(f, "every {period}s"),
            Schedule::Every { period, offset } => write!(f, "every {period}s at +{offset}s"),
            Schedule::Cron(c) => write!(f, "cron {}", c.source),
        }
    }
}

impl Schedule {
    /// An `every` schedule; `period` is at least one second.
    pub fn every(period: u64, offset: u64) -> Result<Schedule, String> {
        if period == 0 {
            return Err("the interval must be at least 1s".into());
        }
        Ok(Schedule::Every {
            period,
            offset: offset % period,
        })
    }

    pub fn cron(expr: &str) -> Result<Schedule, String> {
        Cron::parse(expr).map(|c| Schedule::Cron(Box::new(c)))
    }

    /// The last slot at or before `t`.
    pub fn slot_at_or_before(&self, t: i64) -> Option<i64> {
        match self {
            Schedule::Every { period, offset } => {
                let (p, o) = (i64::try_from(*period).ok()?, i64::try_from(*offset).ok()?);
                Some((t - o).div_euclid(p) * p + o)
            }
            Schedule::Cron(c) => c.prev(t),
        }
    }

    /// The first slot after `t`.
    pub fn next_after(&self, t: i64) -> Option<i64> {
        match self {
            Schedule::Every { period, .. } => {
                let p = i64::try_from(*period).ok()?;
                Some(self.slot_at_or_before(t)? + p)
            }
            Schedule::Cron(c) => c.next(t),
        }
    }

    /// The shortest gap between the next `n` slots after `t`, so a cron
    /// expression can be held to a minimum interval.
    pub fn min_gap(&self, t: i64, n: usize) -> Option<u64> {
        if let Schedule::Every { period, .. } = self {
            return Some(*period);
        }
        let mut prev = self.next_after(t)?;
        let mut gap: Option<u64> = None;
        for _ in 0..n {
            let Some(next) = self.next_after(prev) else {
                break;
            };
            let g = u64::try_from(next - prev).unwrap_or(0);
            gap = Some(gap.map_or(g, |m| m.min(g)));
            prev = next;
        }
        gap
    }

    /// How many slots lie in `(after, upto]`, counting at most `cap`.
    pub fn slots_between(&self, after: i64, upto: i64, cap: u64) -> u64 {
        if let Schedule::Every { period, .. } = self {
            let Some(p) = i64::try_from(*period).ok() else {
                return 0;
            };
            let (Some(a), Some(b)) = (self.slot_at_or_before(after), self.slot_at_or_before(upto))
            else {
                return 0;
            };
            return u64::try_from((b - a) / p).unwrap_or(0).min(cap);
        }
        let mut n = 0;
        let mut t = after;
        while n < cap {
            match self.next_after(t) {
                Some(s) if s <= upto => {
                    n += 1;
                    t = s;
                }
                _ => break,
            }
        }
        n
    }
}

fn utc(t: i64) -> Option<time::PrimitiveDateTime> {
    let d = time::OffsetDateTime::from_unix_timestamp(t).ok()?;
    Some(time::PrimitiveDateTime::new(d.date(), d.time()))
}

fn secs(d: time::Date, hour: u8, minute: u8) -> Option<i64> {
    Some(
        d.with_hms(hour, minute, 0)
            .ok()?
            .assume_utc()
            .unix_timestamp(),
    )
}

fn first_of_next_month(d: time::Date) -> Option<time::Date> {
    let (y, m) = match d.month() {
        time::Month::December => (d.year() + 1, time::Month::January),
        m => (d.year(), m.next()),
    };
    time::Date::from_calendar_date(y, m, 1).ok()
}

fn last_of_previous_month(d: time::Date) -> Option<time::Date> {
    time::Date::from_calendar_date(d.year(), d.month(), 1)
        .ok()?
        .previous_day()
}

impl Cron {
    fn parse(expr: &str) -> Result<Cron, String> {
        let bad = |why: String| format!("cron expression {expr:?}: {why}");
        let inner = match expr.trim().strip_prefix("cron(") {
            Some(rest) => rest
                .strip_suffix(')')
                .ok_or_else(|| bad("missing the closing parenthesis".into()))?,
            None => expr.trim(),
        };
        let fields: Vec<&str> = inner.split_whitespace().collect();
        let aws = match fields.len() {
            5 if !expr.trim().starts_with("cron(") => false,
            6 => true,
            n => {
                return Err(bad(format!(
                    "{n} fields; expected 5 (minute hour day month weekday) or, AWS style, 6 (… year)"
                )));
            }
        };
        for f in &fields {
            if f.contains(['L', 'W', '#'])
                && !f
                    .chars()
                    .all(|c| c.is_ascii_alphabetic() || c == ',' || c == '-')
            {
                return Err(bad(format!("field {f:?}: L, W and # are not supported")));
            }
        }
        let field = |i: usize, name: &str, lo: u32, hi: u32, names: &[&str], shift: u32| {
            parse_field(fields[i], lo, hi, names, shift, aws)
                .map_err(|why| bad(format!("{name} {:?}: {why}", fields[i])))
        };
        let (minutes, _) = field(0, "minute", 0, 59, &[], 0)?;
        let (hours, _) = field(1, "hour", 0, 23, &[], 0)?;
        let (days, days_any) = field(2, "day of month", 1, 31, &[], 0)?;
        let (months, _) = field(3, "month", 1, 12, MONTHS, 1)?;
        let (weekdays_raw, weekdays_any) = if aws {
            // AWS numbers Sunday 1; names are the same.
            let (bits, any) = field(4, "day of week", 1, 7, WEEKDAYS, 1)?;
            (bits >> 1, any)
        } else {
            let (bits, any) = field(4, "day of week", 0, 7, WEEKDAYS, 0)?;
            // 7 is Sunday too.
            ((bits | (bits >> 7)) & 0x7f, any)
        };
        if aws && !days_any && !weekdays_any {
            return Err(bad(
                "AWS cron needs ? in the day of month or the day of week".into(),
            ));
        }
        let years = if aws {
            parse_years(fields[5]).map_err(bad)?
        } else {
            Vec::new()
        };
        Ok(Cron {
            source: inner.to_owned(),
            minutes,
            hours: hours as u32,
            days: days as u32,
            months: months as u16,
            weekdays: weekdays_raw as u8,
            days_any,
            weekdays_any,
            years,
        })
    }

    fn year_ok(&self, y: i32) -> bool {
        self.years.is_empty() || self.years.iter().any(|&(a, b)| (a..=b).contains(&y))
    }

    fn day_ok(&self, d: time::Date) -> bool {
        let dom = self.days & (1 << d.day()) != 0;
        let dow = self.weekdays & (1 << d.weekday().number_days_from_sunday()) != 0;
        match (self.days_any, self.weekdays_any) {
            (true, true) => true,
            (true, false) => dow,
            (false, true) => dom,
            (false, false) => dom || dow,
        }
    }

    fn next(&self, t: i64) -> Option<i64> {
        let start = utc(t.checked_add(60)?.div_euclid(60) * 60)?;
        let limit = start.year() + SEARCH_YEARS;
        let mut d = start.date();
        let (mut h, mut m) = (start.hour(), start.minute());
        while d.year() <= limit {
            if !self.year_ok(d.year()) || self.months & (1 << d.month() as u8) == 0 {
                d = first_of_next_month(d)?;
                (h, m) = (0, 0);
                continue;
            }
            if !self.day_ok(d) {
                d = d.next_day()?;
                (h, m) = (0, 0);
                continue;
            }
            if let Some(hh) = (h..24).find(|x| self.hours & (1 << x) != 0) {
                let from = if hh == h { m } else { 0 };
                if let Some(mm) = (from..60).find(|x| self.minutes & (1 << x) != 0) {
                    return secs(d, hh, mm);
                }
                if let Some(hh) = (hh + 1..24).find(|x| self.hours & (1 << x) != 0)
                    && let Some(mm) = (0..60).find(|x| self.minutes & (1 << x) != 0)
                {
                    return secs(d, hh, mm);
                }
            }
            d = d.next_day()?;
            (h, m) = (0, 0);
        }
        None
    }

    fn prev(&self, t: i64) -> Option<i64> {
        let start = utc(t.div_euclid(60) * 60)?;
        let limit = start.year() - SEARCH_YEARS;
        let mut d = start.date();
        let (mut h, mut m) = (start.hour(), start.minute());
        while d.year() >= limit {
            if !self.year_ok(d.year()) || self.months & (1 << d.month() as u8) == 0 {
                d = last_of_previous_month(d)?;
                (h, m) = (23, 59);
                continue;
            }
            if !self.day_ok(d) {
                d = d.previous_day()?;
                (h, m) = (23, 59);
                continue;
            }
            if let Some(hh) = (0..=h).rev().find(|x| self.hours & (1 << x) != 0) {
                let upto = if hh == h { m } else { 59 };
                if let Some(mm) = (0..=upto).rev().find(|x| self.minutes & (1 << x) != 0) {
                    return secs(d, hh, mm);
                }
                if let Some(hh) = (0..hh).rev().find(|x| self.hours & (1 << x) != 0)
                    && let Some(mm) = (0..60).rev().find(|x| self.minutes & (1 << x) != 0)
                {
                    return secs(d, hh, mm);
                }
            }
            d = d.previous_day()?;
            (h, m) = (23, 59);
        }
        None
    }
}

const MONTHS: &[&str] = &[
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const WEEKDAYS: &[&str] = &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// A field's value: a number, or a name counted from `shift`.
fn value(s: &str, names: &[&str], shift: u32) -> Result<u32, String> {
    if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
        return Ok(i as u32 + shift);
    }
    s.parse().map_err(|_| format!("{s:?} is not a number"))
}

/// A field as a bit set, and whether it is `*` or `?` (any).
fn parse_field(
    f: &str,
    lo: u32,
    hi: u32,
    names: &[&str],
    shift: u32,
    aws: bool,
) -> Result<(u64, bool), String> {
    if f == "?" {
        return if aws {
            Ok((mask(lo, hi, 1), true))
        } else {
            Err("? is AWS cron; use *".into())
        };
    }
    let mut bits = 0u64;
    for part in f.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let s: u32 = s.parse().map_err(|_| format!("step {s:?}"))?;
                if s == 0 {
                    return Err("a step of 0".into());
                }
                (r, s)
            }
            None => (part, 1),
        };
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a, names, shift)?, value(b, names, shift)?)
        } else {
            let a = value(range, names, shift)?;
            // `a/n` runs from a to the end.
            (a, if part.contains('/') { hi } else { a })
        };
        if a < lo || b > hi || a > b {
            return Err(format!("{range} is outside {lo}-{hi}"));
        }
        bits |= mask(a, b, step);
    }
    Ok((bits, f == "*"))
}

fn mask(a: u32, b: u32, step: u32) -> u64 {
    (a..=b).step_by(step as usize).fold(0, |m, i| m | 1 << i)
}

fn parse_years(f: &str) -> Result<Vec<(i32, i32)>, String> {
    if f == "*" || f == "?" {
        return Ok(Vec::new());
    }
    f.split(',')
        .map(|part| {
            let y = |s: &str| {
                s.parse::<i32>()
                    .ok()
                    .filter(|y| (1970..=2199).contains(y))
                    .ok_or_else(|| format!("year {s:?} is outside 1970-2199"))
            };
            match part.split_once('-') {
                Some((a, b)) if y(a)? <= y(b)? => Ok((y(a)?, y(b)?)),
                Some(_) => Err(format!("years {part:?} run backwards")),
                None => Ok((y(part)?, y(part)?)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `YYYY-MM-DDTHH:MM:SSZ` as seconds since the epoch.
    fn at(s: &str) -> i64 {
        let n = |r: std::ops::Range<usize>| s[r].parse::<u32>().unwrap();
        let month = time::Month::try_from(n(5..7) as u8).unwrap();
        time::Date::from_calendar_date(n(0..4) as i32, month, n(8..10) as u8)
            .unwrap()
            .with_hms(n(11..13) as u8, n(14..16) as u8, n(17..19) as u8)
            .unwrap()
            .assume_utc()
            .unix_timestamp()
    }

    fn show(t: i64) -> String {
        crate::catalog::rfc3339(u64::try_from(t).unwrap())
    }

    #[test]
    fn every_slots_are_aligned_and_offset() {
        let s = Schedule::every(3600, 0).unwrap();
        let t = at("2026-12-06T13:20:05Z");
        assert_eq!(
            show(s.slot_at_or_before(t).unwrap()),
            "2026-12-06T13:00:00Z"
        );
        assert_eq!(show(s.next_after(t).unwrap()), "2026-12-06T14:00:00Z");
        let at_slot = at("2026-12-06T13:00:00Z");
        assert_eq!(s.slot_at_or_before(at_slot), Some(at_slot));
        assert_eq!(s.next_after(at_slot), Some(at_slot + 3600));
        // DLM: every 12 hours at 09:00.
        let d = Schedule::every(12 * 3600, 9 * 3600).unwrap();
        assert_eq!(show(d.next_after(t).unwrap()), "2026-12-06T21:00:00Z");
        assert_eq!(
            show(d.slot_at_or_before(t).unwrap()),
            "2026-12-06T09:00:00Z"
        );
        assert_eq!(s.slots_between(at_slot - 1, at_slot + 3 * 3600, 100), 4);
        assert_eq!(s.slots_between(at_slot, at_slot + 3599, 100), 0);
        assert!(Schedule::every(0, 0).is_err());
    }

    #[test]
    fn cron_next_and_previous() {
        let t = at("2026-12-06T13:20:05Z"); // a Sunday
        #[allow(clippy::type_complexity)]
        let table: &[(&str, &str, &str)] = &[
            (
                "*/15 * * * *",
                "2026-12-06T13:30:00Z",
                "2026-12-06T13:15:00Z",
            ),
            ("0 12 * * *", "2026-12-07T12:00:00Z", "2026-12-06T12:00:00Z"),
            ("30 2 1 * *", "2027-01-01T02:30:00Z", "2026-12-01T02:30:00Z"),
            (
                "0 0 * * 1-5",
                "2026-12-07T00:00:00Z",
                "2026-12-04T00:00:00Z",
            ),
            ("0 0 * * 7", "2026-12-13T00:00:00Z", "2026-12-06T00:00:00Z"),
            ("0 0 29 2 *", "2028-02-29T00:00:00Z", "2024-02-29T00:00:00Z"),
            (
                "0 9 1 JAN,JUL *",
                "2027-01-01T09:00:00Z",
                "2026-07-01T09:00:00Z",
            ),
            // Vixie: both day fields restricted means either.
            (
                "0 0 13 * FRI",
                "2026-12-11T00:00:00Z",
                "2026-12-04T00:00:00Z",
            ),
            // AWS: Sunday is 1, ? in a day field, a year field.
            (
                "cron(0 12 ? * 1 *)",
                "2026-12-13T12:00:00Z",
                "2026-12-06T12:00:00Z",
            ),
            (
                "cron(0/30 8-17 ? * MON-FRI *)",
                "2026-12-07T08:00:00Z",
                "2026-12-04T17:30:00Z",
            ),
            ("0 6 1 * ? 2027-2028", "2027-01-01T06:00:00Z", ""),
        ];
        for (expr, next, prev) in table {
            let s = Schedule::cron(expr).unwrap();
            assert_eq!(
                s.next_after(t).map(show).unwrap_or_default(),
                *next,
                "{expr} next"
            );
            assert_eq!(
                s.slot_at_or_before(t).map(show).unwrap_or_default(),
                *prev,
                "{expr} prev"
            );
        }
    }

    #[test]
    fn cron_refusals_are_one_line() {
        for bad in [
            "* * * *",
            "60 * * * *",
            "* 24 * * *",
            "* * 0 * *",
            "* * * 13 *",
            "* * * * 8",
            "*/0 * * * *",
            "5-1 * * * *",
            "0 0 L * ?",
            "cron(0 0 1 * 1 *)",
            "cron(0 0 * * ? 1900)",
            "0 0 ? * *",
            "cron(0 0 * * ?",
        ] {
            let e = Schedule::cron(bad).unwrap_err();
            assert!(
                e.starts_with("cron expression") && !e.contains('\n'),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn minimum_gap_of_a_cron_schedule() {
        let t = at("2026-12-06T13:20:05Z");
        assert_eq!(
            Schedule::cron("*/5 * * * *").unwrap().min_gap(t, 50),
            Some(300)
        );
        assert_eq!(
            Schedule::cron("0 1,2 * * *").unwrap().min_gap(t, 50),
            Some(3600)
        );
        assert_eq!(Schedule::every(7, 0).unwrap().min_gap(t, 50), Some(7));
    }
}
