//! Who a job runs as and within what limits. A worker started as root runs
//! jobs as an unprivileged user (`nobody` unless `worker.run_as` names
//! another; `run_as = "root"` is the explicit opt-in to keep root). Jobs get
//! kernel-enforced limits (rlimits): open files and processes are set on the
//! worker process at start and inherited by every job at no cost per job;
//! CPU seconds and address space, which would bind the worker too, are set
//! per job by util-linux `prlimit` just before the shell starts. A job's
//! own `limits` can only tighten these: the worker applies min(job,
//! worker) for each limit it has, else the job's value, through the same
//! `prlimit` (for open files and processes too when the job asks for less
//! than the worker's); a job that tightens nothing costs nothing more. Each
//! run starts in an empty working directory of its own, named after the
//! run; afterwards it is emptied and kept as a spare for a later run
//! (renamed, not deleted and made again: see [`Sandbox::make_dir`]).

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sys::resource::Resource;
use nix::unistd::{Gid, Uid, User};
use taskhost_common::config::WorkerSettings;
use taskhost_common::model::JobLimits;
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
    /// `prlimit` wherever it is installed, for the limits a job asks for
    /// (None: not installed; a job that asks for limits is then not run).
    pub prlimit_program: Option<PathBuf>,
    /// `worker.job_cpu_secs` (0: none).
    pub cpu_secs: u64,
    /// `worker.job_memory_mb` (0: none).
    pub memory_mb: u64,
    /// The program in front of the shell that switches to
    /// [`Sandbox::ids`], so the worker itself can start the job with a
    /// cheap `posix_spawn` (a user switch in the spawn would fork the
    /// worker): taskhost's own static launcher, else util-linux `setpriv`.
    pub switcher: Option<Switcher>,
    /// Limits set on the worker process itself at start, so every job
    /// inherits them at no cost per job: open files, and processes when
    /// jobs run as another user (the count is per user, and root ignores
    /// it).
    pub inherited: Vec<(Resource, u64, &'static str)>,
    /// Where each job's working directory is made.
    pub work_root: PathBuf,
    /// Emptied working directories of earlier runs, under
    /// [`Sandbox::work_root`] as `.spare-*`, each ready to be renamed into
    /// the next run's.
    pub spares: Arc<std::sync::Mutex<Vec<PathBuf>>>,
    /// The worker's environment variables every job inherits
    /// (`worker.pass_env`), read once at start; a job's environment is
    /// these, then its own.
    pub env: Vec<(OsString, OsString)>,
}

/// Variables taskhost reads itself: its settings, credentials and keys.
/// They never reach a job, whatever `worker.pass_env` lists.
fn taskhost_own(name: &[u8]) -> bool {
    name.starts_with(b"TASKHOST")
        || taskhost_common::config::BARE_ENV
            .iter()
            .any(|(bare, _, _)| name == bare.as_bytes())
}

/// The variables of `vars` that `pass` (names separated by spaces or
/// commas, `NAME*` a prefix) lets a job inherit, in their order.
fn passed_env(
    pass: &str,
    vars: impl IntoIterator<Item = (OsString, OsString)>,
) -> Vec<(OsString, OsString)> {
    let patterns: Vec<&str> = pass
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|p| !p.is_empty())
        .collect();
    let allowed = |name: &[u8]| {
        patterns.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix.as_bytes()),
            None => name == p.as_bytes(),
        })
    };
    vars.into_iter()
        .filter(|(name, _)| {
            let name = name.as_bytes();
            allowed(name) && !taskhost_own(name)
        })
        .collect()
}

/// Makes this process non-dumpable: its `/proc/<pid>` files (environ,
/// mem, fds) become root's and no process of the same user may attach to
/// it, so a job running as the worker's own user (a worker that is not
/// root, as in the container image) cannot read the database and broker
/// credentials or `secrets.key` out of it. Jobs are not affected: an exec
/// makes a process dumpable again. It also means no core dumps of the
/// worker.
pub fn protect_worker_process() -> Result<(), StartupError> {
    nix::sys::prctl::set_dumpable(false).map_err(|e| {
        StartupError(format!(
            "cannot make the worker process non-dumpable (its jobs could read it): {e}"
        ))
    })
}

/// Prefix of a spare working directory's name (a dot: `ls` leaves them
/// out). The rest is this process's id and a count, so no two processes
/// sharing a `worker.work_dir` name one alike.
const SPARE: &str = ".spare-";

