//! The worker's own process, read from /proc: the stats sent with every
//! heartbeat and the `diagnostics` inline command.

use std::time::Instant;

use serde::Serialize;

/// A snapshot of this process.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessReport {
    /// Process id.
    pub pid: u32,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// Virtual size, bytes.
    pub virtual_bytes: u64,
    /// Threads.
    pub threads: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// Direct child processes.
    pub child_processes: u64,
    /// CPU time used, seconds (user + system).
    pub cpu_seconds: f64,
    /// Seconds since the worker started.
    pub uptime_seconds: f64,
}

fn status_field(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Clock ticks per second of /proc/*/stat times (USER_HZ is 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

fn stat_fields(pid: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let after = stat.rsplit_once(')')?.1;
    Some(after.split_whitespace().map(str::to_owned).collect())
}

fn count_children(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let me = pid.to_string();
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            stat_fields(&e.file_name().to_string_lossy())
                // After ')': state, ppid, ...
                .is_some_and(|f| f.get(1).is_some_and(|ppid| *ppid == me))
        })
        .count() as u64
}

/// Reads this process's report.
pub fn report(started: Instant) -> ProcessReport {
    let pid = std::process::id();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cpu_seconds = stat_fields("self")
        .map(|f| {
            // Fields 14 and 15 (utime, stime) are at 11 and 12 after ')'.
            let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            (t(11) + t(12)) / TICKS_PER_SECOND
        })
        .unwrap_or(0.0);
    let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    ProcessReport {
        pid,
        rss_bytes: status_field(&status, "VmRSS:") * 1024,
        virtual_bytes: status_field(&status, "VmSize:") * 1024,
        threads: status_field(&status, "Threads:"),
        open_fds,
        child_processes: count_children(pid),
        cpu_seconds,
        uptime_seconds: started.elapsed().as_secs_f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_reads_this_process() {
        let r = report(Instant::now());
        assert_eq!(r.pid, std::process::id());
        assert!(r.rss_bytes > 0);
        assert!(r.virtual_bytes >= r.rss_bytes);
        assert!(r.threads >= 1);
        assert!(r.open_fds >= 3);
    }
}
