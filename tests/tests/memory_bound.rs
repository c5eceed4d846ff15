//! The memory bound, enforced by the kernel: 4 ranks, each in its own memory
//! cgroup capped at 1 GiB with no swap, hold and read 3 GiB of shared data
//! (`bigspace 3G`, a 1 TiB space, a 128 MiB cache per rank). Every page is
//! checked, no cgroup saw an OOM, and every cgroup's peak stays under the cap.
//!
//! And the kernel's OOM killer named: a rank that outgrows its cgroup with
//! memory of its own is reported by dsmexec as killed, likely out of memory.
//!
//! Needs root (skipped otherwise); cgroup v1 or v2. With
//! DSM_TEST_REQUIRE_CGROUP=1 a missing root or memory cgroup is a failure.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dsm_tests::{assert_no_leftovers, bin, dsmexec, run, short_hostname, unique_token};

const RANKS: usize = 4;
const CAP: u64 = 1 << 30;
const TOTAL: u64 = 3 << 30;
const JOB_LIMIT: Duration = Duration::from_secs(300);

fn required() -> bool {
    std::env::var("DSM_TEST_REQUIRE_CGROUP").is_ok_and(|v| v == "1")
}

/// Skips (or fails when required) with `why`.
fn skip(why: &str) {
    assert!(!required(), "{why}, and DSM_TEST_REQUIRE_CGROUP=1");
    eprintln!("SKIPPED: memory_bound: {why}");
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Version {
    V1,
    V2,
}

/// A mounted memory hierarchy: its version, mount point, and the test
/// process's own cgroup in it.
struct Hierarchy {
    version: Version,
    mount: PathBuf,
    own: PathBuf,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(digits, 8) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The memory hierarchy: v2 when a cgroup2 mount offers the memory
/// controller, otherwise the v1 memory mount.
fn find_hierarchy() -> Result<Hierarchy, String> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let own = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let mut v1 = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        if left.len() < 5 || right.len() < 3 {
            continue;
        }
        let (root, mount) = (unescape(left[3]), PathBuf::from(unescape(left[4])));
        let found = match right[0] {
            "cgroup2" => {
                let controllers =
                    fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
                if !controllers.split_whitespace().any(|c| c == "memory") {
                    continue;
                }
                own.lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .map(|path| Hierarchy {
                        version: Version::V2,
                        own: in_mount(&mount, &root, path),
                        mount,
                    })
            }
            "cgroup" if right[2].split(',').any(|o| o == "memory") => own
                .lines()
                .find_map(|l| {
                    let mut fields = l.splitn(3, ':');
                    let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
                    controllers
                        .split(',')
                        .any(|c| c == "memory")
                        .then(|| in_mount(&mount, &root, path))
                })
                .map(|own| Hierarchy {
                    version: Version::V1,
                    mount,
                    own,
                }),
            _ => continue,
        };
        match found {
            Some(h) if h.version == Version::V2 => return Ok(h),
            Some(h) => v1 = v1.or(Some(h)),
            None => {}
        }
    }
    v1.ok_or_else(|| {
        "no memory cgroup hierarchy is mounted (neither a cgroup2 mount offering `memory` nor a v1 memory mount)"
            .to_string()
    })
}

/// A cgroup's directory: the mount point plus its path below the mount's root.
fn in_mount(mount: &Path, root: &str, path: &str) -> PathBuf {
    let below = if root == "/" {
        Some(path)
    } else {
        path.strip_prefix(root)
    };
    match below {
        Some(rel) => mount.join(rel.trim_start_matches('/')),
        // Our cgroup is outside what is mounted here: use the mount's root.
        None => mount.to_path_buf(),
    }
}

fn swap_on() -> bool {
    fs::read_to_string("/proc/swaps").is_ok_and(|s| s.lines().count() > 1)
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    fs::write(path, value).map_err(|e| format!("cannot write {value:?} to {}: {e}", path.display()))
}

fn read_u64(path: &Path) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    let text = text.trim();
    if text == "max" {
        return Some(u64::MAX);
    }
    text.parse().ok()
}

