//! The node's memory (`node_total`, what the start and allocation checks
//! compare with) and how close this process is to running out of it, so
//! that a home filling up is reported as such (rank, host, what it holds)
//! before the kernel's OOM killer ends it without a word: the node's
//! available memory (`MemAvailable` + free swap) and, when the process is
//! in a memory cgroup with a limit (v2 `memory.max`, v1
//! `memory.limit_in_bytes`), the cgroup's room left beside what it uses
//! other than the file cache.

/// This node's memory: RAM and swap, in bytes (`None` if unknown).
pub fn node_total() -> Option<(u64, u64)> {
    let info = nix::sys::sysinfo::sysinfo().ok()?;
    Some((info.ram_total(), info.swap_total()))
}

/// Memory left, and what it is measured against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headroom {
    /// Bytes that can still be allocated.
    pub available: u64,
    /// Bytes in all (the node's RAM + swap, or the cgroup's limit).
    pub total: u64,
    /// "the node" or "its memory cgroup".
    pub scope: &'static str,
}

impl Headroom {
    /// True when so little is left that the next allocations may end the
    /// process: below 1/64 of the total, at most 64 MiB.
    pub fn exhausted(&self) -> bool {
        self.available < (self.total / 64).min(64 << 20)
    }
}

/// The tighter of the node's and the cgroup's headroom (`None` if
/// neither can be read).
pub fn headroom() -> Option<Headroom> {
    let node = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| node_headroom(&text));
    let cgroup = cgroup_headroom();
    match (node, cgroup) {
        (Some(n), Some(c)) => Some(if c.available < n.available { c } else { n }),
        (n, c) => n.or(c),
    }
}

fn meminfo_bytes(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib << 10)
}

fn node_headroom(meminfo: &str) -> Option<Headroom> {
    let available = meminfo_bytes(meminfo, "MemAvailable:")?;
    let swap_free = meminfo_bytes(meminfo, "SwapFree:").unwrap_or(0);
    let total =
        meminfo_bytes(meminfo, "MemTotal:")? + meminfo_bytes(meminfo, "SwapTotal:").unwrap_or(0);
    Some(Headroom {
        available: available + swap_free,
        total,
        scope: "the node",
    })
}

fn stat_value(stat: &str, key: &str) -> Option<u64> {
    stat.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The room left in the process's memory cgroup, if it has a limit: its
/// usage (anonymous and shared memory, kernel memory such as page tables)
/// less the file cache, which the kernel reclaims before it kills.
fn cgroup_headroom() -> Option<Headroom> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let read = |path: String| std::fs::read_to_string(path).ok();
    let number = |path: String| -> Option<u64> { read(path)?.trim().parse().ok() };
    for line in membership.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        // (limit, usage, memory.stat, the prefix of its hierarchical keys)
        let (limit, usage, stat, prefix) = if controllers.split(',').any(|c| c == "memory") {
            let dir = format!("/sys/fs/cgroup/memory{path}");
            (
                number(format!("{dir}/memory.limit_in_bytes"))?,
                number(format!("{dir}/memory.usage_in_bytes"))?,
                read(format!("{dir}/memory.stat"))?,
                "total_",
            )
        } else if controllers.is_empty() && line.starts_with("0::") {
            let dir = format!("/sys/fs/cgroup{path}");
            let Some(max) = read(format!("{dir}/memory.max")) else {
                continue;
            };
            (
                max.trim().parse().ok()?, // "max": no limit
                number(format!("{dir}/memory.current"))?,
                read(format!("{dir}/memory.stat"))?,
                "",
            )
        } else {
            continue;
        };
        let file = ["active_file", "inactive_file"]
            .iter()
            .filter_map(|key| stat_value(&stat, &format!("{prefix}{key}")))
            .sum::<u64>();
        return cgroup_room(limit, usage.saturating_sub(file));
    }
    None
}

fn cgroup_room(limit: u64, used: u64) -> Option<Headroom> {
    // cgroup v1 writes "no limit" as a huge number.
    (limit < 1 << 60).then(|| Headroom {
        available: limit.saturating_sub(used),
        total: limit,
        scope: "its memory cgroup",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_memory_is_read_from_meminfo() {
        let text = "MemTotal:       16000000 kB\nMemFree: 1 kB\nMemAvailable:    1000 kB\nSwapTotal: 2000 kB\nSwapFree: 500 kB\n";
        let h = node_headroom(text).unwrap();
        assert_eq!((h.available, h.total), (1500 << 10, 16_002_000 << 10));
        assert!(h.exhausted(), "1.5 MiB left of 16 GB");
        assert!(!Headroom {
            available: 1 << 30,
            ..h
        }
        .exhausted());
        assert_eq!(stat_value("anon 5\nshmem 7\n", "shmem"), Some(7));
        assert_eq!(cgroup_room(u64::MAX / 2, 1), None, "no limit");
        assert_eq!(cgroup_room(100, 150).map(|h| h.available), Some(0));
        assert!(headroom().is_some(), "this machine's memory is readable");
    }
}
