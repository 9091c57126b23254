//! The process runtime: one OS process tree per instance.
//!
//! Each instance's tree is contained (see `contain`): in a cgroup v2 leaf where the machine
//! allows it, else in its own process group with a marker in its environment. A stop sends
//! SIGTERM, waits `stop_timeout`, then kills the whole tree, and returns only once nothing of
//! it runs, so a drained instance leaves no workers behind. The first process also asks the
//! kernel to SIGKILL it when its parent thread dies (`PR_SET_PDEATHSIG`); that signal follows
//! the *thread* that forked, so the daemon spawns from one long-lived thread (the controller's).
//! What that signal cannot reach (workers a forking server started) the keeper kills: a small
//! process that waits for the daemon's end on a pipe and then sweeps (`spawn_keeper`).

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt as _, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cutover_core::{InstanceId, Version};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::contain::{self, Leaf, Swept};
#[cfg(test)]
use crate::logs::rotated_path;
use crate::logs::{LogFile, LogLimits, StderrTail, log_path};
use crate::{
    BoxFuture, Disturbance, Found, Handle, InstanceExit, Recorded, Runtime, RuntimeError,
    StartSpec, Started, stress,
};

const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// An instance that stayed up this long is healthy again: its next crash restarts quickly.
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// How long a killed tree may take to be gone before the runtime stops waiting.
const GONE_WITHIN: Duration = Duration::from_secs(5);
/// The hidden subcommand of the cutover binary that runs the keeper.
pub const KEEPER_COMMAND: &str = "__keeper";

/// How the process runtime runs instances.
#[derive(Clone, Debug)]
pub struct ProcessOptions {
    /// The daemon's state dir: logs go to `logs/` in it, the registry to `run/`, and every
    /// instance carries it as its containment marker.
    pub state_dir: PathBuf,
    /// The instances' working directory (the config file's directory); the daemon's own when
    /// `None`.
    pub workdir: Option<PathBuf>,
    /// The program `cutover` in a command stands for, and the keeper's executable.
    pub self_exe: PathBuf,
    pub logs: LogLimits,
    /// Put instances in cgroups where the machine allows it (`false`: process groups only).
    pub cgroups: bool,
}

#[derive(Clone)]
pub struct ProcessRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    /// Canonical: instances carry exactly these bytes as their marker.
    state_dir: PathBuf,
    logs_dir: PathBuf,
    workdir: Option<PathBuf>,
    self_exe: PathBuf,
    log_limits: LogLimits,
    exits: mpsc::UnboundedSender<InstanceExit>,
    procs: Mutex<HashMap<InstanceId, Proc>>,
    /// The port of each instance this runtime runs (`reserve_port`).
    ports: Mutex<HashMap<InstanceId, u16>>,
    /// This daemon's cgroup, or why instances use process groups; probed at the first start
    /// (after the start-up sweep, which removes the previous daemon's cgroup).
    cgroup: Mutex<Option<Result<PathBuf, String>>>,
    cgroups: bool,
    /// The write end of the keeper's pipe: it closes when this process dies, however it dies.
    keeper: Mutex<Option<OwnedFd>>,
    /// What a previous program of this daemon handed over for instances not yet adopted.
    pending: Mutex<HashMap<InstanceId, Inherited>>,
    /// The CPU stresses under way.
    stresses: crate::Stresses,
}

/// What an instance needs from the program it outlived when the daemon restarts in place:
/// the read ends of its output pipes (so its writes neither fail nor block) and its cgroup.
#[derive(Debug, Default)]
pub struct Inherited {
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    pub leaf: Option<PathBuf>,
}

struct Proc {
    /// The current process group (a restart makes a new one).
    pgid: Arc<AtomicU32>,
    /// The instance's cgroup, when it has one.
    leaf: Option<PathBuf>,
    /// Duplicates of the current run's stdout and stderr read ends, for a hand-over.
    pipes: Arc<Mutex<[Option<OwnedFd>; 2]>>,
    stop: watch::Sender<bool>,
    exited: watch::Receiver<bool>,
}

/// The resolved command of one instance, reused for restarts.
#[derive(Clone)]
struct Launch {
    program: PathBuf,
    args: Vec<String>,
    env: BTreeMap<String, String>,
}

/// One run of an instance's command.
struct Run {
    child: Running,
    pid: u32,
    started: Instant,
    tail: Arc<StderrTail>,
    pumps: Vec<JoinHandle<()>>,
    /// Duplicates of the output pipes' read ends, kept for a hand-over.
    dups: [Option<OwnedFd>; 2],
}

/// A port for a new instance, reserved against this runtime's other instances.
///
/// The kernel picks a free port (bind to port 0); the listener is held until just before the
/// instance is spawned, so no other bind to 0 gets it meanwhile, and the port is remembered
/// while its instance lives, so two instances of this daemon are never given the same port
/// even when the kernel hands a just-released one out again. What remains is a program outside
/// cutover binding that exact port in the moment between the release and the instance's own
/// bind; the instance then fails its health checks and is restarted on its port.
fn reserve_port(
    taken: &Mutex<HashMap<InstanceId, u16>>,
    instance: &InstanceId,
) -> Result<(u16, TcpListener), RuntimeError> {
    let mut held = Vec::new();
    for _ in 0..64 {
        let l = TcpListener::bind("127.0.0.1:0").map_err(RuntimeError::Port)?;
        let port = l.local_addr().map_err(RuntimeError::Port)?.port();
        let mut taken = taken
            .lock()
            .map_err(|_| RuntimeError::Io(std::io::Error::other("port registry poisoned")))?;
        if !taken.values().any(|p| *p == port) {
            taken.insert(instance.clone(), port);
            return Ok((port, l));
        }
        // Keep the refused one bound so the next bind to 0 cannot return it again.
        held.push(l);
    }
    Err(RuntimeError::Port(std::io::Error::other(
        "no port that no other instance holds after 64 tries",
    )))
}

