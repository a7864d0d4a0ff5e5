//! `taskhost bench` runs end to end on a tiny size and prints its figures as
//! JSON. Each run uses its own database and prefix (dropped at the end).

use std::process::Command;

use serde_json::Value;

fn bench(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_taskhost"))
        .arg("bench")
        .args(args)
        .args(["--skip-probes", "--json"])
        .output()
        .expect("run taskhost bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench {args:?} failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("bench {args:?} printed no JSON ({e}):\n{stdout}\n{stderr}"))
}

fn figure(v: &Value, key: &str) -> f64 {
    v["figures"][key]
        .as_f64()
        .unwrap_or_else(|| panic!("no figure {key} in {v}"))
}

#[test]
fn burn_runs_every_job() {
    let v = bench(&["burn", "--jobs", "50"]);
    assert_eq!(v["scenario"], "burn");
    assert_eq!(figure(&v, "completed"), 50.0, "{v}");
    assert!(figure(&v, "jobs_per_sec") > 0.0, "{v}");
    assert!(figure(&v, "pg_xacts_per_job") > 0.0, "{v}");
    assert!(figure(&v, "work_msgs_per_job") >= 1.0, "{v}");
    assert!(v["targets"]["jobs_per_sec"].is_string(), "{v}");
    // The run's rate beside the CPU ceiling its costs allow, and whether
    // the CPU was what held it.
    let ceiling = figure(&v, "cpu_ceiling_jobs_per_sec");
    let share = figure(&v, "cpu_ceiling_share_pct");
    let rate = figure(&v, "jobs_per_sec");
    assert!((share - rate / ceiling * 100.0).abs() < 1e-6, "{v}");
    let held = v["limit_notes"]["cpu_ceiling_share_pct"]
        .as_str()
        .unwrap_or_default();
    assert!(held.ends_with("% busy)"), "{v}");
}

#[test]
fn http_runs_every_job() {
    let v = bench(&["http", "--jobs", "50"]);
    assert_eq!(figure(&v, "accepted"), 50.0, "{v}");
    assert_eq!(figure(&v, "completed"), 50.0, "{v}");
    assert!(figure(&v, "accepted_per_sec") > 0.0, "{v}");
    assert!(figure(&v, "jobs_per_sec") > 0.0, "{v}");
    assert!(figure(&v, "http_p99_ms") > 0.0, "{v}");
    assert!(figure(&v, "submit_to_start_p50_ms") >= 0.0, "{v}");
}

#[test]
fn schedule_fires_tasks() {
    let v = bench(&["schedule", "--tasks", "5", "--seconds", "5"]);
    // Lateness and misses depend on how loaded the machine is, so they are
    // measured, not asserted; a fire time firing twice is a bug anywhere.
    assert!(figure(&v, "fired") > 0.0, "{v}");
    assert!(figure(&v, "expected") > 0.0, "{v}");
    figure(&v, "missed");
    assert_eq!(figure(&v, "doubled"), 0.0, "{v}");
    figure(&v, "lateness_p99_ms");
    // What the firing cost, per job fired, and how near the CPU's ceiling.
    assert!(figure(&v, "cpu_ceiling_jobs_per_sec") > 0.0, "{v}");
    figure(&v, "cpu_ceiling_share_pct");
}

#[test]
fn suite_runs_every_scenario_and_writes_its_table_into_the_readme() {
    let dir = std::env::temp_dir().join(format!("taskhost-suite-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let readme = dir.join("README.md");
    let begin = "<!-- bench suite: begin (written by `taskhost bench suite --readme`) -->";
    let end = "<!-- bench suite: end -->";
    std::fs::write(
        &readme,
        format!("# Notes\nkept above\n{begin}\nan old table\n{end}\nkept below\n"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_taskhost"))
        .args(["bench", "suite", "--quick", "--skip-probes", "--readme"])
        .arg(&readme)
        .output()
        .expect("run taskhost bench suite");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench suite failed:\n{stderr}");
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let written = std::fs::read_to_string(&readme).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    // What it printed is what it wrote, between the markers; the rest of
    // the file is as it was.
    assert!(
        written.starts_with(&format!("# Notes\nkept above\n{begin}\n")),
        "{written}"
    );
    assert!(
        written.ends_with(&format!("\n{end}\nkept below\n")),
        "{written}"
    );
    assert!(!written.contains("an old table"), "{written}");
    assert!(
        written.contains(table.trim_end()),
        "{written}\n---\n{table}"
    );

    // One run per command of the README's list, each with its figures.
    let row = |cmd: &str| -> Vec<String> {
        let line = table
            .lines()
            .find(|l| l.starts_with(&format!("| `{cmd}` |")))
            .unwrap_or_else(|| panic!("no row for `{cmd}`:\n{table}"));
        line.trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_owned())
            .collect()
    };
    for cmd in [
        "burn",
        "burn --prefetch 1000 --jobs 10000",
        "burn --mode pool --command 'echo job-{n}'",
        "burn --mode pool --slots 256 --prefetch 1000 --command 'echo job-{n}'",
        "http --no-workers",
        "http --prefetch 256",
        "queue --prefetch 256",
        "latency --prefetch 256",
        "schedule --tasks 1000",
    ] {
        let cells = row(cmd);
        // measured, then the CPU ceiling and the share of it reached.
        let measured: f64 = cells[2]
            .split(' ')
            .next()
            .unwrap()
            .replace(',', "")
            .parse()
            .unwrap_or_else(|e| panic!("`{cmd}` measured {:?}: {e}\n{table}", cells[2]));
        assert!(measured >= 0.0, "{table}");
        assert_eq!(cells.len(), 11, "`{cmd}`: {cells:?}");
        assert!(
            cells[7].ends_with("jobs/s"),
            "`{cmd}` ceiling {:?}\n{table}",
            cells[7]
        );
        assert!(
            cells[8].ends_with('%'),
            "`{cmd}` reached {:?}\n{table}",
            cells[8]
        );
    }
    assert_eq!(row("burn")[3], "≥ 8,000");
    // A fire time firing twice is a bug on any machine.
    let twice = table
        .lines()
        .find(|l| l.contains("| fired twice |"))
        .unwrap_or_else(|| panic!("no fired-twice row:\n{table}"));
    assert!(twice.contains("| 0 | ≤ 0 | yes |"), "{twice}");
}