/// `key value` lines (memory.events, memory.oom_control).
fn read_keyed(path: &Path, key: &str) -> Option<u64> {
    fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Our cgroups: `top` (under the test's own cgroup, or the hierarchy's
/// root) and one child per rank. Dropping it removes them, killing any
/// process a failed run left inside.
struct Cgroups {
    version: Version,
    top: PathBuf,
    ranks: Vec<PathBuf>,
}

impl Cgroups {
    /// A cgroup `name` holding one child per rank, each capped at `cap`
    /// bytes without swap.
    fn create(h: &Hierarchy, name: &str, ranks: usize, cap: u64) -> Result<Cgroups, String> {
        let mut reasons = Vec::new();
        for parent in [&h.own, &h.mount] {
            if reasons.iter().any(|(p, _)| p == parent) {
                continue;
            }
            if h.version == Version::V2 {
                // A v2 parent hands out controllers only through its
                // subtree_control (and one holding processes cannot enable
                // them): take a parent whose children already get `memory`.
                let subtree =
                    fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap_or_default();
                if !subtree.split_whitespace().any(|c| c == "memory") {
                    reasons.push((
                        parent.clone(),
                        "its cgroup.subtree_control lacks memory".into(),
                    ));
                    continue;
                }
            }
            let top = parent.join(name);
            if let Err(e) = fs::create_dir(&top) {
                reasons.push((parent.clone(), format!("mkdir: {e}")));
                continue;
            }
            let mut groups = Cgroups {
                version: h.version,
                top,
                ranks: Vec::new(),
            };
            groups.populate(ranks, cap)?;
            return Ok(groups);
        }
        let reasons: Vec<String> = reasons
            .iter()
            .map(|(p, why)| format!("{} ({why})", p.display()))
            .collect();
        Err(format!(
            "cannot create a {:?} memory cgroup under {}",
            h.version,
            reasons.join(" or ")
        ))
    }

    fn populate(&mut self, ranks: usize, cap_bytes: u64) -> Result<(), String> {
        let cap = cap_bytes.to_string();
        if self.version == Version::V2 {
            write(&self.top.join("cgroup.subtree_control"), "+memory")?;
        }
        for rank in 0..ranks {
            let dir = self.top.join(format!("rank{rank}"));
            fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            self.ranks.push(dir.clone());
            match self.version {
                Version::V2 => {
                    write(&dir.join("memory.max"), &cap)?;
                    let swap = dir.join("memory.swap.max");
                    if swap.exists() {
                        write(&swap, "0")?;
                    } else if swap_on() {
                        return Err("swap is on and this kernel has no memory.swap.max to keep a cgroup from using it".into());
                    }
                    if read_u64(&dir.join("memory.max")) != Some(cap_bytes) {
                        return Err(format!("{}/memory.max did not take {cap}", dir.display()));
                    }
                }
                Version::V1 => {
                    write(&dir.join("memory.limit_in_bytes"), &cap)?;
                    // Swap would hide an overrun: memory+swap gets the same cap.
                    let memsw = dir.join("memory.memsw.limit_in_bytes");
                    let memsw_set = memsw.exists() && write(&memsw, &cap).is_ok();
                    let no_swappiness = write(&dir.join("memory.swappiness"), "0").is_ok();
                    if swap_on() && !memsw_set && !no_swappiness {
                        return Err("swap is on and neither memory.memsw.limit_in_bytes nor memory.swappiness can keep a cgroup from using it".into());
                    }
                    if read_u64(&dir.join("memory.limit_in_bytes")) != Some(cap_bytes) {
                        return Err(format!(
                            "{}/memory.limit_in_bytes did not take {cap}",
                            dir.display()
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The tightest limit of the cgroups above ours (their sum must fit it).
    fn limit_above(&self) -> Option<u64> {
        match self.version {
            Version::V1 => read_keyed(&self.top.join("memory.stat"), "hierarchical_memory_limit"),
            Version::V2 => self
                .top
                .ancestors()
                .skip(1)
                .map_while(|dir| read_u64(&dir.join("memory.max")))
                .min(),
        }
    }

    /// The cgroup's peak usage, its OOM events, and a description for the log.
    fn counters(&self, dir: &Path) -> (Option<u64>, Option<u64>, String) {
        match self.version {
            Version::V2 => {
                let events = dir.join("memory.events");
                let peak = read_u64(&dir.join("memory.peak"));
                let oom = read_keyed(&events, "oom");
                let kills = read_keyed(&events, "oom_kill");
                let max = read_keyed(&events, "max");
                let ooms = match (oom, kills) {
                    (Some(a), Some(b)) => Some(a + b),
                    (a, b) => a.or(b),
                };
                let text = format!(
                    "memory.peak {} MiB, memory.events max {max:?} oom {oom:?} oom_kill {kills:?}",
                    peak.map_or("n/a".into(), |p| (p >> 20).to_string())
                );
                (peak, ooms, text)
            }
            Version::V1 => {
                let peak = read_u64(&dir.join("memory.max_usage_in_bytes"));
                let memsw = read_u64(&dir.join("memory.memsw.max_usage_in_bytes"));
                let failcnt = read_u64(&dir.join("memory.failcnt"));
                let control = dir.join("memory.oom_control");
                let kills = read_keyed(&control, "oom_kill");
                let under = read_keyed(&control, "under_oom");
                let text = format!(
                    "memory.max_usage_in_bytes {} MiB (memsw {}), failcnt {failcnt:?}, oom_control oom_kill {kills:?} under_oom {under:?}",
                    peak.map_or("n/a".into(), |p| (p >> 20).to_string()),
                    memsw.map_or("n/a".into(), |p| format!("{} MiB", p >> 20)),
                );
                (peak, kills, text)
            }
        }
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for dir in self.ranks.iter().rev().chain(std::iter::once(&self.top)) {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() >= deadline => {
                        eprintln!("memory_bound: could not remove {}: {e}", dir.display());
                        break;
                    }
                    Err(_) => {
                        // A failed run may have left ranks inside.
                        let procs =
                            fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                        for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                            let _ = nix::sys::signal::kill(
                                nix::unistd::Pid::from_raw(pid),
                                nix::sys::signal::Signal::SIGKILL,
                            );
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        }
    }
}

/// `ranks` memory cgroups capped at `cap` bytes, named after `token`; or
/// `None`, the test skipped (or failed when cgroups are required), when
/// there is no root or no usable memory controller.
fn cgroups_or_skip(token: &str, ranks: usize, cap: u64) -> Option<Cgroups> {
    if !nix::unistd::geteuid().is_root() {
        skip("needs root to create memory cgroups");
        return None;
    }
    let hierarchy = find_hierarchy().map_err(|why| skip(&why)).ok()?;
    Cgroups::create(&hierarchy, token, ranks, cap)
        .map_err(|why| skip(&format!("no usable memory cgroup: {why}")))
        .ok()
}

#[test]
fn four_ranks_in_1_gib_cgroups_hold_and_check_3_gib() {
    let token = unique_token("memcg");
    let Some(groups) = cgroups_or_skip(&token, RANKS, CAP) else {
        return;
    };
    eprintln!(
        "memory_bound: cgroup {:?} {} (one child per rank, {} MiB each, no swap; swap on: {}; limit above: {})",
        groups.version,
        groups.top.display(),
        CAP >> 20,
        swap_on(),
        groups
            .limit_above()
            .filter(|&l| l < 1 << 60)
            .map_or("none".into(), |l| format!("{} MiB", l >> 20))
    );

    // Each rank moves itself into its cgroup, shows where it is, then
    // becomes bigspace (the bootstrap descriptors survive the exec).
    let script =
        r#"echo $$ > "$1/rank$DSM_RANK/cgroup.procs" && cat /proc/self/cgroup && exec "$2" "$3""#;
    let bigspace = bin("bigspace").display().to_string();
    let top = groups.top.display().to_string();
    let total = format!("{}G", TOTAL >> 30);
    let mut command = dsmexec(
        &[
            "-n",
            &RANKS.to_string(),
            "/bin/sh",
            "-c",
            script,
            "sh",
            &top,
            &bigspace,
            &total,
        ],
        &std::env::temp_dir(),
    );
    command
        .env("DSM_SPACE_SIZE", "1T")
        .env("DSM_CACHE_SIZE", "128M");
    let out = run(command, JOB_LIMIT);
    eprintln!(
        "memory_bound: job finished in {:.1?} with {:?}",
        out.elapsed, out.code
    );

    let host = short_hostname();
    let mut peaks = Vec::new();
    for (rank, dir) in groups.ranks.iter().enumerate() {
        let (peak, ooms, text) = groups.counters(dir);
        let rss = out
            .lines_of(rank, &host, "stdout")
            .into_iter()
            .filter_map(|l| {
                let at = l.find("peak RSS ")?;
                Some(format!("{} MiB", l[at..].split(" MiB").next()?))
            })
            .next_back()
            .unwrap_or_else(|| "peak RSS n/a".into());
        eprintln!("memory_bound: rank {rank}: {text}; bigspace's {rss}");
        peaks.push((rank, peak, ooms));
    }

    assert_eq!(out.code, Some(0), "{out:?}");
    for rank in 0..RANKS {
        let cgroup = format!("/{token}/rank{rank}");
        assert!(
            out.lines_of(rank, &host, "stdout")
                .iter()
                .any(|l| l.ends_with(&cgroup)),
            "rank {rank} did not run in {cgroup}: {out:?}"
        );
    }
    let pages = TOTAL / 4096;
    let reader = out.lines_of(RANKS - 1, &host, "stdout");
    for line in reader.iter().filter(|l| l.starts_with("bigspace")) {
        eprintln!("memory_bound: rank {}: {line}", RANKS - 1);
    }
    assert!(
        reader.iter().any(|l| l.starts_with(&format!(
            "bigspace exact: rank {} checked {pages} pages ",
            RANKS - 1
        ))),
        "{out:?}"
    );
    for (rank, peak, ooms) in peaks {
        assert_eq!(ooms, Some(0), "rank {rank}'s cgroup saw an OOM: {out:?}");
        if let Some(peak) = peak {
            assert!(peak <= CAP, "rank {rank}'s cgroup peaked at {peak} B");
        }
    }
}

/// Rank 1 of 2, in a 256 MiB cgroup, allocates private memory until the
/// kernel's OOM killer ends it: dsmexec reports it as killed by SIGKILL,
/// likely out of memory, and the job ends.
#[test]
fn a_rank_killed_by_the_oom_killer_is_reported_as_out_of_memory() {
    const OOM_RANKS: usize = 2;
    const OOM_CAP: u64 = 256 << 20;
    let token = unique_token("oom");
    let Some(groups) = cgroups_or_skip(&token, OOM_RANKS, OOM_CAP) else {
        return;
    };
    let script = r#"echo $$ > "$1/rank$DSM_RANK/cgroup.procs" && exec "$2" hog 1 "$1""#;
    let top = groups.top.display().to_string();
    let command = dsmexec(
        &[
            "-n",
            &OOM_RANKS.to_string(),
            "/bin/sh",
            "-c",
            script,
            "sh",
            &top,
            &bin("dsmfault").display().to_string(),
        ],
        &std::env::temp_dir(),
    );
    let out = run(command, Duration::from_secs(120));
    let host = short_hostname();
    let (_, ooms, text) = groups.counters(&groups.ranks[1]);
    eprintln!("memory_bound: the hog's cgroup: {text}");
    assert_eq!(out.code, Some(137), "{out:?}");
    let expected = format!(
        "dsmexec: rank 1 (host {host}) was killed by signal 9 (SIGKILL), likely out of memory: the kernel's OOM killer ran on "
    );
    assert!(
        out.launcher_messages()
            .first()
            .is_some_and(|m| m.starts_with(&expected)),
        "expected a first line starting {expected:?}\n{out:?}"
    );
    assert!(ooms.unwrap_or(1) > 0, "the cgroup saw no OOM: {text}");
    assert_no_leftovers(&token, Duration::from_secs(10));
    drop(groups);
}
