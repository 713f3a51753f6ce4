//! Which of a policy's snapshots of one volume to keep: Proxmox Backup
//! Server's prune, exactly, plus `keep-within`. Pure: a list and options
//! in, a mark per snapshot out.
//!
//! PBS's rules (pbs-datastore's `compute_prune_info`, and its manual):
//!
//! 1. The snapshots are taken newest first.
//! 2. A protected snapshot is marked `protected`, kept, and counts for no
//!    option.
//! 3. The options run in the order keep-last, keep-hourly, keep-daily,
//!    keep-weekly, keep-monthly, keep-yearly. Each puts a snapshot in a
//!    period (keep-last: the snapshot itself; the others: its hour, day,
//!    ISO week, month, year) and walks the snapshots not yet marked, newest
//!    first: a snapshot in a period that an earlier option already kept a
//!    snapshot of is skipped (left for later options); the first snapshot
//!    of a new period is kept, until the option has kept N periods, where
//!    it stops; a later snapshot of a period it kept is marked for
//!    removal, and no later option reconsiders it.
//! 4. Whatever is still unmarked is removed. With no option at all,
//!    everything is kept (PBS's keep-all).
//!
//! Ours beyond PBS, none of which changes a PBS decision:
//! - periods are read in UTC (PBS reads the server's local time), so hosts
//!   sharing a store agree;
//! - keep-last counts snapshots, not seconds (PBS names a backup by its
//!   second, so two of ours taken in one second are two);
//! - keep-within keeps, after the rules above, every snapshot younger than
//!   its duration at the time of the prune (a DLM age-based RetainRule);
//! - unfinished snapshots never reach prune: only completed ones have a
//!   manifest, and prune lists manifests.

use std::collections::{HashMap, HashSet};

use volumed_api::{PruneMark, Retention};

/// A snapshot as prune sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    /// Seconds since the epoch: the snapshot's instant.
    pub time: i64,
    pub protected: bool,
}

/// The period a snapshot falls in for one option.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Period {
    Snapshot(String),
    Hour(i32, u8, u8, u8),
    Day(i32, u8, u8),
    IsoWeek(i32, u8),
    Month(i32, u8),
    Year(i32),
}

fn utc(t: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(t).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn hour(c: &Candidate) -> Period {
    let t = utc(c.time);
    Period::Hour(t.year(), t.month() as u8, t.day(), t.hour())
}

fn day(c: &Candidate) -> Period {
    let t = utc(c.time);
    Period::Day(t.year(), t.month() as u8, t.day())
}

fn week(c: &Candidate) -> Period {
    // The ISO year, which near New Year may differ from the calendar's.
    let (y, w, _) = utc(c.time).to_iso_week_date();
    Period::IsoWeek(y, w)
}

fn month(c: &Candidate) -> Period {
    let t = utc(c.time);
    Period::Month(t.year(), t.month() as u8)
}

fn year(c: &Candidate) -> Period {
    Period::Year(utc(c.time).year())
}

fn itself(c: &Candidate) -> Period {
    Period::Snapshot(c.id.clone())
}

/// Which period of one option a snapshot falls in.
type PeriodOf = fn(&Candidate) -> Period;

/// PBS's `mark_selections`: one option over the list, newest first.
fn mark_selections(
    marks: &mut HashMap<usize, PruneMark>,
    list: &[Candidate],
    keep: u32,
    mark: PruneMark,
    period: PeriodOf,
) {
    let already: HashSet<Period> = list
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            marks
                .get(i)
                .is_some_and(|m| m.keep() && *m != PruneMark::Protected)
        })
        .map(|(_, c)| period(c))
        .collect();
    let mut included = HashSet::new();
    for (i, c) in list.iter().enumerate() {
        if marks.contains_key(&i) {
            continue;
        }
        let p = period(c);
        if already.contains(&p) {
            continue;
        }
        if included.contains(&p) {
            marks.insert(i, PruneMark::Remove);
        } else {
            if included.len() >= keep as usize {
                break;
            }
            included.insert(p);
            marks.insert(i, mark);
        }
    }
}

