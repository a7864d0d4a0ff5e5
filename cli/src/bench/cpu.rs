//! Where the CPU went during a measured phase, read from `/proc`: this
//! process (the in-process services and the bench's own client), the job
//! processes it started (`sh -c ...`, counted when reaped), Postgres (every
//! `postgres` process, with the backends that exited counted through the
//! postmaster) and RabbitMQ (`beam.smp`), beside the machine's busy share.
//! On a 2-core machine every part competes for the same cores, so a phase
//! with the machine near 100 % busy is bounded by the sum of these costs.

use std::time::Instant;

/// Clock ticks per second of `/proc` times: Linux's `USER_HZ`, which is
/// part of its user ABI (100 on every architecture it exports to `/proc`).
const TICKS_PER_SEC: f64 = 100.0;

/// CPU seconds read at one moment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuSnap {
    at: Instant,
    own: f64,
    children: f64,
    postgres: f64,
    broker: f64,
    busy: f64,
    all: f64,
}

/// CPU use between two snapshots.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuUse {
    /// Wall seconds.
    pub(crate) secs: f64,
    /// CPU seconds of this process (services and bench client).
    pub(crate) own: f64,
    /// CPU seconds of reaped child processes (the jobs' shells).
    pub(crate) children: f64,
    /// CPU seconds of Postgres.
    pub(crate) postgres: f64,
    /// CPU seconds of RabbitMQ.
    pub(crate) broker: f64,
    /// Share of the machine's CPU time that was busy, 0..1.
    pub(crate) busy_share: f64,
}

/// utime, stime, cutime, cstime of one `/proc/<pid>/stat`, and its name.
fn proc_times(stat: &str) -> Option<(&str, [f64; 4])> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = &stat[open + 1..close];
    let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let t = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    Some((name, [t(11)?, t(12)?, t(13)?, t(14)?]))
}

/// Busy and total jiffies of the machine (`/proc/stat`'s `cpu` line).
fn machine(stat: &str) -> Option<(f64, f64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is in user).
    let all: f64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).unwrap_or(&0.0);
    Some((all - idle, all))
}

impl CpuSnap {
    /// Reads the counters now. Missing `/proc` entries count as zero.
    pub(crate) fn take() -> Self {
        let hz = TICKS_PER_SEC;
        let (mut own, mut children, mut postgres, mut broker) = (0.0, 0.0, 0.0, 0.0);
        if let Ok(s) = std::fs::read_to_string("/proc/self/stat")
            && let Some((_, t)) = proc_times(&s)
        {
            own = (t[0] + t[1]) / hz;
            children = (t[2] + t[3]) / hz;
        }
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let name = entry.file_name();
                if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                    continue;
                }
                let Ok(s) = std::fs::read_to_string(entry.path().join("stat")) else {
                    continue;
                };
                let Some((comm, t)) = proc_times(&s) else {
                    continue;
                };
                let total = t.iter().sum::<f64>() / hz;
                match comm {
                    "postgres" => postgres += total,
                    "beam.smp" => broker += total,
                    _ => {}
                }
            }
        }
        let (busy, all) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| machine(&s))
            .unwrap_or((0.0, 0.0));
        Self {
            at: Instant::now(),
            own,
            children,
            postgres,
            broker,
            busy,
            all,
        }
    }

    /// What was used from `self` until `later`.
    pub(crate) fn until(&self, later: &CpuSnap) -> CpuUse {
        let all = later.all - self.all;
        CpuUse {
            secs: later.at.duration_since(self.at).as_secs_f64(),
            own: later.own - self.own,
            children: later.children - self.children,
            postgres: (later.postgres - self.postgres).max(0.0),
            broker: (later.broker - self.broker).max(0.0),
            busy_share: if all > 0.0 {
                (later.busy - self.busy) / all
            } else {
                0.0
            },
        }
    }
}

impl CpuUse {
    /// CPU seconds of the four parts together.
    pub(crate) fn total(&self) -> f64 {
        self.own + self.children + self.postgres + self.broker
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_proc_stat_line_whose_name_has_spaces_and_parens() {
        let line = "42 (tokio (rt) x) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 8 0";
        let (name, t) = proc_times(line).expect("parsed");
        assert_eq!(name, "tokio (rt) x");
        assert_eq!(t, [250.0, 50.0, 7.0, 3.0]);
    }

    #[test]
    fn machine_busy_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(machine(stat), Some((150.0, 1000.0)));
    }

    #[test]
    fn a_snapshot_of_this_process_counts_its_own_cpu() {
        let a = CpuSnap::take();
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed().as_millis() < 60 {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let used = a.until(&CpuSnap::take());
        assert!(used.own > 0.0, "{used:?}");
        assert!(used.secs >= 0.06);
    }
}