impl ProcessRuntime {
    /// A runtime whose state dir is the parent of `logs_dir`, with default log limits and the
    /// daemon's working directory for instances.
    pub fn new(
        logs_dir: PathBuf,
        self_exe: PathBuf,
        exits: mpsc::UnboundedSender<InstanceExit>,
    ) -> Self {
        let state_dir = logs_dir
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| logs_dir.clone());
        ProcessRuntime::with_options(
            ProcessOptions {
                state_dir,
                workdir: None,
                self_exe,
                logs: LogLimits::default(),
                cgroups: true,
            },
            exits,
        )
    }

    pub fn with_options(opts: ProcessOptions, exits: mpsc::UnboundedSender<InstanceExit>) -> Self {
        let state_dir = contain::canonical_state_dir(&opts.state_dir);
        ProcessRuntime {
            inner: Arc::new(Inner {
                logs_dir: state_dir.join("logs"),
                state_dir,
                workdir: opts.workdir,
                self_exe: opts.self_exe,
                log_limits: opts.logs,
                exits,
                procs: Mutex::new(HashMap::new()),
                ports: Mutex::new(HashMap::new()),
                cgroup: Mutex::new(if opts.cgroups {
                    None
                } else {
                    Some(Err("turned off".into()))
                }),
                cgroups: opts.cgroups,
                keeper: Mutex::new(None),
                pending: Mutex::new(HashMap::new()),
                stresses: crate::Stresses::default(),
            }),
        }
    }

    /// Kills everything a previous daemon of this state dir left running (its cgroup, the
    /// processes carrying its marker, its recorded groups) and waits until it is gone. Call
    /// once at start-up, before the first `start`. Waits up to `within` for a previous
    /// daemon's keeper to finish; fails if the state dir stays locked, which means another
    /// daemon uses it.
    pub fn sweep_leftovers(&self, within: Duration) -> Result<Swept, RuntimeError> {
        let swept = contain::sweep_leftovers(&self.inner.state_dir, within).map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                RuntimeError::StateDirBusy(self.inner.state_dir.clone())
            } else {
                RuntimeError::Io(e)
            }
        })?;
        if let Ok(mut cg) = self.inner.cgroup.lock()
            && self.inner.cgroups
        {
            // The sweep removed this daemon's cgroup; the next start makes it again.
            *cg = None;
        }
        Ok(swept)
    }

    /// Starts the keeper: `<self_exe> __keeper <state_dir>`, in a process group of its own,
    /// holding the read end of a pipe whose write end only this process has. When this
    /// process dies, even by SIGKILL, the pipe closes and the keeper sweeps (see
    /// [`keeper_main`]). Returns the keeper's pid.
    pub fn spawn_keeper(&self) -> Result<u32, RuntimeError> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2(2) writes two descriptors into the array, which has room for two.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(RuntimeError::Io(std::io::Error::last_os_error()));
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors that nothing else owns.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let child = std::process::Command::new(&self.inner.self_exe)
            .arg(KEEPER_COMMAND)
            .arg(&self.inner.state_dir)
            .stdin(Stdio::from(read))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            // Its own group: a Ctrl-C meant for the daemon's terminal group must not reach it.
            .process_group(0)
            .spawn()
            .map_err(|source| RuntimeError::Spawn {
                program: self.inner.self_exe.display().to_string(),
                source,
            })?;
        if let Ok(mut k) = self.inner.keeper.lock() {
            *k = Some(write);
        }
        Ok(child.id())
    }

    /// How instances are contained: `cgroup <path>` or `process groups (<why>)`.
    pub fn containment(&self) -> String {
        match self.cgroup() {
            Some(dir) => format!("cgroup {}", dir.display()),
            None => {
                let why = self
                    .inner
                    .cgroup
                    .lock()
                    .ok()
                    .and_then(|c| c.clone())
                    .and_then(Result::err)
                    .unwrap_or_default();
                format!("process groups ({why})")
            }
        }
    }

    /// This daemon's cgroup, probed (and created) on first use.
    fn cgroup(&self) -> Option<PathBuf> {
        let mut cg = self.inner.cgroup.lock().ok()?;
        let probed = cg.get_or_insert_with(|| {
            let r = contain::prepare_cgroup(&self.inner.state_dir);
            match &r {
                Ok(dir) => tracing::info!(cgroup = %dir.display(), "instances run in cgroups"),
                Err(why) => tracing::info!(
                    reason = %why,
                    "instances run in process groups, not cgroups"
                ),
            }
            r
        });
        probed.as_ref().ok().cloned()
    }

    fn give_up_cgroups(&self, why: String) {
        tracing::warn!(reason = %why, "cannot put instances in cgroups; using process groups");
        if let Ok(mut cg) = self.inner.cgroup.lock() {
            *cg = Some(Err(why));
        }
    }

    fn launch(&self, spec: &StartSpec, port: u16) -> Result<Launch, RuntimeError> {
        let fill = |s: &str| {
            s.replace("{port}", &port.to_string())
                .replace("{version}", spec.version.base())
        };
        let (first, rest) = spec
            .command
            .split_first()
            .ok_or(RuntimeError::EmptyCommand)?;
        let program = if first == "cutover" {
            self.inner.self_exe.clone()
        } else {
            let p = PathBuf::from(fill(first));
            match &self.inner.workdir {
                // `./app` or `bin/app` means the one beside the config, wherever the daemon was
                // started from; a bare name is looked up in PATH.
                Some(dir) if p.is_relative() && p.components().count() > 1 => dir.join(p),
                _ => p,
            }
        };
        let mut env = spec.env.clone();
        env.insert("PORT".into(), port.to_string());
        env.insert("CUTOVER_VERSION".into(), spec.version.base().to_owned());
        env.insert("CUTOVER_SERVICE".into(), spec.service.to_string());
        env.insert("CUTOVER_INSTANCE".into(), spec.instance.to_string());
        env.insert(
            contain::STATE_DIR_ENV.into(),
            self.inner.state_dir.display().to_string(),
        );
        Ok(Launch {
            program,
            args: rest.iter().map(|a| fill(a)).collect(),
            env,
        })
    }

    /// Forks and execs the command, in `leaf` when given.
    fn fork(&self, l: &Launch, leaf: Option<&Leaf>) -> std::io::Result<Child> {
        let parent = std::process::id();
        let mut cmd = Command::new(&l.program);
        cmd.args(&l.args)
            .envs(&l.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        if let Some(dir) = &self.inner.workdir {
            cmd.current_dir(dir);
        }
        let procs = leaf.map(|l| l.procs.clone());
        // SAFETY: the closure runs in the forked child before exec and only calls
        // async-signal-safe functions (open, write, close, prctl, getppid, _exit) on memory
        // prepared before the fork, allocating nothing.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(procs) = &procs {
                    // Join the instance's cgroup ("0" is the writing process) before exec,
                    // so that everything it will ever fork is inside.
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let err = std::io::Error::last_os_error();
                    libc::close(fd);
                    if written != 1 {
                        return Err(err);
                    }
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The daemon may have died between fork and prctl; then nobody would kill us.
                if u32::try_from(libc::getppid()).ok() != Some(parent) {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        cmd.spawn()
    }

    /// Starts one run of the instance; falls back to process groups for good if joining a
    /// cgroup is what failed.
    fn spawn(
        &self,
        spec: &StartSpec,
        l: &Launch,
        leaf: &mut Option<Leaf>,
        log: &Arc<LogFile>,
    ) -> Result<Run, RuntimeError> {
        let spawn_err = |source| RuntimeError::Spawn {
            program: l.program.display().to_string(),
            source,
        };
        let mut child = match self.fork(l, leaf.as_ref()) {
            Ok(c) => c,
            Err(in_cgroup) if leaf.is_some() => {
                // Was it the cgroup or the program? Try without the cgroup.
                let c = self.fork(l, None).map_err(spawn_err)?;
                self.give_up_cgroups(format!("joining a cgroup failed: {in_cgroup}"));
                if let Some(l) = leaf.take() {
                    contain::remove_cgroup(&l.dir);
                }
                c
            }
            Err(e) => return Err(spawn_err(e)),
        };
        let pid = child.id().unwrap_or(0);
        if let Err(e) = contain::register(
            &self.inner.state_dir,
            spec.instance.as_str(),
            spec.service.as_str(),
            spec.version.as_str(),
            pid,
        ) {
            tracing::warn!(instance = %spec.instance, error = %e, "could not record the instance");
        }
        let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().ok();
        let out = child.stdout.take();
        let err = child.stderr.take();
        let dups = [
            out.as_ref().and_then(|o| dup(o.as_fd())),
            err.as_ref().and_then(|e| dup(e.as_fd())),
        ];
        let mut run = Run::pumping(Running::Child(child), pid, log, out, err);
        run.dups = dups;
        Ok(run)
    }

    pub async fn start(&self, spec: StartSpec) -> Result<Started, RuntimeError> {
        let (port, reservation) = match spec.port {
            Some(p) => {
                if let Ok(mut taken) = self.inner.ports.lock() {
                    taken.insert(spec.instance.clone(), p);
                }
                (p, None)
            }
            None => {
                let (p, l) = reserve_port(&self.inner.ports, &spec.instance)?;
                (p, Some(l))
            }
        };
        let launch = self.launch(&spec, port)?;
        let mut leaf = match self.cgroup() {
            Some(parent) => match Leaf::create(&parent, spec.instance.as_str()) {
                Ok(l) => Some(l),
                Err(e) => {
                    self.give_up_cgroups(format!("cannot create a cgroup: {e}"));
                    None
                }
            },
            None => None,
        };
        let log = self.log_for(&spec);
        // Released at the last moment: the instance binds it next.
        drop(reservation);
        let run = match self.spawn(&spec, &launch, &mut leaf, &log) {
            Ok(r) => r,
            Err(e) => {
                if let Ok(mut taken) = self.inner.ports.lock() {
                    taken.remove(&spec.instance);
                }
                if let Some(l) = &leaf {
                    contain::remove_cgroup(&l.dir);
                }
                return Err(e);
            }
        };
        let pid = run.pid;
        let instance = spec.instance.clone();
        self.supervise_run(spec, launch, leaf, log, Arc::new(AtomicU32::new(pid)), run);
        Ok(Started {
            instance,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            handle: handle(pid, pid),
        })
    }

    /// For a restart of the daemon in place: the keeper's pipe and each instance's output
    /// pipes and cgroup, to be kept open across `exec` and given to the next program's
    /// runtime ([`ProcessRuntime::expect`], [`ProcessRuntime::keep_keeper`]).
    pub fn hand_over(&self) -> (Option<OwnedFd>, Vec<(InstanceId, Inherited)>) {
        let keeper = self.inner.keeper.lock().ok().and_then(|mut k| k.take());
        let instances = self
            .inner
            .procs
            .lock()
            .map(|procs| {
                procs
                    .iter()
                    .map(|(id, h)| {
                        let [stdout, stderr] = h
                            .pipes
                            .lock()
                            .map(|mut p| std::mem::take(&mut *p))
                            .unwrap_or_default();
                        let inherited = Inherited {
                            stdout,
                            stderr,
                            leaf: h.leaf.clone(),
                        };
                        (id.clone(), inherited)
                    })
                    .collect()
            })
            .unwrap_or_default();
        (keeper, instances)
    }

    /// The keeper's pipe as the previous program of this daemon left it: this program holds
    /// it from now on, so the keeper keeps waiting (no second keeper, no sweep).
    pub fn keep_keeper(&self, fd: OwnedFd) {
        if let Ok(mut k) = self.inner.keeper.lock() {
            *k = Some(fd);
        }
    }

    /// What the previous program handed over for `instance`, for [`ProcessRuntime::adopt`].
    pub fn expect(&self, instance: InstanceId, inherited: Inherited) {
        if let Ok(mut p) = self.inner.pending.lock() {
            p.insert(instance, inherited);
        }
    }

    /// Supervises an instance a previous program of this daemon started: the process is
    /// still this daemon's child (the program was replaced in place), so it is waited for by
    /// pid, its output is read from the pipes handed over, and it is restarted from `spec`
    /// like any other if it exits.
    pub fn adopt(&self, spec: StartSpec, started: Started) -> Result<(), RuntimeError> {
        let (pid, pgid) = parse_handle(&started.handle).ok_or_else(|| {
            RuntimeError::Io(std::io::Error::other(format!(
                "a handed-over instance has no pid (handle `{}`)",
                started.handle.as_str()
            )))
        })?;
        if !is_our_child(pid) {
            return Err(RuntimeError::Io(std::io::Error::other(format!(
                "process {pid} is not running as this daemon's child"
            ))));
        }
        let inherited = self
            .inner
            .pending
            .lock()
            .ok()
            .and_then(|mut p| p.remove(&spec.instance))
            .unwrap_or_default();
        let launch = self.launch(&spec, started.addr.port())?;
        if let Ok(mut taken) = self.inner.ports.lock() {
            taken.insert(spec.instance.clone(), started.addr.port());
        }
        let leaf = match &inherited.leaf {
            Some(dir) => Some(Leaf::existing(dir)?),
            None => None,
        };
        let log = self.log_for(&spec);
        let pipe = |fd: Option<OwnedFd>| {
            fd.and_then(|fd| tokio::net::unix::pipe::Receiver::from_owned_fd(fd).ok())
        };
        let dup = |fd: &Option<OwnedFd>| fd.as_ref().and_then(|f| f.try_clone().ok());
        let dups = [dup(&inherited.stdout), dup(&inherited.stderr)];
        let mut run = Run::pumping(
            Running::Adopted(pid),
            pid,
            &log,
            pipe(inherited.stdout),
            pipe(inherited.stderr),
        );
        run.dups = dups;
        let pgid = Arc::new(AtomicU32::new(pgid));
        self.supervise_run(spec, launch, leaf, log, pgid, run);
        Ok(())
    }

    /// The log file of `spec`'s instance, with this runtime's rotation limits.
    fn log_for(&self, spec: &StartSpec) -> Arc<LogFile> {
        Arc::new(LogFile::new(
            log_path(
                &self.inner.logs_dir,
                spec.service.as_str(),
                spec.version.as_str(),
                spec.instance.as_str(),
            ),
            self.inner.log_limits,
        ))
    }

    /// Registers the instance and starts its supervisor on `run`.
    fn supervise_run(
        &self,
        spec: StartSpec,
        launch: Launch,
        leaf: Option<Leaf>,
        log: Arc<LogFile>,
        pgid: Arc<AtomicU32>,
        mut run: Run,
    ) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (exited_tx, exited_rx) = watch::channel(false);
        let pipes = Arc::new(Mutex::new(std::mem::take(&mut run.dups)));
        if let Ok(mut procs) = self.inner.procs.lock() {
            procs.insert(
                spec.instance.clone(),
                Proc {
                    pgid: pgid.clone(),
                    leaf: leaf.as_ref().map(|l| l.dir.clone()),
                    pipes: pipes.clone(),
                    stop: stop_tx,
                    exited: exited_rx,
                },
            );
        }
        tokio::spawn(self.clone().supervise(
            Supervised {
                spec,
                launch,
                leaf,
                log,
                pgid,
                pipes,
                stop: stop_rx,
                exited: exited_tx,
            },
            run,
        ));
    }

    /// Kills the instance's whole tree and waits (up to `GONE_WITHIN`) until nothing of it
    /// runs.
    async fn kill_tree(&self, instance: &InstanceId, leaf: Option<&Path>, pgid: u32) {
        let deadline = tokio::time::Instant::now() + GONE_WITHIN;
        match leaf {
            Some(dir) => {
                contain::kill_cgroup(dir);
                contain::signal_group(pgid, libc::SIGKILL);
                while contain::cgroup_populated(dir) && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            None => {
                // Repeat until a scan finds nothing: a process may fork while the group dies.
                while !contain::kill_marked_tree(&self.inner.state_dir, instance.as_str(), pgid)
                    .is_empty()
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }

    /// Waits for the instance to exit; kills what is left of its tree; restarts it with
    /// backoff unless it was asked to stop.
    async fn supervise(self, mut s: Supervised, mut run: Run) {
        let mut backoff = FIRST_BACKOFF;
        let mut exits: u32 = 0;
        loop {
            let status = run.child.wait().await;
            let ran_for = run.started.elapsed();
            // Whatever the first process did, nothing of its tree may linger.
            let leaf = s.leaf.as_ref().map(|l| l.dir.clone());
            self.kill_tree(
                &s.spec.instance,
                leaf.as_deref(),
                s.pgid.load(Ordering::SeqCst),
            )
            .await;
            // With the tree gone its pipes are closed: let the pumps write the last lines.
            for p in run.pumps.drain(..) {
                let _ = tokio::time::timeout(Duration::from_secs(1), p).await;
            }
            if *s.stop.borrow() {
                break;
            }
            if ran_for >= STABLE_AFTER {
                backoff = FIRST_BACKOFF;
            }
            exits = exits.saturating_add(1);
            let (code, signal) = match &status {
                Ok(st) => (st.code(), st.signal()),
                Err(_) => (None, None),
            };
            let _ = self.inner.exits.send(InstanceExit {
                service: s.spec.service.clone(),
                version: s.spec.version.clone(),
                instance: s.spec.instance.clone(),
                code,
                signal,
                restart_in: Some(backoff),
                exits,
                ran_for,
                stderr_tail: run.tail.lines(),
            });
            // Restart after the backoff, unless a stop comes first.
            loop {
                let stopped = tokio::select! {
                    _ = tokio::time::sleep(backoff) => false,
                    _ = s.stop.wait_for(|v| *v) => true,
                };
                if stopped {
                    self.finish(&s);
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                match self.spawn(&s.spec, &s.launch, &mut s.leaf, &s.log) {
                    Ok(mut r) => {
                        s.pgid.store(r.pid, Ordering::SeqCst);
                        if let Ok(mut p) = s.pipes.lock() {
                            *p = std::mem::take(&mut r.dups);
                        }
                        run = r;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(instance = %s.spec.instance, error = %e, "restart failed");
                    }
                }
            }
        }
        self.finish(&s);
    }

    /// The instance is gone for good: its cgroup, registry entry and handle go too.
    fn finish(&self, s: &Supervised) {
        if let Some(l) = &s.leaf {
            contain::remove_cgroup(&l.dir);
        }
        contain::unregister(&self.inner.state_dir, s.spec.instance.as_str());
        if let Ok(mut procs) = self.inner.procs.lock() {
            procs.remove(&s.spec.instance);
        }
        let _ = s.exited.send(true);
    }

    /// SIGTERM to the instance's process group (and, in a cgroup, to every process in it),
    /// then after `stop_timeout` SIGKILL to the whole tree. Returns once nothing of the tree
    /// runs (or after 5 s more). Idempotent.
    pub async fn stop(
        &self,
        instance: &InstanceId,
        stop_timeout: Duration,
    ) -> Result<(), RuntimeError> {
        let found = self.inner.procs.lock().ok().and_then(|procs| {
            procs.get(instance).map(|h| {
                (
                    h.pgid.clone(),
                    h.leaf.clone(),
                    h.stop.clone(),
                    h.exited.clone(),
                )
            })
        });
        if let Ok(mut taken) = self.inner.ports.lock() {
            taken.remove(instance);
        }
        let Some((pgid, leaf, stop, mut exited)) = found else {
            return Ok(());
        };
        let _ = stop.send(true);
        contain::signal_group(pgid.load(Ordering::SeqCst), libc::SIGTERM);
        if let Some(dir) = &leaf {
            // Children that left the group (setsid) are still in the cgroup.
            for pid in contain::cgroup_pids(dir) {
                contain::signal_pid(pid, libc::SIGTERM);
            }
        }
        let graceful = tokio::time::timeout(stop_timeout, exited.wait_for(|e| *e))
            .await
            .is_ok();
        if !graceful {
            // The supervisor kills the rest of the tree once the first process is gone.
            sigkill_tree(leaf.as_deref(), pgid.load(Ordering::SeqCst));
            let _ = tokio::time::timeout(GONE_WITHIN * 2, exited.wait_for(|e| *e)).await;
        }
        Ok(())
    }

    /// The processes of an instance's tree now, its leader first: its cgroup's, else its
    /// process group's.
    fn tree(&self, instance: &InstanceId) -> Option<Vec<u32>> {
        let (leader, leaf) = {
            let procs = self.inner.procs.lock().ok()?;
            let p = procs.get(instance)?;
            (p.pgid.load(Ordering::SeqCst), p.leaf.clone())
        };
        let mut pids = match &leaf {
            Some(dir) => contain::cgroup_pids(dir),
            None => contain::processes()
                .into_iter()
                .filter(|p| p.pgid == leader)
                .map(|p| p.pid)
                .collect(),
        };
        pids.retain(|p| *p != leader);
        pids.insert(0, leader);
        Some(pids)
    }

    /// SIGKILL to the instance's whole tree, as a crash would; its supervisor reports the exit
    /// and restarts it.
    fn kill(&self, instance: &InstanceId) -> Result<String, RuntimeError> {
        let (pgid, leaf) = self
            .inner
            .procs
            .lock()
            .ok()
            .and_then(|p| {
                p.get(instance)
                    .map(|h| (h.pgid.load(Ordering::SeqCst), h.leaf.clone()))
            })
            .ok_or_else(|| not_running(instance))?;
        sigkill_tree(leaf.as_deref(), pgid);
        Ok(format!(
            "SIGKILL sent to {instance} (pid {pgid} and its tree)"
        ))
    }

    /// Pins the instance's threads to one CPU and runs a busy loop there (see `stress`).
    fn cpu_stress(
        &self,
        instance: &InstanceId,
        load: f64,
        duration: Duration,
    ) -> Result<String, RuntimeError> {
        let pids = self.tree(instance).ok_or_else(|| not_running(instance))?;
        let leader = pids[0];
        let original = i32::try_from(leader)
            .ok()
            .and_then(stress::affinity)
            .ok_or_else(|| not_running(instance))?;
        // The highest CPU it may use: the kernel tends to fill the lowest first.
        let cpu = *stress::cpus(&original)
            .last()
            .ok_or_else(|| not_running(instance))?;
        let calm_rx = self.inner.stresses.begin(instance)?;
        let burner = match stress::spawn_burner(&self.inner.self_exe, load, duration, cpu) {
            Ok(b) => b,
            Err(source) => {
                self.inner.stresses.end(instance);
                return Err(RuntimeError::Spawn {
                    program: self.inner.self_exe.display().to_string(),
                    source,
                });
            }
        };
        let burner_pid = burner.id().unwrap_or(0);
        let pinned = stress::pin_all(&pids, &stress::only(cpu));
        let rt = self.clone();
        let id = instance.clone();
        tokio::spawn(async move {
            let mut burner = burner;
            tokio::select! {
                _ = tokio::time::sleep(duration) => {}
                _ = calm_rx => {}
            }
            let _ = burner.start_kill();
            let _ = burner.wait().await;
            // Its threads now (it may have started more, which inherited the one CPU).
            if let Some(pids) = rt.tree(&id) {
                stress::pin_all(&pids, &original);
            }
            rt.inner.stresses.end(&id);
            tracing::info!(instance = %id, "CPU stress ended");
        });
        Ok(format!(
            "{instance} (pid {leader}, {pinned} thread(s)) shares CPU {cpu} with a busy loop (pid {burner_pid}) at {:.0}% for {}ms",
            load * 100.0,
            duration.as_millis()
        ))
    }

    pub async fn stop_all(&self, stop_timeout: Duration) {
        let ids: Vec<InstanceId> = self
            .inner
            .procs
            .lock()
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        let mut set = tokio::task::JoinSet::new();
        for id in ids {
            let rt = self.clone();
            set.spawn(async move { rt.stop(&id, stop_timeout).await });
        }
        while set.join_next().await.is_some() {}
    }
}

/// A process instance's handle: `pid/pgid`.
fn handle(pid: u32, pgid: u32) -> Handle {
    Handle::new(format!("{pid}/{pgid}"))
}

fn parse_handle(h: &Handle) -> Option<(u32, u32)> {
    let (pid, pgid) = h.as_str().split_once('/')?;
    Some((pid.parse().ok()?, pgid.parse().ok()?))
}

impl Runtime for ProcessRuntime {
    fn needs_prepare(&self) -> bool {
        false
    }

    fn prepare<'a>(&'a self, _version: &'a Version) -> BoxFuture<'a, Result<(), RuntimeError>> {
        // A command needs nothing made first.
        Box::pin(async { Ok(()) })
    }

    fn start(&self, spec: StartSpec) -> BoxFuture<'_, Result<Started, RuntimeError>> {
        Box::pin(ProcessRuntime::start(self, spec))
    }

    fn stop<'a>(
        &'a self,
        instance: &'a InstanceId,
        stop_timeout: Duration,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(ProcessRuntime::stop(self, instance, stop_timeout))
    }

    fn adopt(&self, spec: StartSpec, started: Started) -> BoxFuture<'_, Result<(), RuntimeError>> {
        let r = ProcessRuntime::adopt(self, spec, started);
        Box::pin(async move { r })
    }

    /// Processes die with the daemon that started them (parent-death signal, the keeper, the
    /// sweep at start-up), so nothing is adopted; any group the record names that still runs
    /// one of our instances is killed.
    fn recover(&self, recorded: Vec<Recorded>) -> BoxFuture<'_, Vec<Found>> {
        let groups: Vec<(u32, u32)> = recorded
            .iter()
            .filter_map(|r| parse_handle(&r.handle))
            .collect();
        let killed = kill_orphans(&groups);
        if killed > 0 {
            tracing::warn!(killed, "killed instances left over by a previous daemon");
        }
        Box::pin(async { Vec::new() })
    }

    fn stop_all(&self, stop_timeout: Duration) -> BoxFuture<'_, ()> {
        Box::pin(ProcessRuntime::stop_all(self, stop_timeout))
    }

    fn describe(&self, instance: &InstanceId, handle: &Handle) -> String {
        // The current run's leader: its group id is its pid.
        let now = self.inner.procs.lock().ok().and_then(|p| {
            p.get(instance)
                .map(|h| h.pgid.load(Ordering::SeqCst))
                .filter(|pid| *pid != 0)
        });
        match now.or_else(|| parse_handle(handle).map(|(pid, _)| pid)) {
            Some(pid) => format!("pid {pid}"),
            None => "process".to_owned(),
        }
    }

    fn disturb<'a>(
        &'a self,
        instance: &'a InstanceId,
        how: Disturbance,
    ) -> BoxFuture<'a, Result<String, RuntimeError>> {
        let r = match how {
            Disturbance::Kill => self.kill(instance),
            Disturbance::CpuStress { load, duration } => self.cpu_stress(instance, load, duration),
            Disturbance::Calm => Ok(self.inner.stresses.calm(instance)),
        };
        Box::pin(async move { r })
    }
}

