//! Who a job runs as and within what limits. A worker started as root runs
//! jobs as an unprivileged user (`nobody` unless `worker.run_as` names
//! another; `run_as = "root"` is the explicit opt-in to keep root). Jobs get
//! kernel-enforced limits (rlimits): open files and processes are set on the
//! worker process at start and inherited by every job at no cost per job;
//! CPU seconds and address space, which would bind the worker too, are set
//! per job by util-linux `prlimit` just before the shell starts. Each run
//! gets a working directory of its own, removed afterwards.

use std::path::{Path, PathBuf};

use nix::sys::resource::Resource;
use nix::unistd::{Gid, Uid, User};
use taskhost_common::config::WorkerSettings;
use taskhost_common::startup::StartupError;
use uuid::Uuid;

/// The user a root worker runs jobs as when `worker.run_as` is empty.
pub const DEFAULT_USER: &str = "nobody";

/// How every job of this worker runs.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// Switch to this user and group (None: stay who the worker is).
    pub ids: Option<(u32, u32)>,
    /// The user's name, for logs and `$USER`.
    pub user: String,
    /// `prlimit` options (empty: no wrapper).
    pub limits: Vec<String>,
    /// The program that applies them (util-linux `prlimit`).
    pub prlimit: Option<PathBuf>,
    /// util-linux `setpriv`, which switches to [`Sandbox::ids`] in front of
    /// the shell, so the worker itself can start the job with a cheap
    /// `posix_spawn` (a user switch in the spawn would fork the worker).
    pub setpriv: Option<PathBuf>,
    /// Limits set on the worker process itself at start, so every job
    /// inherits them at no cost per job: open files, and processes when
    /// jobs run as another user (the count is per user, and root ignores
    /// it).
    pub inherited: Vec<(Resource, u64, &'static str)>,
    /// Where each job's working directory is made.
    pub work_root: PathBuf,
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/bin".into(), "/bin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

impl Sandbox {
    /// Works out the sandbox from the settings, or says why it cannot.
    pub fn from_settings(w: &WorkerSettings) -> Result<Self, StartupError> {
        let me = Uid::effective();
        let wanted = if w.run_as.is_empty() {
            if me.is_root() {
                DEFAULT_USER.to_owned()
            } else {
                String::new()
            }
        } else {
            w.run_as.clone()
        };
        let (ids, user) = if wanted.is_empty() || (wanted == "root" && me.is_root()) {
            let name = User::from_uid(me)
                .ok()
                .flatten()
                .map_or_else(|| me.to_string(), |u| u.name);
            (None, name)
        } else {
            let u = User::from_name(&wanted).ok().flatten().ok_or_else(|| {
                StartupError(format!(
                    "worker.run_as names user {wanted:?}, which does not exist on this machine"
                ))
            })?;
            if u.uid == me {
                (None, u.name)
            } else if !me.is_root() {
                return Err(StartupError(format!(
                    "worker.run_as = {wanted:?} needs a worker started as root (this one runs as uid {me})"
                )));
            } else {
                (Some((u.uid.as_raw(), u.gid.as_raw())), u.name)
            }
        };
        let mut limits = Vec::new();
        // CPU: SIGXCPU at the limit (recorded as such), SIGKILL a second
        // later if the job catches it.
        if w.job_cpu_secs > 0 {
            let soft = w.job_cpu_secs;
            limits.push(format!("--cpu={soft}:{}", soft + 1));
        }
        let mut add = |option: &str, value: u64| {
            if value > 0 {
                limits.push(format!("--{option}={value}:{value}"));
            }
        };
        add("as", w.job_memory_mb.saturating_mul(1024 * 1024));
        let mut inherited = Vec::new();
        if w.job_max_files > 0 {
            inherited.push((Resource::RLIMIT_NOFILE, w.job_max_files, "open files"));
        }
        if w.job_max_processes > 0 && ids.is_some() {
            inherited.push((Resource::RLIMIT_NPROC, w.job_max_processes, "processes"));
        }
        let prlimit = if limits.is_empty() {
            None
        } else {
            Some(find_program("prlimit").ok_or_else(|| {
                StartupError(
                    "the worker.job_* limits need `prlimit` (util-linux) on the PATH; install it \
                     or set the limits to 0"
                        .into(),
                )
            })?)
        };
        let work_root = if w.work_dir.is_empty() {
            std::env::temp_dir().join("taskhost-jobs")
        } else {
            PathBuf::from(&w.work_dir)
        };
        std::fs::create_dir_all(&work_root).map_err(|e| {
            StartupError(format!(
                "cannot create worker.work_dir {}: {e}",
                work_root.display()
            ))
        })?;
        let setpriv = ids.and_then(|_| find_program("setpriv"));
        Ok(Self {
            ids,
            user,
            limits,
            prlimit,
            setpriv,
            inherited,
            work_root,
        })
    }

    /// Sets the [`Sandbox::inherited`] limits on this process (soft and
    /// hard, so a job cannot raise them again).
    pub fn apply_inherited(&self) -> Result<(), StartupError> {
        for (resource, value, what) in &self.inherited {
            // Only ever lowered: a limit already below (set by the operator,
            // or by another worker in the same process) stays.
            let (_, hard) = nix::sys::resource::getrlimit(*resource)
                .map_err(|e| StartupError(format!("cannot read the {what} limit: {e}")))?;
            let value = (*value).min(hard);
            nix::sys::resource::setrlimit(*resource, value, value).map_err(|e| {
                StartupError(format!("cannot limit the jobs' {what} to {value}: {e}"))
            })?;
        }
        Ok(())
    }

    /// One line for the start-up log.
    pub fn describe(&self) -> String {
        let mut all: Vec<String> = self
            .inherited
            .iter()
            .map(|(_, v, what)| format!("{what} ≤ {v}"))
            .collect();
        all.extend(self.limits.iter().cloned());
        let limits = if all.is_empty() {
            "no limits".to_owned()
        } else {
            all.join(", ")
        };
        format!(
            "jobs run as {} with {limits}, each in its own directory under {}",
            self.user,
            self.work_root.display()
        )
    }

    /// The user switch the spawn itself must make: only when `setpriv` is
    /// not there to make it.
    pub fn spawn_ids(&self) -> Option<(u32, u32)> {
        if self.setpriv.is_some() {
            None
        } else {
            self.ids
        }
    }

    /// Makes the working directory of one run, owned by the job's user.
    pub fn make_dir(&self, job_id: Uuid, attempt: i32) -> std::io::Result<PathBuf> {
        let dir = self.work_root.join(format!("{job_id}-{attempt}"));
        std::fs::create_dir_all(&dir)?;
        if let Some((uid, gid)) = self.ids {
            nix::unistd::chown(&dir, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
                .map_err(std::io::Error::from)?;
        }
        Ok(dir)
    }

    /// Removes a run's working directory and whatever the job left in it.
    pub fn remove_dir(dir: &Path) {
        if let Err(error) = std::fs::remove_dir_all(dir)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(%error, dir = %dir.display(), "could not remove a job's directory");
        }
    }

    /// The program and arguments that run `command` with `shell` inside
    /// the limits.
    pub fn argv(&self, shell: &[String], command: &str) -> Vec<String> {
        let mut argv = Vec::new();
        if let (Some(p), Some((uid, gid))) = (&self.setpriv, self.ids) {
            argv.push(p.display().to_string());
            argv.push(format!("--reuid={uid}"));
            argv.push(format!("--regid={gid}"));
            argv.push("--clear-groups".into());
            argv.push("--".into());
        }
        if let Some(p) = &self.prlimit {
            argv.push(p.display().to_string());
            argv.extend(self.limits.iter().cloned());
            argv.push("--".into());
        }
        argv.extend(shell.iter().cloned());
        argv.push(command.to_owned());
        argv
    }
}
