//! The process runtime: one OS process (group) per instance.
//!
//! Every instance runs in its own process group, so a stop reaches the whole tree a shell
//! command may have started. Each child asks the kernel to SIGKILL it when its parent thread
//! dies (`PR_SET_PDEATHSIG`), so not even a `kill -9` of the daemon leaves an instance behind.
//! That signal follows the *thread* that forked, so the daemon must spawn from one long-lived
//! thread: it runs the controller (and so this runtime) on a dedicated thread.

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cutover_core::InstanceId;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};

use crate::logs::LogFile;
use crate::{InstanceExit, RuntimeError, StartSpec, Started};

const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// An instance that stayed up this long is healthy again: its next crash restarts quickly.
const STABLE_AFTER: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct ProcessRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    logs_dir: PathBuf,
    self_exe: PathBuf,
    exits: mpsc::UnboundedSender<InstanceExit>,
    procs: Mutex<HashMap<InstanceId, Handle>>,
}

struct Handle {
    /// The current process group (a restart makes a new one).
    pgid: Arc<AtomicU32>,
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

fn free_port() -> Result<u16, RuntimeError> {
    // Bound and released at once: the instance binds it a moment later. Another process could
    // take it in between; the instance would then fail its health checks and be restarted.
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(RuntimeError::Port)
}

fn signal_group(pgid: u32, sig: i32) {
    if let Ok(pgid) = libc::pid_t::try_from(pgid)
        && pgid > 1
    {
        // SAFETY: kill(2) takes plain integers; a negative pid addresses the process group.
        // It cannot affect memory safety, only deliver a signal.
        unsafe {
            libc::kill(-pgid, sig);
        }
    }
}

impl ProcessRuntime {
    pub fn new(
        logs_dir: PathBuf,
        self_exe: PathBuf,
        exits: mpsc::UnboundedSender<InstanceExit>,
    ) -> Self {
        ProcessRuntime {
            inner: Arc::new(Inner {
                logs_dir,
                self_exe,
                exits,
                procs: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn launch(&self, spec: &StartSpec, port: u16) -> Result<Launch, RuntimeError> {
        let fill = |s: &str| {
            s.replace("{port}", &port.to_string())
                .replace("{version}", spec.version.as_str())
        };
        let (first, rest) = spec
            .command
            .split_first()
            .ok_or(RuntimeError::EmptyCommand)?;
        let program = if first == "cutover" {
            self.inner.self_exe.clone()
        } else {
            PathBuf::from(fill(first))
        };
        let mut env = spec.env.clone();
        env.insert("PORT".into(), port.to_string());
        env.insert("CUTOVER_VERSION".into(), spec.version.to_string());
        env.insert("CUTOVER_SERVICE".into(), spec.service.to_string());
        env.insert("CUTOVER_INSTANCE".into(), spec.instance.to_string());
        Ok(Launch {
            program,
            args: rest.iter().map(|a| fill(a)).collect(),
            env,
        })
    }

    fn spawn(&self, instance: &InstanceId, l: &Launch) -> Result<Child, RuntimeError> {
        let parent = std::process::id();
        let mut cmd = Command::new(&l.program);
        cmd.args(&l.args)
            .envs(&l.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        // SAFETY: the closure runs in the forked child before exec and only calls
        // async-signal-safe functions (prctl, getppid, _exit), allocating nothing.
        unsafe {
            cmd.pre_exec(move || {
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
        let mut child = cmd.spawn().map_err(|source| RuntimeError::Spawn {
            program: l.program.display().to_string(),
            source,
        })?;
        let log = Arc::new(LogFile::new(
            self.inner.logs_dir.join(format!("{instance}.log")),
        ));
        if let Some(out) = child.stdout.take() {
            let log = log.clone();
            tokio::spawn(async move { log.pump(out).await });
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(async move { log.pump(err).await });
        }
        Ok(child)
    }

    pub async fn start(&self, spec: StartSpec) -> Result<Started, RuntimeError> {
        let _ = std::fs::create_dir_all(&self.inner.logs_dir);
        let port = match spec.port {
            Some(p) => p,
            None => free_port()?,
        };
        let launch = self.launch(&spec, port)?;
        let child = self.spawn(&spec.instance, &launch)?;
        let pid = child.id().unwrap_or(0);
        let pgid = Arc::new(AtomicU32::new(pid));
        let (stop_tx, stop_rx) = watch::channel(false);
        let (exited_tx, exited_rx) = watch::channel(false);
        if let Ok(mut procs) = self.inner.procs.lock() {
            procs.insert(
                spec.instance.clone(),
                Handle {
                    pgid: pgid.clone(),
                    stop: stop_tx,
                    exited: exited_rx,
                },
            );
        }
        tokio::spawn(self.clone().supervise(
            spec.clone(),
            launch,
            Running::Child(child),
            pgid,
            stop_rx,
            exited_tx,
        ));
        Ok(Started {
            instance: spec.instance,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            pid: Some(pid),
            pgid: Some(pid),
        })
    }

    /// Supervises an instance a previous program of this daemon started: the process is
    /// still this daemon's child (the program was replaced in place), so it is waited for by
    /// pid, and restarted from `spec` like any other if it exits.
    pub fn adopt(&self, spec: StartSpec, started: Started) -> Result<(), RuntimeError> {
        let pid = started.pid.ok_or_else(|| {
            RuntimeError::Io(std::io::Error::other("a handed-over instance has no pid"))
        })?;
        if !is_our_child(pid) {
            return Err(RuntimeError::Io(std::io::Error::other(format!(
                "process {pid} is not running as this daemon's child"
            ))));
        }
        let launch = self.launch(&spec, started.addr.port())?;
        let pgid = Arc::new(AtomicU32::new(started.pgid.unwrap_or(pid)));
        let (stop_tx, stop_rx) = watch::channel(false);
        let (exited_tx, exited_rx) = watch::channel(false);
        if let Ok(mut procs) = self.inner.procs.lock() {
            procs.insert(
                spec.instance.clone(),
                Handle {
                    pgid: pgid.clone(),
                    stop: stop_tx,
                    exited: exited_rx,
                },
            );
        }
        tokio::spawn(self.clone().supervise(
            spec,
            launch,
            Running::Adopted(pid),
            pgid,
            stop_rx,
            exited_tx,
        ));
        Ok(())
    }

    /// Waits for the instance to exit; restarts it with backoff unless it was asked to stop.
    async fn supervise(
        self,
        spec: StartSpec,
        launch: Launch,
        mut child: Running,
        pgid: Arc<AtomicU32>,
        mut stop: watch::Receiver<bool>,
        exited: watch::Sender<bool>,
    ) {
        let mut backoff = FIRST_BACKOFF;
        let mut started = Instant::now();
        loop {
            let status = child.wait().await;
            // Whatever the leader did, nothing of its group may linger.
            signal_group(pgid.load(Ordering::SeqCst), libc::SIGKILL);
            if *stop.borrow() {
                break;
            }
            if started.elapsed() >= STABLE_AFTER {
                backoff = FIRST_BACKOFF;
            }
            let (code, signal) = match &status {
                Ok(s) => (s.code(), s.signal()),
                Err(_) => (None, None),
            };
            let _ = self.inner.exits.send(InstanceExit {
                service: spec.service.clone(),
                version: spec.version.clone(),
                instance: spec.instance.clone(),
                code,
                signal,
                restart_in: Some(backoff),
            });
            // Restart after the backoff, unless a stop comes first.
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => {
                        let _ = exited.send(true);
                        self.forget(&spec.instance);
                        return;
                    }
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                match self.spawn(&spec.instance, &launch) {
                    Ok(c) => {
                        pgid.store(c.id().unwrap_or(0), Ordering::SeqCst);
                        child = Running::Child(c);
                        started = Instant::now();
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(instance = %spec.instance, error = %e, "restart failed");
                    }
                }
            }
        }
        let _ = exited.send(true);
        self.forget(&spec.instance);
    }

    fn forget(&self, instance: &InstanceId) {
        if let Ok(mut procs) = self.inner.procs.lock() {
            procs.remove(instance);
        }
    }

    pub async fn stop(
        &self,
        instance: &InstanceId,
        stop_timeout: Duration,
    ) -> Result<(), RuntimeError> {
        let found = self.inner.procs.lock().ok().and_then(|procs| {
            procs
                .get(instance)
                .map(|h| (h.pgid.clone(), h.stop.clone(), h.exited.clone()))
        });
        let Some((pgid, stop, mut exited)) = found else {
            return Ok(());
        };
        let _ = stop.send(true);
        signal_group(pgid.load(Ordering::SeqCst), libc::SIGTERM);
        let graceful = tokio::time::timeout(stop_timeout, exited.wait_for(|e| *e))
            .await
            .is_ok();
        if !graceful {
            signal_group(pgid.load(Ordering::SeqCst), libc::SIGKILL);
            let _ = tokio::time::timeout(Duration::from_secs(5), exited.wait_for(|e| *e)).await;
        }
        Ok(())
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

/// An instance's process: one this program spawned, or one it adopted from the program it
/// replaced (a child all the same, but without a tokio handle).
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

/// Kills what is left of instances a previous daemon started: every process in one of the
/// recorded process groups that carries `CUTOVER_INSTANCE` in its environment (so a recycled
/// group id of an unrelated program is left alone). Returns how many processes were killed.
pub fn kill_orphans(recorded: &[(u32, u32)]) -> usize {
    let groups: std::collections::HashSet<u32> = recorded.iter().map(|(_, g)| *g).collect();
    if groups.is_empty() {
        return 0;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut killed = 0;
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name (which may contain spaces) start at the last ") ".
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let pgrp = rest
            .split_whitespace()
            .nth(2)
            .and_then(|s| s.parse::<u32>().ok());
        if !pgrp.is_some_and(|g| groups.contains(&g)) {
            continue;
        }
        let ours = std::fs::read(format!("/proc/{pid}/environ"))
            .map(|env| {
                env.split(|b| *b == 0)
                    .any(|kv| kv.starts_with(b"CUTOVER_INSTANCE="))
            })
            .unwrap_or(false);
        if ours && let Ok(p) = libc::pid_t::try_from(pid) {
            // SAFETY: kill(2) with plain integers; only delivers a signal.
            if unsafe { libc::kill(p, libc::SIGKILL) } == 0 {
                killed += 1;
            }
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

    fn runtime(dir: &std::path::Path) -> (ProcessRuntime, mpsc::UnboundedReceiver<InstanceExit>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            ProcessRuntime::new(dir.join("logs"), PathBuf::from("/bin/true"), tx),
            rx,
        )
    }

    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit_once(") ")
                    .is_some_and(|(_, r)| !r.starts_with('Z'))
            })
            .unwrap_or(false)
    }

    async fn wait_file(path: &std::path::Path, want: &str) -> String {
        wait_file_until(path, want, |t| t.contains(want)).await
    }

    /// Polls `path` until `done` holds for its text. The log is written by a pump task, so a
    /// process can be seen to exit before its last lines reach the file.
    async fn wait_file_until(
        path: &std::path::Path,
        what: &str,
        done: impl Fn(&str) -> bool,
    ) -> String {
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

    #[tokio::test]
    async fn substitutes_placeholders_and_env_and_logs_output() {
        let dir = tempfile::tempdir().unwrap();
        let (rt, _rx) = runtime(dir.path());
        let mut s = spec(
            "web-v1-1",
            "echo \"$GREETING port=$PORT arg=$0 v=$CUTOVER_VERSION i=$CUTOVER_INSTANCE s=$CUTOVER_SERVICE\"; sleep 30",
        );
        s.command.push("{port}-{version}".into());
        let started = rt.start(s).await.unwrap();
        let port = started.addr.port();
        let log = wait_file(&dir.path().join("logs/web-v1-1.log"), "hello").await;
        assert!(
            log.contains(&format!(
                "hello port={port} arg={port}-v1 v=v1 i=web-v1-1 s=web"
            )),
            "{log}"
        );
        rt.stop(&"web-v1-1".into(), Duration::from_secs(5))
            .await
            .unwrap();
        assert!(!alive(started.pid.unwrap()));
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
        wait_file(&dir.path().join("logs/stubborn.log"), "ready").await;
        let t0 = Instant::now();
        rt.stop(&"stubborn".into(), Duration::from_millis(300))
            .await
            .unwrap();
        assert!(
            t0.elapsed() >= Duration::from_millis(300),
            "it waited for the grace period"
        );
        assert!(!alive(started.pid.unwrap()));
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
    async fn a_crash_is_reported_and_restarted_on_the_same_port() {
        let dir = tempfile::tempdir().unwrap();
        let (rt, mut rx) = runtime(dir.path());
        let started = rt
            .start(spec("crashy", "echo \"start $PORT\"; exit 3"))
            .await
            .unwrap();
        let first = rx.recv().await.unwrap();
        assert_eq!(
            (first.code, first.restart_in),
            (Some(3), Some(FIRST_BACKOFF))
        );
        let second = rx.recv().await.unwrap();
        assert_eq!(
            second.restart_in,
            Some(FIRST_BACKOFF * 2),
            "backoff doubles"
        );
        // Both runs printed the port they were given: the same one.
        let port = started.addr.port().to_string();
        let on_port = |log: &str| log.lines().filter(|l| l.ends_with(&port)).count();
        let log = wait_file_until(
            &dir.path().join("logs/crashy.log"),
            "two starts on the same port",
            |t| on_port(t) >= 2,
        )
        .await;
        assert!(
            log.lines().all(|l| l == format!("start {port}")),
            "every start on the same port: {log}"
        );
        rt.stop(&"crashy".into(), Duration::from_secs(1))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn stop_all_leaves_no_process_of_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let (rt, _rx) = runtime(dir.path());
        // The shell starts a grandchild; stopping the group must take it too.
        let started = rt
            .start(spec("tree", "sleep 30 & echo \"child $!\"; wait"))
            .await
            .unwrap();
        let log = wait_file(&dir.path().join("logs/tree.log"), "child").await;
        let grandchild: u32 = log.trim().rsplit(' ').next().unwrap().parse().unwrap();
        assert!(alive(grandchild));
        rt.stop_all(Duration::from_secs(2)).await;
        assert!(!alive(started.pid.unwrap()));
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(grandchild) {
            assert!(
                Instant::now() < deadline,
                "grandchild {grandchild} survived"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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
