//! How many CPUs this process may really use.
//!
//! `os.cpu_count()` reports the machine's CPUs, which over-subscribes containers, `taskset`
//! jobs and Slurm allocations. The usable count is the smallest of:
//!
//! - the CPU affinity mask (`sched_getaffinity`),
//! - the cgroup CPU quota (v2 `cpu.max`, or v1 `cpu.cfs_quota_us / cpu.cfs_period_us`),
//!   rounded up, since a quota of 1.5 CPUs still lets two workers make progress,
//! - a Slurm allocation (`SLURM_CPUS_PER_TASK`, else `SLURM_CPUS_ON_NODE`).
//!
//! The parsing functions take text rather than paths so they can be tested without a cgroup.

use std::path::{Path, PathBuf};

/// Number of CPUs in this process's affinity mask, or `None` if it cannot be read.
pub fn affinity_cpus() -> Option<usize> {
    // SAFETY: `cpu_set_t` is plain data, zero is a valid value, and sched_getaffinity writes at
    // most `size_of::<cpu_set_t>()` bytes into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        let n = libc::CPU_COUNT(&set);
        (n > 0).then_some(n as usize)
    }
}

/// Parses cgroup v2 `cpu.max` ("max 100000" or "150000 100000") into a CPU count.
pub fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut parts = text.split_whitespace();
    let quota = parts.next()?;
    let period: f64 = parts.next().map_or(Some(100_000.0), |p| p.parse().ok())?;
    if quota == "max" || period <= 0.0 {
        return None;
    }
    let quota: f64 = quota.parse().ok()?;
    (quota > 0.0).then(|| quota / period)
}

/// Parses cgroup v1 `cpu.cfs_quota_us` and `cpu.cfs_period_us` into a CPU count.
pub fn parse_cfs(quota: &str, period: &str) -> Option<f64> {
    let quota: f64 = quota.trim().parse().ok()?;
    let period: f64 = period.trim().parse().ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

/// Finds the CPU quota of the cgroup this process belongs to.
///
/// `proc_self_cgroup` is the text of `/proc/self/cgroup`; `read` reads a file below the cgroup
/// mount (`mount` is usually `/sys/fs/cgroup`). Both v2 (unified) and v1 (`cpu` controller)
/// hierarchies are tried, and every ancestor is checked, because a quota set on a parent cgroup
/// limits its children too.
pub fn cgroup_cpus(
    proc_self_cgroup: &str,
    mount: &Path,
    read: &dyn Fn(&Path) -> Option<String>,
) -> Option<f64> {
    let mut best: Option<f64> = None;
    let mut consider = |v: Option<f64>| {
        if let Some(v) = v {
            best = Some(best.map_or(v, |b: f64| b.min(v)));
        }
    };
    for line in proc_self_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = match (fields.next(), fields.next(), fields.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => continue,
        };
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            // cgroup v2: walk from the process's cgroup up to the root.
            for dir in ancestors(&mount.join(rel), mount) {
                consider(read(&dir.join("cpu.max")).and_then(|t| parse_cpu_max(&t)));
            }
        } else if controllers.split(',').any(|c| c == "cpu") {
            for base in [
                mount.join("cpu"),
                mount.join("cpu,cpuacct"),
                mount.join("cpuacct,cpu"),
            ] {
                for dir in ancestors(&base.join(rel), &base) {
                    let quota = read(&dir.join("cpu.cfs_quota_us"));
                    let period = read(&dir.join("cpu.cfs_period_us"));
                    if let (Some(q), Some(p)) = (quota, period) {
                        consider(parse_cfs(&q, &p));
                    }
                }
            }
        }
    }
    best
}

fn ancestors(start: &Path, stop: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut cur = Some(start);
    while let Some(dir) = cur {
        out.push(dir.to_path_buf());
        if dir == stop || !dir.starts_with(stop) {
            break;
        }
        cur = dir.parent();
    }
    out
}

/// CPUs granted by a Slurm allocation, from its environment variables.
pub fn slurm_cpus(get: &dyn Fn(&str) -> Option<String>) -> Option<usize> {
    for name in ["SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"] {
        if let Some(n) = get(name).and_then(|v| v.trim().parse::<usize>().ok()) {
            if n > 0 {
                return Some(n);
            }
        }
    }
    None
}

/// Combines the limits: the smallest of affinity, quota (rounded up) and Slurm; at least 1.
pub fn combine(
    affinity: Option<usize>,
    quota: Option<f64>,
    slurm: Option<usize>,
    fallback: usize,
) -> usize {
    let mut n = affinity.unwrap_or(fallback).max(1);
    if let Some(q) = quota {
        n = n.min((q.ceil() as usize).max(1));
    }
    if let Some(s) = slurm {
        n = n.min(s);
    }
    n.max(1)
}

