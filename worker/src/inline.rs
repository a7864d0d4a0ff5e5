//! The built-in commands of `inline` mode, run inside the worker process:
//! `noop` and `diagnostics` (this process's memory, threads, descriptors
//! and children). They return at once, so the store runs them inside the
//! transaction that claims them.

use std::time::Instant;

use crate::exec::{Ending, Outcome};
use crate::{Ctx, procinfo, running_count};

/// Runs one built-in command. `ctx` is None only while the worker is still
/// starting, when `diagnostics` reports the process without its slots.
pub(crate) fn run(ctx: Option<&Ctx>, command: &str) -> Outcome {
    let started_at = chrono::Utc::now();
    let clock = Instant::now();
    let (code, stdout, stderr) = match command.trim() {
        "noop" => (0, Vec::new(), Vec::new()),
        "diagnostics" => {
            let body = match ctx {
                Some(ctx) => serde_json::json!({
                    "nodeId": ctx.node_id,
                    "nodeName": ctx.node_name,
                    "process": procinfo::report(ctx.started),
                    "runningJobs": running_count(ctx),
                    "freePoolSlots": ctx.pool_slots.available_permits(),
                    "freeBackgroundSlots": ctx.background_slots.available_permits(),
                }),
                None => serde_json::json!({ "process": procinfo::report(clock) }),
            };
            let mut text = serde_json::to_vec_pretty(&body).unwrap_or_default();
            text.push(b'\n');
            (0, text, Vec::new())
        }
        other => (
            127,
            Vec::new(),
            format!("unknown inline command `{other}`\n").into_bytes(),
        ),
    };
    Outcome {
        ending: Ending::Exited,
        exit_code: Some(code),
        stdout,
        stderr,
        truncated: false,
        overran: false,
        started_at,
        duration: clock.elapsed(),
    }
}