/// Spares and discarded directories named so far by this process.
static SPARE_COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn unique_name(kind: &str) -> String {
    let n = SPARE_COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{kind}{}-{n}", std::process::id())
}

/// The static launcher `worker/build.rs` compiled from
/// `worker/launcher/launch.c` (empty where it could not be built).
const LAUNCHER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/taskhost-launch"));

/// How a root worker switches a job to [`Sandbox::ids`].
#[derive(Debug, Clone)]
pub enum Switcher {
    /// taskhost's launcher (`launch.c`: groups cleared, then gid and uid),
    /// kept in a sealed memfd that is closed in every child and reached as
    /// `/proc/self/fd/N`: no file on disk that anyone could replace. It
    /// has no C library, so it costs next to nothing per job on the
    /// development machine, against 1.2 ms of CPU for `setpriv`.
    Launcher { fd: Arc<OwnedFd>, path: String },
    /// util-linux `setpriv`.
    Setpriv(PathBuf),
}

impl Switcher {
    /// The launcher if this build has it and it works here, else `setpriv`
    /// if installed.
    pub fn find((uid, gid): (u32, u32)) -> Option<Self> {
        match Self::launcher() {
            Ok(launcher) => {
                // Once, so a machine where it cannot run (no /proc, a
                // seccomp policy) falls back instead of failing every job.
                let argv = launcher.prefix((uid, gid));
                let works = std::process::Command::new(&argv[0])
                    .args(&argv[1..])
                    .arg("/bin/sh")
                    .args(["-c", "exit 0"])
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if works {
                    return Some(launcher);
                }
                tracing::warn!("taskhost's job launcher does not run here; using setpriv");
            }
            Err(reason) => tracing::info!(
                reason,
                "taskhost's job launcher is not available; using setpriv"
            ),
        }
        find_program("setpriv").map(Self::Setpriv)
    }

    fn launcher() -> Result<Self, String> {
        use nix::fcntl::{FcntlArg, SealFlag, fcntl};
        use nix::sys::memfd::{MFdFlags, memfd_create};
        if LAUNCHER.is_empty() {
            return Err(
                "this build has none (no C compiler at build time, or not x86-64 or aarch64 Linux)"
                    .into(),
            );
        }
        let fd = memfd_create(
            c"taskhost-launch",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(|e| format!("memfd_create: {e}"))?;
        let mut file = std::fs::File::from(fd);
        std::io::Write::write_all(&mut file, LAUNCHER).map_err(|e| format!("writing it: {e}"))?;
        let fd = OwnedFd::from(file);
        fcntl(
            &fd,
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_WRITE
                    | SealFlag::F_SEAL_SHRINK
                    | SealFlag::F_SEAL_GROW
                    | SealFlag::F_SEAL_SEAL,
            ),
        )
        .map_err(|e| format!("sealing it: {e}"))?;
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        Ok(Self::Launcher {
            fd: Arc::new(fd),
            path,
        })
    }

    /// The arguments in front of the program that switch to `(uid, gid)`.
    pub fn prefix(&self, (uid, gid): (u32, u32)) -> Vec<String> {
        match self {
            Self::Launcher { path, .. } => vec![path.clone(), uid.to_string(), gid.to_string()],
            Self::Setpriv(p) => vec![
                p.display().to_string(),
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".into(),
                "--".into(),
            ],
        }
    }