/// SIGKILL to an instance's tree: its whole cgroup, else its process group. Returns at once;
/// the supervisor sees the exit.
fn sigkill_tree(leaf: Option<&Path>, pgid: u32) {
    match leaf {
        Some(dir) => contain::kill_cgroup(dir),
        None => {
            contain::signal_group(pgid, libc::SIGKILL);
        }
    }
}

fn not_running(instance: &InstanceId) -> RuntimeError {
    RuntimeError::Unsupported(format!("{instance} does not run here"))
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The daemon's cgroup goes with the runtime; `rmdir` refuses a cgroup that still has
        // processes, so this never hides a running instance.
        if let Ok(Some(Ok(dir))) = self.cgroup.get_mut().map(|c| c.as_ref().cloned()) {
            contain::remove_cgroup(&dir);
        }
    }
}

impl Run {
    /// A run whose output is pumped into `log` (stderr's last lines kept for exit events).
    fn pumping<O, E>(
        child: Running,
        pid: u32,
        log: &Arc<LogFile>,
        out: Option<O>,
        err: Option<E>,
    ) -> Run
    where
        O: tokio::io::AsyncRead + Unpin + Send + 'static,
        E: tokio::io::AsyncRead + Unpin + Send + 'static,
    {
        let tail = Arc::new(StderrTail::default());
        let mut pumps = Vec::with_capacity(2);
        if let Some(out) = out {
            let log = log.clone();
            pumps.push(tokio::spawn(async move { log.pump(out, None).await }));
        }
        if let Some(err) = err {
            let (log, tail) = (log.clone(), tail.clone());
            pumps.push(tokio::spawn(async move { log.pump(err, Some(tail)).await }));
        }
        Run {
            child,
            pid,
            started: Instant::now(),
            tail,
            pumps,
            dups: [None, None],
        }
    }
}