/// The mark of every snapshot in `list`, newest first (the order it is
/// returned in): PBS's rules, then `keep_within` as of `now`.
pub fn plan(list: &[Candidate], keep: &Retention, now: i64) -> Vec<(Candidate, PruneMark)> {
    let mut list = list.to_vec();
    list.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.id.cmp(&a.id)));
    let mut marks: HashMap<usize, PruneMark> = HashMap::new();
    for (i, c) in list.iter().enumerate() {
        if c.protected {
            marks.insert(i, PruneMark::Protected);
        }
    }
    let pbs_options = [
        keep.keep_last,
        keep.keep_hourly,
        keep.keep_daily,
        keep.keep_weekly,
        keep.keep_monthly,
        keep.keep_yearly,
    ];
    if pbs_options.iter().all(Option::is_none) && keep.keep_within.is_none() {
        return list
            .into_iter()
            .enumerate()
            .map(|(i, c)| (c, marks.remove(&i).unwrap_or(PruneMark::KeepAll)))
            .collect();
    }
    let options: [(Option<u32>, PruneMark, PeriodOf); 6] = [
        (keep.keep_last, PruneMark::KeepLast, itself),
        (keep.keep_hourly, PruneMark::KeepHourly, hour),
        (keep.keep_daily, PruneMark::KeepDaily, day),
        (keep.keep_weekly, PruneMark::KeepWeekly, week),
        (keep.keep_monthly, PruneMark::KeepMonthly, month),
        (keep.keep_yearly, PruneMark::KeepYearly, year),
    ];
    for (n, mark, period) in options {
        if let Some(n) = n {
            mark_selections(&mut marks, &list, n, mark, period);
        }
    }
    let within = keep
        .keep_within
        .map(|w| now.saturating_sub(i64::try_from(w).unwrap_or(i64::MAX)));
    list.into_iter()
        .enumerate()
        .map(|(i, c)| {
            let mut m = marks.remove(&i).unwrap_or(PruneMark::Remove);
            if m == PruneMark::Remove && within.is_some_and(|w| c.time > w) {
                m = PruneMark::KeepWithin;
            }
            (c, m)
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

    fn list(times: &[&str], protected: &[&str]) -> Vec<Candidate> {
        times
            .iter()
            .map(|t| Candidate {
                id: t.to_string(),
                time: at(t),
                protected: protected.contains(t),
            })
            .collect()
    }

    fn opts(spec: &str) -> Retention {
        let mut r = Retention::default();
        for part in spec.split_whitespace() {
            let (k, v) = part.split_once('=').unwrap();
            let v: u64 = v.parse().unwrap();
            match k {
                "last" => r.keep_last = Some(v as u32),
                "hourly" => r.keep_hourly = Some(v as u32),
                "daily" => r.keep_daily = Some(v as u32),
                "weekly" => r.keep_weekly = Some(v as u32),
                "monthly" => r.keep_monthly = Some(v as u32),
                "yearly" => r.keep_yearly = Some(v as u32),
                "within" => r.keep_within = Some(v),
                _ => panic!("{k}"),
            }
        }
        r
    }

    /// The kept ones, oldest first.
    fn kept(l: &[Candidate], o: &Retention, now: i64) -> Vec<String> {
        let mut k: Vec<String> = plan(l, o, now)
            .into_iter()
            .filter(|(_, m)| m.keep())
            .map(|(c, _)| c.id)
            .collect();
        k.reverse();
        k
    }

    const HOURLY: &[&str] = &[
        "2019-11-15T09:39:15Z",
        "2019-11-15T10:49:15Z",
        "2019-11-15T10:59:15Z",
        "2019-11-15T11:39:15Z",
        "2019-11-15T11:49:15Z",
        "2019-11-15T11:59:15Z",
    ];
    const SIMPLE: &[&str] = &[
        "2019-12-02T11:59:15Z",
        "2019-12-03T11:59:15Z",
        "2019-12-04T11:59:15Z",
        "2019-12-04T12:59:15Z",
    ];
    const SIMPLE2: &[&str] = &[
        "2018-11-15T11:59:15Z",
        "2019-11-15T11:59:15Z",
        "2019-11-21T11:59:15Z",
        "2019-11-22T11:59:15Z",
        "2019-11-29T11:59:15Z",
        "2019-12-01T11:59:15Z",
        "2019-12-02T11:59:15Z",
        "2019-12-03T11:59:15Z",
        "2019-12-04T11:59:15Z",
    ];
    /// Across a New Year whose first days belong to the previous ISO year
    /// (2021-01-01 to 01-03 are 2020-W53).
    const NEW_YEAR: &[&str] = &[
        "2020-12-27T10:00:00Z",
        "2020-12-28T10:00:00Z",
        "2020-12-31T10:00:00Z",
        "2021-01-03T10:00:00Z",
        "2021-01-04T10:00:00Z",
    ];

    /// The kept sets of PBS's own prune tests (proxmox-backup
    /// `tests/prune.rs`), the rules of its manual, and ours.
    #[test]
    fn kept_sets_follow_pbs() {
        let none: &[&str] = &[];
        let now = at("2019-12-05T00:00:00Z");
        #[allow(clippy::type_complexity)]
        let table: &[(&[&str], &[&str], &str, &[&str])] = &[
            // PBS test_prune_hourly
            (HOURLY, none, "hourly=3", &[HOURLY[0], HOURLY[2], HOURLY[5]]),
            (HOURLY, none, "hourly=2", &[HOURLY[2], HOURLY[5]]),
            // PBS test_prune_simple
            (SIMPLE, none, "last=4", SIMPLE),
            (SIMPLE, none, "last=3", &SIMPLE[1..]),
            (SIMPLE, none, "last=2", &SIMPLE[2..]),
            (SIMPLE, none, "last=1", &SIMPLE[3..]),
            (SIMPLE, none, "last=0", none),
            (SIMPLE, none, "last=2 daily=2", SIMPLE),
            (SIMPLE, none, "daily=3", &[SIMPLE[0], SIMPLE[1], SIMPLE[3]]),
            (SIMPLE, none, "daily=2", &[SIMPLE[1], SIMPLE[3]]),
            (SIMPLE, none, "weekly=5", &SIMPLE[3..]),
            (SIMPLE, none, "daily=1 weekly=5", &SIMPLE[3..]),
            (SIMPLE, none, "monthly=6", &SIMPLE[3..]),
            (SIMPLE, none, "yearly=7", &SIMPLE[3..]),
            (SIMPLE, none, "weekly=5 monthly=6 yearly=7", &SIMPLE[3..]),
            // PBS test_prune_simple2
            (SIMPLE2, none, "daily=1", &SIMPLE2[8..]),
            (SIMPLE2, none, "last=1 daily=1", &SIMPLE2[7..]),
            (SIMPLE2, none, "daily=1 weekly=1", &[SIMPLE2[5], SIMPLE2[8]]),
            (
                SIMPLE2,
                none,
                "daily=1 weekly=1 monthly=1",
                &[SIMPLE2[3], SIMPLE2[5], SIMPLE2[8]],
            ),
            (
                SIMPLE2,
                none,
                "monthly=1 yearly=1",
                &[SIMPLE2[0], SIMPLE2[8]],
            ),
            // No option: keep-all.
            (SIMPLE, none, "", SIMPLE),
            // Protected: kept, and counting for nothing.
            (SIMPLE, &[SIMPLE[3]], "last=1", &SIMPLE[2..]),
            (SIMPLE, &[SIMPLE[0]], "last=1", &[SIMPLE[0], SIMPLE[3]]),
            (SIMPLE, &[SIMPLE[3]], "daily=1", &SIMPLE[2..]),
            (SIMPLE, &[SIMPLE[1]], "last=0", &[SIMPLE[1]]),
            // ISO weeks: 2020-12-28..2021-01-03 is one week (2020-W53).
            (
                NEW_YEAR,
                none,
                "weekly=3",
                &[NEW_YEAR[0], NEW_YEAR[3], NEW_YEAR[4]],
            ),
            (NEW_YEAR, none, "yearly=3", &[NEW_YEAR[2], NEW_YEAR[4]]),
            // keep-within: everything younger, besides what PBS keeps.
            (SIMPLE, none, "within=86400", &SIMPLE[2..]),
            (SIMPLE, none, "within=172800", &SIMPLE[1..]),
            (SIMPLE, none, "last=1 within=172800", &SIMPLE[1..]),
            (SIMPLE, none, "last=3 within=86400", &SIMPLE[1..]),
        ];
        for (i, (times, protected, o, want)) in table.iter().enumerate() {
            let got = kept(&list(times, protected), &opts(o), now);
            assert_eq!(got, *want, "row {i}: {o}");
        }
    }

    #[test]
    fn marks_name_the_option_that_kept_each() {
        let l = list(SIMPLE2, &[SIMPLE2[6]]);
        let p = plan(&l, &opts("last=1 daily=1 weekly=2"), 0);
        let marks: Vec<(&str, PruneMark)> = p.iter().map(|(c, m)| (c.id.as_str(), *m)).collect();
        assert_eq!(
            marks,
            [
                (SIMPLE2[8], PruneMark::KeepLast),
                (SIMPLE2[7], PruneMark::KeepDaily),
                (SIMPLE2[6], PruneMark::Protected),
                (SIMPLE2[5], PruneMark::KeepWeekly),
                (SIMPLE2[4], PruneMark::Remove),
                (SIMPLE2[3], PruneMark::KeepWeekly),
                (SIMPLE2[2], PruneMark::Remove),
                (SIMPLE2[1], PruneMark::Remove),
                (SIMPLE2[0], PruneMark::Remove),
            ]
        );
    }

    #[test]
    fn snapshots_of_one_second_are_two_for_keep_last() {
        let l: Vec<Candidate> = ["snap-b", "snap-a", "snap-c"]
            .iter()
            .map(|id| Candidate {
                id: id.to_string(),
                time: 100,
                protected: false,
            })
            .collect();
        let k = kept(&l, &opts("last=2"), 0);
        assert_eq!(k, ["snap-b", "snap-c"], "ties go by id, newest last");
    }
}