    /// For the start-up line.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Launcher { .. } => "taskhost's launcher",
            Self::Setpriv(_) => "setpriv",
        }
    }
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
        let prlimit_program = find_program("prlimit");
        let prlimit = if limits.is_empty() {
            None
        } else {
            Some(prlimit_program.clone().ok_or_else(|| {
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
        remove_left_spares(&work_root);
        let switcher = ids.and_then(Switcher::find);
        Ok(Self {
            ids,
            user,
            limits,
            prlimit,
            prlimit_program,
            cpu_secs: w.job_cpu_secs,
            memory_mb: w.job_memory_mb,
            switcher,
            inherited,
            work_root,
            spares: Arc::default(),
            env: passed_env(&w.pass_env, std::env::vars_os()),
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
        let through = self
            .switcher
            .as_ref()
            .map_or_else(String::new, |s| format!(" (through {})", s.name()));
        // Names only: the values may be anything.
        let env = if self.env.is_empty() {
            "nothing".to_owned()
        } else {
            let names: Vec<_> = self.env.iter().map(|(k, _)| k.to_string_lossy()).collect();
            names.join(" ")
        };
        format!(
            "jobs run as {}{through} with {limits}, each in its own directory under {}, \
             inheriting {env} of the worker's environment",
            self.user,
            self.work_root.display()
        )
    }

    /// The user switch the spawn itself must make: only when no
    /// [`Switcher`] is there to make it.
    pub fn spawn_ids(&self) -> Option<(u32, u32)> {
        if self.switcher.is_some() {
            None
        } else {
            self.ids
        }
    }

    /// Makes the working directory of one run, `<job id>-<attempt>` under
    /// [`Sandbox::work_root`], empty and owned by the job's user: a spare
    /// renamed, or a new one. A rename changes one directory's entries;
    /// making and deleting a directory per run allocates and frees an inode
    /// each time, which on this project's machines (ext4 without a journal
    /// scans for inodes not recently deleted) cost 12 % of all CPU in a
    /// shell burn.
    pub fn make_dir(&self, job_id: Uuid, attempt: i32) -> std::io::Result<PathBuf> {
        let dir = self.work_root.join(format!("{job_id}-{attempt}"));
        loop {
            let spare = self.spares.lock().ok().and_then(|mut s| s.pop());
            let Some(spare) = spare else { break };
            match std::fs::rename(&spare, &dir) {
                Ok(()) => return Ok(dir),
                // Another worker sharing the work_dir removed it at its
                // start: take the next.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // The run's name is taken (a directory a killed worker
                // left): keep the spare, and use that directory as before.
                Err(_) => {
                    if let Ok(mut spares) = self.spares.lock() {
                        spares.push(spare);
                    }
                    break;
                }
            }
        }
        std::fs::create_dir_all(&dir)?;
        self.own(&dir)?;
        Ok(dir)
    }

    /// Gives `dir` to the job's user (nothing to do without a user switch).
    fn own(&self, dir: &Path) -> std::io::Result<()> {
        if let Some((uid, gid)) = self.ids {
            nix::unistd::chown(dir, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
                .map_err(std::io::Error::from)?;
        }
        Ok(())
    }

    /// After a run: empties its working directory and keeps it as a spare,
    /// with the owner and mode a new one has; removes it instead when that
    /// fails. Nothing of one run is seen by the next.
    pub fn finish_dir(&self, dir: &Path) {
        match self.recycle(dir) {
            Ok(spare) => {
                if let Ok(mut spares) = self.spares.lock() {
                    spares.push(spare);
                }
            }
            Err(error) => {
                tracing::debug!(%error, dir = %dir.display(), "a job's directory is removed, not kept");
                Self::remove_dir(dir);
            }
        }
    }

    fn recycle(&self, dir: &Path) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        // Only root and the worker can change work_root's entries, so `dir`
        // is still the directory made for the run; inside it the job may
        // have left anything. remove_dir_all never follows a symlink.
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let removed = if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(entry.path())
            } else {
                std::fs::remove_file(entry.path())
            };
            match removed {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        let meta = std::fs::symlink_metadata(dir)?;
        if !meta.is_dir() {
            return Err(std::io::Error::other("not a directory"));
        }
        // The job's user owns it and may have changed its mode.
        if meta.mode() & 0o7777 != NEW_DIR_MODE {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(NEW_DIR_MODE))?;
        }
        if self
            .ids
            .is_some_and(|(uid, gid)| (meta.uid(), meta.gid()) != (uid, gid))
        {
            self.own(dir)?;
        }
        let spare = self.work_root.join(unique_name(SPARE));
        std::fs::rename(dir, &spare)?;
        Ok(spare)
    }

    /// Removes this worker's spares (at its stop).
    pub fn remove_spares(&self) {
        let spares = self
            .spares
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        for spare in spares {
            Self::remove_dir(&spare);
        }
    }

    /// Removes a run's working directory and whatever the job left in it.
    pub fn remove_dir(dir: &Path) {
        if let Err(error) = std::fs::remove_dir_all(dir)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(%error, dir = %dir.display(), "could not remove a job's directory");
        }
    }

    /// The `prlimit` options of one run: the worker's, tightened by the
    /// job's `limits` (min(job, worker) where the worker has a limit, else
    /// the job's). `None` when the job tightens nothing, so the run costs
    /// what any other run of this worker does. Open files and processes are
    /// compared with this process's own (inherited) soft limits.
    pub fn job_options(&self, job: &JobLimits) -> Option<Vec<String>> {
        let tighter =
            |worker: u64, asked: Option<u64>| asked.filter(|&asked| worker == 0 || asked < worker);
        let mut tightened = false;
        let mut options = Vec::new();
        let cpu = tighter(self.cpu_secs, job.cpu_seconds).map_or(self.cpu_secs, |c| {
            tightened = true;
            c
        });
        if cpu > 0 {
            // As for the worker's limit: SIGXCPU at it, SIGKILL a second later.
            options.push(format!("--cpu={cpu}:{}", cpu + 1));
        }
        let memory = tighter(self.memory_mb, job.memory_mb).map_or(self.memory_mb, |m| {
            tightened = true;
            m
        });
        if memory > 0 {
            let bytes = memory.saturating_mul(1024 * 1024);
            options.push(format!("--as={bytes}:{bytes}"));
        }
        for (resource, option, asked) in [
            (Resource::RLIMIT_NOFILE, "nofile", job.max_files),
            (Resource::RLIMIT_NPROC, "nproc", job.max_processes),
        ] {
            let current =
                nix::sys::resource::getrlimit(resource).map_or(u64::MAX, |(soft, _)| soft);
            if let Some(value) = asked.filter(|&v| v < current) {
                options.push(format!("--{option}={value}:{value}"));
                tightened = true;
            }
        }
        tightened.then_some(options)
    }

    /// The program and arguments that run `command` with `shell` inside
    /// the worker's limits, tightened by the job's `limits`; an error when
    /// the job asks for limits this worker cannot apply (no `prlimit`).
    pub fn argv(
        &self,
        shell: &[String],
        command: &str,
        job: Option<&JobLimits>,
    ) -> Result<Vec<String>, String> {
        let per_job = job.and_then(|j| self.job_options(j));
        let wrapper = match &per_job {
            Some(options) => Some((
                self.prlimit_program.as_ref().ok_or_else(|| {
                    "the job's limits need `prlimit` (util-linux) on this worker's PATH".to_owned()
                })?,
                options.as_slice(),
            )),
            None => self.prlimit.as_ref().map(|p| (p, self.limits.as_slice())),
        };
        let mut argv = Vec::new();
        if let (Some(switcher), Some(ids)) = (&self.switcher, self.ids) {
            argv.extend(switcher.prefix(ids));
        }
        if let Some((program, options)) = wrapper {
            argv.push(program.display().to_string());
            argv.extend(options.iter().cloned());
            argv.push("--".into());
        }
        argv.extend(shell.iter().cloned());
        argv.push(command.to_owned());
        Ok(argv)
    }
}

/// The mode of a new working directory, and of a spare.
const NEW_DIR_MODE: u32 = 0o755;

/// Removes the spares a worker left in `work_root` (at its stop, or when
/// it was killed). Each is first renamed to a name of this process's own,
/// so one another worker is just taking (a rename, atomic) is never
/// emptied under its job.
fn remove_left_spares(work_root: &Path) {
    let Ok(entries) = std::fs::read_dir(work_root) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(SPARE) {
            let doomed = work_root.join(unique_name(".removing-"));
            if std::fs::rename(entry.path(), &doomed).is_ok() {
                Sandbox::remove_dir(&doomed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(cpu_secs: u64, memory_mb: u64) -> Sandbox {
        Sandbox {
            ids: None,
            user: "me".into(),
            limits: Vec::new(),
            prlimit: None,
            prlimit_program: Some(PathBuf::from("/usr/bin/prlimit")),
            cpu_secs,
            memory_mb,
            switcher: None,
            inherited: Vec::new(),
            work_root: std::env::temp_dir(),
            spares: Arc::default(),
            env: Vec::new(),
        }
    }

    #[test]
    fn a_job_inherits_only_the_listed_variables_and_never_taskhosts_own() {
        let vars = [
            ("PATH", "/usr/bin:/bin"),
            ("LC_TIME", "de_DE.UTF-8"),
            ("LC_ALL", "C.UTF-8"),
            ("HOSTNAME", "box"),
            ("WORKER_ONLY_SECRET", "hunter2"),
            ("TASKHOST__DATABASE__URL", "postgres://u:pw@db/taskhost"),
            ("TASKHOST_SECRETS_KEY", "c2VjcmV0"),
            ("DATABASE_URL", "postgres://u:pw@db/taskhost"),
            ("AMQP_URL", "amqp://guest:guest@mq"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("TOOL_HOME", "/opt/tool"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let names = |pass: &str| -> Vec<String> {
            passed_env(pass, vars.clone())
                .into_iter()
                .map(|(k, _)| k.to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(
            names(taskhost_common::config::DEFAULT_PASS_ENV),
            ["PATH", "LC_TIME", "LC_ALL"],
            "the default: programs' path and the locale, nothing else"
        );
        assert_eq!(names("TOOL_HOME, PATH"), ["PATH", "TOOL_HOME"]);
        assert!(
            names("* TASKHOST__DATABASE__URL DATABASE_URL AMQP_URL OTEL_* TASKHOST*")
                .iter()
                .all(|n| !n.starts_with("TASKHOST")
                    && !["DATABASE_URL", "AMQP_URL", "OTEL_EXPORTER_OTLP_ENDPOINT"]
                        .contains(&n.as_str())),
            "taskhost's own settings never reach a job, even when listed"
        );
        assert_eq!(names("*").len(), 6, "`*` passes everything else");
        assert!(names("").is_empty());
    }

    #[test]
    fn a_job_only_tightens_the_workers_limits() {
        let none = JobLimits::default();
        assert_eq!(
            sandbox(10, 0).job_options(&none),
            None,
            "no limits: no wrapper"
        );
        let cpu = |c| JobLimits {
            cpu_seconds: Some(c),
            ..Default::default()
        };
        // Tighter than the worker's, or where the worker has none: the job's.
        assert_eq!(
            sandbox(10, 64).job_options(&cpu(2)),
            Some(vec![
                "--cpu=2:3".into(),
                format!("--as={}:{}", 64 << 20, 64 << 20)
            ])
        );
        assert_eq!(
            sandbox(0, 0).job_options(&cpu(5)),
            Some(vec!["--cpu=5:6".into()])
        );
        // Looser: the worker's stays, and the run needs no change.
        assert_eq!(sandbox(10, 0).job_options(&cpu(60)), None);
        let files = JobLimits {
            max_files: Some(16),
            ..Default::default()
        };
        let (soft, _) = nix::sys::resource::getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        if soft > 16 {
            assert_eq!(
                sandbox(0, 0).job_options(&files),
                Some(vec!["--nofile=16:16".into()])
            );
        }
        let huge = JobLimits {
            max_files: Some(u64::MAX - 1),
            ..Default::default()
        };
        if soft < u64::MAX - 1 {
            assert_eq!(sandbox(0, 0).job_options(&huge), None);
        }
        // The wrapper goes in front of the shell.
        let argv = sandbox(0, 0)
            .argv(&["/bin/sh".into(), "-c".into()], "true", Some(&cpu(1)))
            .expect("argv");
        assert_eq!(
            argv,
            [
                "/usr/bin/prlimit",
                "--cpu=1:2",
                "--",
                "/bin/sh",
                "-c",
                "true"
            ]
        );
        let mut without = sandbox(0, 0);
        without.prlimit_program = None;
        assert!(without.argv(&[], "true", Some(&cpu(1))).is_err());
        assert_eq!(
            without
                .argv(&["/bin/sh".into()], "true", None)
                .expect("argv"),
            ["/bin/sh", "true"]
        );
    }

    #[test]
    fn a_root_worker_switches_jobs_through_its_own_launcher_and_leaves_no_groups() {
        if !Uid::effective().is_root() {
            eprintln!("skipped: the user switch needs root");
            return;
        }
        let nobody = (65534, 65534);
        let switcher = Switcher::find(nobody).expect("a user switch");
        assert!(
            matches!(switcher, Switcher::Launcher { .. }),
            "this build has its launcher and it runs here: {switcher:?}"
        );
        let run = |command: &str| {
            let mut argv = switcher.prefix(nobody);
            argv.extend(["/bin/sh".to_owned(), "-c".to_owned(), command.to_owned()]);
            std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .output()
                .expect("start the launcher")
        };
        let ids = run("id -u; id -g; id -G");
        assert!(ids.status.success(), "{ids:?}");
        assert_eq!(
            String::from_utf8_lossy(&ids.stdout),
            "65534\n65534\n65534\n"
        );
        // The memfd is close-on-exec: the job does not hold the launcher.
        let fds = run("ls -l /proc/self/fd/");
        let fds = String::from_utf8_lossy(&fds.stdout);
        assert!(!fds.contains("taskhost-launch"), "{fds}");
        // Bad ids are refused before anything is switched.
        let prefix = switcher.prefix(nobody);
        let bad = std::process::Command::new(&prefix[0])
            .args(["65534x", "1", "/bin/true"])
            .output()
            .expect("start the launcher");
        assert_eq!(bad.status.code(), Some(126));
        assert!(String::from_utf8_lossy(&bad.stderr).contains("usage"));
        // The environment reaches the program; a program that cannot be
        // executed is 127, as a shell reports it.
        let env = std::process::Command::new(&prefix[0])
            .args(&prefix[1..])
            .args(["/bin/sh", "-c", "echo \"$TASKHOST_PROBE\""])
            .env("TASKHOST_PROBE", "kept across the switch")
            .output()
            .expect("start the launcher");
        assert_eq!(
            String::from_utf8_lossy(&env.stdout),
            "kept across the switch\n"
        );
        let missing = std::process::Command::new(&prefix[0])
            .args(&prefix[1..])
            .arg("/nonexistent/program")
            .output()
            .expect("start the launcher");
        assert_eq!(missing.status.code(), Some(127));
        assert!(
            String::from_utf8_lossy(&missing.stderr)
                .contains("cannot execute /nonexistent/program"),
            "{missing:?}"
        );
    }

    #[test]
    fn a_runs_directory_is_emptied_and_renamed_for_the_next_run_never_followed_out() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let root = std::env::temp_dir().join(format!("taskhost-sandbox-test-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&root).unwrap();
        let outside = root.join("outside.txt");
        std::fs::write(&outside, "not the job's").unwrap();
        let mut sandbox = sandbox(0, 0);
        sandbox.work_root = root.clone();
        if Uid::effective().is_root() {
            sandbox.ids = Some((65534, 65534));
        }
        let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
        let dir = sandbox.make_dir(first, 1).unwrap();
        assert_eq!(dir, root.join(format!("{first}-1")));
        let inode = std::fs::metadata(&dir).unwrap().ino();
        // What a job may leave: files, a tree, a symlink out, a locked mode.
        std::fs::write(dir.join("result.txt"), "first run").unwrap();
        std::fs::create_dir_all(dir.join(".cache/deep")).unwrap();
        std::fs::write(dir.join(".cache/deep/x"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("link")).unwrap();
        std::os::unix::fs::symlink(&root, dir.join("linked-dir")).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        sandbox.finish_dir(&dir);
        assert!(!dir.exists(), "the run's name is gone");
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "not the job's");

        let next = sandbox.make_dir(second, 2).unwrap();
        assert_eq!(next, root.join(format!("{second}-2")));
        let meta = std::fs::metadata(&next).unwrap();
        assert_eq!(meta.ino(), inode, "the spare was renamed, not made anew");
        assert_eq!(meta.mode() & 0o7777, NEW_DIR_MODE);
        if let Some((uid, gid)) = sandbox.ids {
            assert_eq!((meta.uid(), meta.gid()), (uid, gid));
        }
        assert_eq!(std::fs::read_dir(&next).unwrap().count(), 0, "empty");

        // A name already taken (a directory a killed worker left) keeps the
        // spare for the next run.
        sandbox.finish_dir(&next);
        let taken = root.join(format!("{second}-3"));
        std::fs::create_dir_all(taken.join("left")).unwrap();
        assert_eq!(sandbox.make_dir(second, 3).unwrap(), taken);
        assert_eq!(sandbox.spares.lock().unwrap().len(), 1);
        std::fs::remove_dir_all(&taken).unwrap();

        // A worker starting on this work_dir removes the spares left in it.
        let spare = sandbox.spares.lock().unwrap()[0].clone();
        assert!(spare.exists());
        remove_left_spares(&root);
        assert!(!spare.exists());
        // Taken from under this sandbox: the next run gets a new directory.
        let third = sandbox.make_dir(first, 3).unwrap();
        assert!(third.is_dir());
        assert!(sandbox.spares.lock().unwrap().is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