/// An instance's process: one this program spawned, or one it adopted from the program it
/// replaced in place (a child all the same, but without a tokio handle).
enum Running {
    Child(Child),
    Adopted(u32),
}

impl Running {
    async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        match self {
            Running::Child(c) => c.wait().await,
            Running::Adopted(pid) => {
                // No handle to await: ask the kernel without blocking, a few times a second.
                // Only adopted instances are polled, and only until their first exit.
                let pid = libc::pid_t::try_from(*pid).map_err(std::io::Error::other)?;
                loop {
                    let mut status = 0;
                    // SAFETY: waitpid(2) with WNOHANG writes the status into our local.
                    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
                    if r == pid {
                        return Ok(std::process::ExitStatus::from_raw(status));
                    }
                    if r < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Whether `pid` is a live child of this process.
fn is_our_child(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let ppid = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse::<u32>().ok());
    ppid == Some(std::process::id())
}

/// What the supervisor of one instance keeps across restarts.
struct Supervised {
    spec: StartSpec,
    launch: Launch,
    leaf: Option<Leaf>,
    log: Arc<LogFile>,
    pgid: Arc<AtomicU32>,
    pipes: Arc<Mutex<[Option<OwnedFd>; 2]>>,
    stop: watch::Receiver<bool>,
    exited: watch::Sender<bool>,
}

/// The keeper's whole life (`cutover __keeper STATE_DIR`): waits until its stdin (the pipe
/// from the daemon) reaches end of file, which happens when the daemon dies however it dies,
/// then kills every instance process of `state_dir` that is left. Holds the state dir's lock
/// from start to end, so that a new daemon's own sweep waits for this one, and a second daemon
/// on the same state dir is refused.
pub fn keeper_main(state_dir: &Path) -> std::io::Result<Swept> {
    // SAFETY: signal(2) with SIG_IGN installs no handler code; it only changes a disposition.
    unsafe {
        // A terminal's Ctrl-C or hang-up is for the daemon; the keeper must outlive it.
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let state_dir = contain::canonical_state_dir(state_dir);
    let _lock = contain::StateLock::acquire_blocking(&state_dir)?;
    let mut buf = [0u8; 64];
    loop {
        use std::io::Read;
        match std::io::stdin().read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    Ok(contain::sweep_locked(&state_dir))
}

/// Kills what is left of instances a previous daemon started: every process in one of the
/// recorded process groups that carries `CUTOVER_INSTANCE` in its environment (so a recycled
/// group id of an unrelated program is left alone). Returns how many processes were killed.
/// Superseded by [`ProcessRuntime::sweep_leftovers`], which also finds children that left
/// their group and cgroups; kept for callers that only have the recorded groups.
fn kill_orphans(recorded: &[(u32, u32)]) -> usize {
    let groups: std::collections::HashSet<u32> = recorded.iter().map(|(_, g)| *g).collect();
    if groups.is_empty() {
        return 0;
    }
    let mut killed = 0;
    for p in contain::processes() {
        if !groups.contains(&p.pgid) {
            continue;
        }
        let ours = std::fs::read(format!("/proc/{}/environ", p.pid))
            .map(|env| {
                env.split(|b| *b == 0)
                    .any(|kv| kv.starts_with(b"CUTOVER_INSTANCE="))
            })
            .unwrap_or(false);
        if ours && contain::signal_pid(p.pid, libc::SIGKILL) {
            killed += 1;
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;

    use super::*;

    fn spec(instance: &str, script: &str) -> StartSpec {
        StartSpec {
            service: "web".into(),
            version: "v1".into(),
            instance: instance.into(),
            index: 0,
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: BTreeMap::from([("GREETING".into(), "hello".into())]),
            port: None,
        }
    }

    fn options(dir: &Path, cgroups: bool) -> ProcessOptions {
        ProcessOptions {
            state_dir: dir.to_owned(),
            workdir: None,
            self_exe: PathBuf::from("/bin/true"),
            logs: LogLimits::default(),
            cgroups,
        }
    }

    fn runtime(dir: &Path) -> (ProcessRuntime, mpsc::UnboundedReceiver<InstanceExit>) {
        runtime_with(options(dir, true))
    }

    fn runtime_with(
        opts: ProcessOptions,
    ) -> (ProcessRuntime, mpsc::UnboundedReceiver<InstanceExit>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (ProcessRuntime::with_options(opts, tx), rx)
    }

    fn log_of(dir: &Path, instance: &str) -> PathBuf {
        log_path(&dir.join("logs"), "web", "v1", instance)
    }

    fn alive(pid: u32) -> bool {
        contain::alive(pid)
    }

    async fn wait_file(path: &Path, want: &str) -> String {
        wait_file_until(path, want, |t| t.contains(want)).await
    }

    /// Polls `path` until `done` holds for its text. The log is written by a pump task, so a
    /// process can be seen to exit before its last lines reach the file.
    async fn wait_file_until(path: &Path, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = tokio::fs::read_to_string(path).await.unwrap_or_default();
            if done(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{} never showed {what}: {text:?}",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn wait_dead(pids: &[u32], what: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Some(p) = pids.iter().find(|p| alive(**p)) {
            assert!(Instant::now() < deadline, "{what}: {p} survived");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The numbers after `key ` in a log, in order.
    fn pids_after(log: &str, key: &str) -> Vec<u32> {
        log.lines()
            .filter_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            .collect()
    }

    /// A tree as a forking server makes it: a child in the group, and a daemonized one that
    /// left the group with setsid. Prints both pids, then waits.
    const TREE: &str =
        "sleep 300 & echo \"child $!\"; setsid sleep 300 & echo \"escaped $!\"; echo ready; wait";

    #[tokio::test]
    async fn substitutes_placeholders_and_env_and_logs_output() {
        let dir = tempfile::tempdir().unwrap();
        let (rt, _rx) = runtime(dir.path());
        let mut s = spec(
            "web-v1-1",
            "echo \"$GREETING port=$PORT arg=$0 v=$CUTOVER_VERSION i=$CUTOVER_INSTANCE s=$CUTOVER_SERVICE\"; echo \"state=$CUTOVER_STATE_DIR\"; sleep 30",
        );
        s.command.push("{port}-{version}".into());
        let started = rt.start(s).await.unwrap();
        let port = started.addr.port();
        let log = wait_file(&log_of(dir.path(), "web-v1-1"), "state=").await;
        assert!(
            log.contains(&format!(
                "hello port={port} arg={port}-v1 v=v1 i=web-v1-1 s=web"
            )),
            "{log}"
        );
        let canonical = std::fs::canonicalize(dir.path()).unwrap();
        assert!(
            log.contains(&format!("state={}", canonical.display())),
            "{log}"
        );
        assert_eq!(contain::registered(dir.path()).len(), 1);
        rt.stop(&"web-v1-1".into(), Duration::from_secs(5))
            .await
            .unwrap();
        assert!(!alive(parse_handle(&started.handle).unwrap().0));
        assert!(
            contain::registered(dir.path()).is_empty(),
            "a stopped instance leaves the registry"
        );
    }

    #[tokio::test]
    async fn relative_programs_and_the_working_directory_are_the_config_dir() {
        let dir = tempfile::tempdir().unwrap();
        let app = tempfile::tempdir().unwrap();
        std::fs::create_dir(app.path().join("bin")).unwrap();
        let script = app.path().join("bin/app");
        std::fs::write(&script, "#!/bin/sh\necho \"cwd=$(pwd)\"\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let mut opts = options(dir.path(), true);
        opts.workdir = Some(app.path().to_owned());
        let (rt, _rx) = runtime_with(opts);
        let mut s = spec("rel", "");
        s.command = vec!["bin/app".into()];
        rt.start(s).await.unwrap();
        let log = wait_file(&log_of(dir.path(), "rel"), "cwd=").await;
        assert_eq!(log.trim(), format!("cwd={}", app.path().display()));
        rt.stop_all(Duration::from_secs(2)).await;
    }

    #[tokio::test]
    async fn stop_escalates_to_sigkill_for_a_process_that_ignores_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let (rt, mut rx) = runtime(dir.path());
        let started = rt
            .start(spec(
                "stubborn",
                "trap '' TERM; echo ready; while true; do sleep 0.05; done",
            ))
            .await
            .unwrap();
        wait_file(&log_of(dir.path(), "stubborn"), "ready").await;
        let t0 = Instant::now();
        rt.stop(&"stubborn".into(), Duration::from_millis(300))
            .await
            .unwrap();
        assert!(
            t0.elapsed() >= Duration::from_millis(300),
            "it waited for the grace period"
        );
        assert!(!alive(parse_handle(&started.handle).unwrap().0));
        assert!(
            rx.try_recv().is_err(),
            "a requested stop is not reported as a crash"
        );
        // Idempotent.
        rt.stop(&"stubborn".into(), Duration::from_millis(300))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_crash_is_reported_with_its_stderr_and_restarted_on_the_same_port() {
        let dir = tempfile::tempdir().unwrap();
        let (rt, mut rx) = runtime(dir.path());
        let started = rt
            .start(spec(
                "crashy",
                "echo \"start $PORT\"; for i in $(seq 1 12); do echo \"oops $i\" >&2; done; printf 'no newline' >&2; exit 3",
            ))
            .await
            .unwrap();
        let first = rx.recv().await.unwrap();
        assert_eq!(
            (first.code, first.restart_in, first.exits),
            (Some(3), Some(FIRST_BACKOFF), 1)
        );
        assert!(first.ran_for < Duration::from_secs(10));
        let mut want: Vec<String> = (4..=12).map(|i| format!("oops {i}")).collect();
        want.push("no newline".into());
        assert_eq!(first.stderr_tail, want, "the last ten lines of stderr");
        let second = rx.recv().await.unwrap();
        assert_eq!(
            (second.restart_in, second.exits),
            (Some(FIRST_BACKOFF * 2), 2),
            "backoff doubles; exits count up"
        );
        assert_eq!(second.stderr_tail, want, "each run's own tail");
        // Both runs printed the port they were given: the same one.
        let port = started.addr.port().to_string();
        let starts = |log: &str| {
            log.lines()
                .filter(|l| l.starts_with("start"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let log = wait_file_until(
            &log_of(dir.path(), "crashy"),
            "two starts on the same port",
            |t| starts(t).len() >= 2,
        )
        .await;
        assert!(
            starts(&log).iter().all(|l| *l == format!("start {port}")),
            "every start on the same port: {log}"
        );
        assert!(log.contains("oops 1\n"), "stderr is in the log too: {log}");
        rt.stop(&"crashy".into(), Duration::from_secs(1))
            .await
            .unwrap();
    }

    async fn stop_kills_the_whole_tree(cgroups: bool) {
        let dir = tempfile::tempdir().unwrap();
        let (rt, _rx) = runtime_with(options(dir.path(), cgroups));
        let started = rt.start(spec("tree", TREE)).await.unwrap();
        assert_eq!(
            rt.containment().starts_with("cgroup "),
            cgroups && contain::prepare_cgroup(&rt.inner.state_dir).is_ok(),
            "{}",
            rt.containment()
        );
        let log = wait_file(&log_of(dir.path(), "tree"), "ready").await;
        let tree = [pids_after(&log, "child "), pids_after(&log, "escaped ")].concat();
        assert_eq!(tree.len(), 2, "{log}");
        assert!(tree.iter().all(|p| alive(*p)));
        rt.stop_all(Duration::from_secs(2)).await;
        // `stop` returns once the tree is gone: no waiting here.
        assert!(!alive(parse_handle(&started.handle).unwrap().0));
        for p in &tree {
            assert!(
                !alive(*p),
                "{p} outlived its instance ({})",
                rt.containment()
            );
        }
    }

    #[tokio::test]
    async fn stop_kills_the_whole_tree_in_a_cgroup_where_possible() {
        stop_kills_the_whole_tree(true).await;
    }

    #[tokio::test]
    async fn stop_kills_the_whole_tree_with_process_groups() {
        stop_kills_the_whole_tree(false).await;
    }

    #[tokio::test]
    async fn a_crashed_leader_takes_its_tree_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let (rt, mut rx) = runtime(dir.path());
        rt.start(spec("leader", &format!("{TREE} & sleep 0.2; exit 7")))
            .await
            .unwrap();
        let log = wait_file(&log_of(dir.path(), "leader"), "ready").await;
        let tree = [pids_after(&log, "child "), pids_after(&log, "escaped ")].concat();
        let exit = rx.recv().await.unwrap();
        assert_eq!(exit.code, Some(7));
        // The exit is reported once the tree is gone.
        for p in &tree {
            assert!(!alive(*p), "{p} outlived its crashed leader");
        }
        rt.stop_all(Duration::from_secs(1)).await;
    }

    /// Starts `TREE` on a thread of its own whose end stands in for a SIGKILLed daemon: the
    /// parent-death signal kills the first process; what it forked stays.
    fn abandon_a_tree(state_dir: &Path, cgroups: bool) -> Vec<u32> {
        let state_dir = state_dir.to_owned();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let (prt, _rx) = runtime_with(options(&state_dir, cgroups));
                let started = prt.start(spec("web-v1-1", TREE)).await.unwrap();
                let log = wait_file(&log_of(&state_dir, "web-v1-1"), "ready").await;
                let mut tree = [pids_after(&log, "child "), pids_after(&log, "escaped ")].concat();
                tree.push(parse_handle(&started.handle).unwrap().0);
                tree
            })
        })
        .join()
        .unwrap()
    }

    async fn a_sweep_kills_what_a_dead_daemon_left(cgroups: bool) {
        let dir = tempfile::tempdir().unwrap();
        let tree = abandon_a_tree(dir.path(), cgroups);
        let leader = tree[2];
        wait_dead(&[leader], "the parent-death signal").await;
        let left = &tree[..2];
        assert!(
            left.iter().all(|p| alive(*p)),
            "the forked processes outlive the thread: that is what the sweep is for"
        );
        let (rt, _rx) = runtime_with(options(dir.path(), cgroups));
        let swept = rt.sweep_leftovers(Duration::from_secs(5)).unwrap();
        for p in left {
            assert!(!alive(*p), "{p} survived the sweep ({swept:?})");
        }
        assert!(swept.processes >= 2, "{swept:?}");
        assert_eq!(swept.survivors, 0);
        assert!(contain::registered(dir.path()).is_empty());
        // Nothing left: a second sweep finds nothing, and instances start again.
        assert_eq!(
            rt.sweep_leftovers(Duration::from_secs(5))
                .unwrap()
                .processes,
            0
        );
        rt.start(spec("web-v1-1", "echo again; sleep 30"))
            .await
            .unwrap();
        wait_file(&log_of(dir.path(), "web-v1-1"), "again").await;
        rt.stop_all(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn a_sweep_kills_what_a_dead_daemon_left_in_its_cgroup() {
        a_sweep_kills_what_a_dead_daemon_left(true).await;
    }

    #[tokio::test]
    async fn a_sweep_kills_what_a_dead_daemon_left_by_its_marker() {
        a_sweep_kills_what_a_dead_daemon_left(false).await;
    }

    #[tokio::test]
    async fn a_sweep_waits_for_the_lock_and_refuses_a_live_holder() {
        let dir = tempfile::tempdir().unwrap();
        let state = contain::canonical_state_dir(dir.path());
        let held = contain::StateLock::acquire(&state, Duration::ZERO).unwrap();
        let (rt, _rx) = runtime(dir.path());
        assert!(matches!(
            rt.sweep_leftovers(Duration::from_millis(100)),
            Err(RuntimeError::StateDirBusy(_))
        ));
        drop(held);
        rt.sweep_leftovers(Duration::from_millis(100)).unwrap();
    }

    #[tokio::test]
    async fn a_chatty_instance_rotates_in_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = options(dir.path(), true);
        opts.logs = LogLimits {
            max_bytes: 4096,
            files: 3,
        };
        let (rt, mut rx) = runtime_with(opts);
        rt.start(spec(
            "chatty",
            "i=0; while [ $i -lt 3000 ]; do echo \"line $i\"; i=$((i+1)); done; echo done >&2; exit 0",
        ))
        .await
        .unwrap();
        rx.recv().await.unwrap();
        rt.stop_all(Duration::from_secs(1)).await;
        let path = log_of(dir.path(), "chatty");
        let mut lines = Vec::new();
        for p in [rotated_path(&path, 2), rotated_path(&path, 1), path.clone()] {
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(
                text.len() <= 4096,
                "{} has {} bytes",
                p.display(),
                text.len()
            );
            assert!(text.ends_with('\n'));
            lines.extend(text.lines().map(str::to_owned));
        }
        assert!(!rotated_path(&path, 3).exists(), "three files at most");
        // The newest lines, whole and in order, up to the end.
        let numbers: Vec<u32> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("line ")?.parse().ok())
            .collect();
        assert_eq!(numbers.last(), Some(&2999));
        assert!(
            numbers.windows(2).all(|w| w[1] == w[0] + 1),
            "no line lost or cut"
        );
        // stderr's one line may have been rotated away already: the pumps run side by side.
        assert!(
            lines.len() == numbers.len() || lines.len() == numbers.len() + 1,
            "every line is whole: {:?}",
            lines.iter().find(|l| {
                let numbered = l
                    .strip_prefix("line ")
                    .is_some_and(|n| n.parse::<u32>().is_ok());
                *l != "done" && !numbered
            })
        );
    }

    #[test]
    fn kill_orphans_kills_leftover_groups_of_ours_only() {
        // A group as a dead daemon would leave it: started with CUTOVER_INSTANCE, not our child.
        let ours = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 30"])
            .env("CUTOVER_INSTANCE", "web-v1-9")
            .process_group(0)
            .spawn()
            .unwrap();
        let theirs = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 30"])
            .env_remove("CUTOVER_INSTANCE")
            .process_group(0)
            .spawn()
            .unwrap();
        let (a, b) = (ours.id(), theirs.id());
        let killed = kill_orphans(&[(a, a), (b, b)]);
        assert!(
            killed >= 1,
            "the shell of ours (and its sleep, if it forked one) was killed"
        );
        let mut ours = ours;
        let mut theirs = theirs;
        assert!(ours.wait().unwrap().signal() == Some(libc::SIGKILL));
        assert!(alive(b), "a group without CUTOVER_INSTANCE is not ours");
        theirs.kill().unwrap();
        theirs.wait().unwrap();
        assert_eq!(kill_orphans(&[]), 0);
    }
}
