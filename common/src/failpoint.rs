//! Failpoints for the fault tests: named places in the code where a test
//! can make a process crash, freeze or skip a step at exactly the worst
//! moment (between a commit and its answer, between a publish and its
//! mark). They exist only in debug builds (the test builds); a release
//! build compiles every [`hit`] to `false`.
//!
//! A test turns them on for one child process with
//! `TASKHOST_FAILPOINTS=<name>=<action>[,<name>=<action>...]`, where the
//! action is `abort` (die at once, like SIGKILL: nothing after it runs),
//! `stop` (the process stops itself with SIGSTOP, the first time only, as
//! if frozen mid-step; the test sends SIGCONT) or `skip` (the caller skips
//! the step; [`hit`] returns true).

/// The environment variable that lists active failpoints.
pub const FAILPOINTS_ENV: &str = "TASKHOST_FAILPOINTS";

/// Passes the failpoint `name`: aborts or stops the process when the test
/// asked for it; returns true when the caller should skip its step.
#[cfg(debug_assertions)]
pub fn hit(name: &str) -> bool {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicBool, Ordering};

    static ACTIVE: OnceLock<Vec<(String, String)>> = OnceLock::new();
    static STOPPED: AtomicBool = AtomicBool::new(false);
    let active = ACTIVE.get_or_init(|| {
        std::env::var(FAILPOINTS_ENV)
            .unwrap_or_default()
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .map(|(n, a)| (n.trim().to_owned(), a.trim().to_owned()))
            .collect()
    });
    let Some((_, action)) = active.iter().find(|(n, _)| n == name) else {
        return false;
    };
    match action.as_str() {
        "abort" => {
            eprintln!("failpoint {name}: aborting");
            std::process::abort();
        }
        "stop" => {
            if !STOPPED.swap(true, Ordering::SeqCst) {
                eprintln!("failpoint {name}: stopping (SIGSTOP)");
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
            }
            false
        }
        "skip" => true,
        _ => false,
    }
}

/// Release builds have no failpoints.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn hit(_name: &str) -> bool {
    false
}