/// How long a read of the cgroup quota is reused. Every call that picks a pool size asks for
/// the CPU count, and walking the cgroup tree costs tens of microseconds (several files per
/// ancestor), a share of a small `map`; a quota changed at run time is seen a second later.
const QUOTA_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// The cgroup CPU quota of this process, read at most once per [`QUOTA_TTL`].
fn cgroup_quota() -> Option<f64> {
    use std::sync::Mutex;
    use std::time::Instant;
    static CACHE: Mutex<Option<(Instant, Option<f64>)>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((at, quota)) = *cache {
        if at.elapsed() < QUOTA_TTL {
            return quota;
        }
    }
    let quota = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| {
            cgroup_cpus(&text, Path::new("/sys/fs/cgroup"), &|p| {
                std::fs::read_to_string(p).ok()
            })
        });
    *cache = Some((Instant::now(), quota));
    quota
}

/// The number of CPUs this process may use (see the module docs).
///
/// The affinity mask and the Slurm variables are read on every call (one system call, a few
/// environment lookups), so `taskset` and a changed environment apply at once.
pub fn available_cpus() -> usize {
    let affinity = affinity_cpus();
    // The standard library's count reads the cgroup files again: ask only when the affinity
    // mask could not be read.
    let fallback = if affinity.is_some() {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    };
    let slurm = slurm_cpus(&|name| std::env::var(name).ok());
    combine(affinity, cgroup_quota(), slurm, fallback)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn cpu_max_parsing() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("200000 100000\n"), Some(2.0));
        assert_eq!(parse_cpu_max("150000 100000"), Some(1.5));
        assert_eq!(parse_cpu_max("garbage"), None);
        assert_eq!(parse_cpu_max(""), None);
    }

    #[test]
    fn cfs_parsing() {
        assert_eq!(parse_cfs("-1\n", "100000\n"), None);
        assert_eq!(parse_cfs("300000", "100000"), Some(3.0));
    }

    fn fake_fs(files: &[(&str, &str)]) -> impl Fn(&Path) -> Option<String> {
        let map: HashMap<PathBuf, String> = files
            .iter()
            .map(|(p, t)| (PathBuf::from(p), t.to_string()))
            .collect();
        move |p: &Path| map.get(p).cloned()
    }

    #[test]
    fn cgroup_v2_quota_on_a_parent_applies() {
        let read = fake_fs(&[
            ("/sys/fs/cgroup/user.slice/job/cpu.max", "max 100000"),
            ("/sys/fs/cgroup/user.slice/cpu.max", "300000 100000"),
        ]);
        let got = cgroup_cpus("0::/user.slice/job\n", Path::new("/sys/fs/cgroup"), &read);
        assert_eq!(got, Some(3.0));
    }

    #[test]
    fn cgroup_v1_cpu_controller() {
        let read = fake_fs(&[
            (
                "/sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us",
                "50000",
            ),
            (
                "/sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us",
                "100000",
            ),
        ]);
        let text = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n";
        assert_eq!(
            cgroup_cpus(text, Path::new("/sys/fs/cgroup"), &read),
            Some(0.5)
        );
    }

    #[test]
    fn no_cgroup_limit() {
        let read = fake_fs(&[("/sys/fs/cgroup/cpu.max", "max 100000")]);
        assert_eq!(
            cgroup_cpus("0::/\n", Path::new("/sys/fs/cgroup"), &read),
            None
        );
    }

    #[test]
    fn slurm_variables() {
        let env: HashMap<&str, &str> =
            [("SLURM_CPUS_ON_NODE", "8"), ("SLURM_CPUS_PER_TASK", "3")].into();
        assert_eq!(slurm_cpus(&|k| env.get(k).map(|v| v.to_string())), Some(3));
        let env: HashMap<&str, &str> = [("SLURM_CPUS_ON_NODE", "8")].into();
        assert_eq!(slurm_cpus(&|k| env.get(k).map(|v| v.to_string())), Some(8));
        assert_eq!(slurm_cpus(&|_| None), None);
        assert_eq!(slurm_cpus(&|_| Some("zero".into())), None);
    }

    #[test]
    fn combination_takes_the_smallest() {
        assert_eq!(combine(Some(16), Some(2.5), None, 64), 3);
        assert_eq!(combine(Some(16), None, Some(4), 64), 4);
        assert_eq!(combine(None, None, None, 6), 6);
        assert_eq!(combine(Some(2), Some(0.1), None, 6), 1);
    }

    #[test]
    fn real_machine_reports_at_least_one() {
        let n = available_cpus();
        assert!(n >= 1);
        if let Some(a) = affinity_cpus() {
            assert!(n <= a);
        }
    }
}
