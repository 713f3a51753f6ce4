//! The processes a test's daemon started, found through `/proc`: each run
//! of the daemon leads its own process group, so everything it forks
//! (qemu-img, qemu-nbd) is in that group and stays there after the daemon
//! dies, reparented or not.

use std::time::{Duration, Instant};

/// How long a killed daemon's children may take to go: the kernel delivers
/// their parent-death signal asynchronously, and it is polled for, not
/// slept.
pub const GRACE: Duration = Duration::from_secs(5);

/// One run's process group: the daemon's pid, and its start time in clock
/// ticks since boot, which tells the daemon from a later process given the
/// same pid.
#[derive(Debug, Clone, Copy)]
pub struct Group {
    pub pgid: i32,
    start: u64,
}

impl Group {
    /// The group `pid` (a process that made itself a group leader) leads.
    pub fn of_leader(pid: i32) -> Self {
        let start = stat(pid).map_or(0, |s| s.start);
        Group { pgid: pid, start }
    }
}

/// A live process: its pid and command line.
#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: i32,
    pub cmdline: String,
}

impl std::fmt::Display for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {}: {}", self.pid, self.cmdline)
    }
}

struct Stat {
    state: char,
    pgrp: i32,
    start: u64,
}

fn stat(pid: i32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// `pid (comm) state ppid pgrp ... starttime ...`: the name may hold spaces
/// and parentheses, so the fields are counted after its last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is f[0]; field 5 (pgrp) f[2]; field 22 (starttime) f[19].
    Some(Stat {
        state: f.first()?.chars().next()?,
        pgrp: f.get(2)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
    })
}

fn cmdline(pid: i32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    args.join(" ")
}

/// Live processes (zombies are dead, only not yet reaped) in `groups`,
/// other than `except`.
pub fn members(groups: &[Group], except: Option<i32>) -> Vec<Proc> {
    // A group whose leader's pid now belongs to a younger process was given
    // up and its id reused by someone else: a group id is not handed out
    // again while any member of the old group lives, so none of ours is there.
    let ours: Vec<i32> = groups
        .iter()
        .filter(|g| stat(g.pgid).is_none_or(|s| s.start == g.start))
        .map(|g| g.pgid)
        .collect();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found: Vec<Proc> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| Some(pid) != except)
        .filter(|&pid| {
            stat(pid).is_some_and(|s| ours.contains(&s.pgrp) && !matches!(s.state, 'Z' | 'X'))
        })
        .map(|pid| Proc {
            pid,
            cmdline: cmdline(pid),
        })
        .collect();
    found.sort_by_key(|p| p.pid);
    found
}

/// Polls until no process is left in `groups` (other than `except`), or
/// [`GRACE`] has passed; returns what is left.
pub fn wait_gone(groups: &[Group], except: Option<i32>) -> Vec<Proc> {
    let deadline = Instant::now() + GRACE;
    loop {
        let left = members(groups, except);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_name() {
        let line = "4242 (qemu (nbd) x) S 1 4200 4200 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 \
                    3 0 987654 123 45 18446744073709551615";
        let s = parse_stat(line).unwrap();
        assert_eq!((s.state, s.pgrp, s.start), ('S', 4200, 987654));
        assert!(parse_stat("4242 (x) S 1").is_none());
    }

    #[test]
    fn finds_a_child_in_its_group_and_not_once_it_is_gone() {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let g = Group::of_leader(pid);
        let found = members(&[g], None);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].cmdline, "sleep 60");
        assert!(members(&[g], Some(pid)).is_empty());
        child.kill().unwrap();
        // Killed and not yet reaped: a zombie, not a survivor.
        assert!(wait_gone(&[g], None).is_empty());
        child.wait().unwrap();
    }
}
