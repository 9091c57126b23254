//! Planned restarts that lose no request: `cutover reload`, `cutover up --upgrade`, SIGHUP
//! and SIGUSR2 all re-execute the running daemon in place.
//!
//! Why in place (nginx's binary upgrade, systemd's re-exec) rather than a second daemon that
//! takes the sockets over (HAProxy's `-x`): the process keeps its pid, so its instances stay its
//! children — the parent-death signal that kills them when the daemon *crashes* fires only
//! when the thread that spawned them exits, and `exec` from that very thread does not — and a
//! supervisor such as systemd sees the same main process throughout.
//!
//! The old program stops accepting (the listening sockets stay open, so new connections wait
//! in the kernel's queue), lets every request in flight finish, parks each client connection
//! at its next idle moment, and stops its controller without stopping any instance. It then
//! writes what the new program needs into `state_dir/handover.json` — listening sockets, parked
//! connections and instances, by descriptor number — and `exec`s. The new program takes all of
//! it back: it serves the parked connections first, accepts from the same sockets, and adopts
//! the instances as running and healthy, so not a single request sees the gap.
//!
//! The same file and the `boot` file beside it are how the CLI follows a restart: it signals
//! the daemon (its pid is in `daemon.pid`), then waits for `boot` to change.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use cutover_controller::HandedOver;
use cutover_core::InstanceId;
use cutover_runtime::Inherited;
use cutover_runtime::inherit::take_inherited;
use serde::{Deserialize, Serialize};

/// Set in the environment of the new program: the hand-over file to read.
pub const ENV: &str = "CUTOVER_HANDOVER";

/// What the old program hands the new one.
#[derive(Serialize, Deserialize, Default, Debug)]
pub struct Handover {
    /// Listening sockets by what they listen for (`daemon.api`, `web`, `web/preview`).
    pub listeners: BTreeMap<String, RawFd>,
    /// Client connections parked between requests.
    pub parked: Vec<ParkedFd>,
    /// Instances that keep running (the store's rows say where and what they are).
    pub instances: Vec<HandedInstance>,
    /// The write end of the keeper's pipe: while it is open, the keeper waits.
    pub keeper: Option<RawFd>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct HandedInstance {
    pub id: String,
    /// Healthy when handed over: routed at once by the new program.
    pub healthy: bool,
    /// The read ends of its output pipes: the new program reads on where the old one stopped.
    pub stdout: Option<RawFd>,
    pub stderr: Option<RawFd>,
    pub cgroup: Option<PathBuf>,
}

/// What the controller of the new program takes over: instances to adopt rather than start,
/// with their pipes and cgroups, and the keeper's pipe. Empty on an ordinary start.
#[derive(Default)]
pub struct Adoption {
    pub instances: Vec<HandedOver>,
    pub keeper: Option<OwnedFd>,
    pub inherited: Vec<(InstanceId, Inherited)>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct ParkedFd {
    pub service: String,
    pub preview: bool,
    pub fd: RawFd,
}

pub fn listener_key(service: &str, preview: bool) -> String {
    if preview {
        format!("{service}/preview")
    } else {
        service.to_owned()
    }
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("handover.json")
}

/// Whether this program was started by a restart in place (before [`take`] reads it).
pub fn restarting() -> bool {
    std::env::var_os(ENV).is_some()
}

/// The hand-over this program was started with, if it was: read once and deleted, its
/// descriptors taken. A file that cannot be read is an error worth stopping for: the
/// instances it names are running and must not be started twice.
pub fn take() -> Result<Option<Taken>, String> {
    let Some(file) = std::env::var_os(ENV) else {
        return Ok(None);
    };
    let file = PathBuf::from(file);
    let text = std::fs::read_to_string(&file)
        .map_err(|e| format!("cannot read the hand-over file {}: {e}", file.display()))?;
    let _ = std::fs::remove_file(&file);
    let h: Handover = serde_json::from_str(&text)
        .map_err(|e| format!("the hand-over file {} is not valid: {e}", file.display()))?;
    let mut listeners = BTreeMap::new();
    for (key, fd) in h.listeners {
        match take_inherited(fd) {
            Ok(fd) => {
                listeners.insert(key, std::net::TcpListener::from(fd));
            }
            Err(e) => tracing::warn!(%key, fd, error = %e, "a handed-over listener is gone"),
        }
    }
    let mut parked = Vec::new();
    for p in h.parked {
        if let Ok(fd) = take_inherited(p.fd) {
            parked.push((p.service, p.preview, std::net::TcpStream::from(fd)));
        }
    }
    let take = |fd: Option<RawFd>| fd.and_then(|fd| take_inherited(fd).ok());
    let mut adoption = Adoption {
        keeper: take(h.keeper),
        ..Adoption::default()
    };
    for i in h.instances {
        let id = InstanceId::new(&i.id);
        adoption.inherited.push((
            id.clone(),
            Inherited {
                stdout: take(i.stdout),
                stderr: take(i.stderr),
                leaf: i.cgroup,
            },
        ));
        adoption.instances.push(HandedOver {
            instance: id,
            healthy: i.healthy,
        });
    }
    Ok(Some(Taken {
        listeners,
        parked,
        instances: adoption,
    }))
}

/// A hand-over with its descriptors owned again.
pub struct Taken {
    pub listeners: BTreeMap<String, std::net::TcpListener>,
    pub parked: Vec<(String, bool, std::net::TcpStream)>,
    pub instances: Adoption,
}

impl Taken {
    /// The parked connections of one service, for the proxy.
    pub fn adopted(&mut self, service: &str) -> cutover_proxy::Adopted {
        let mut a = cutover_proxy::Adopted::default();
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.parked)
            .into_iter()
            .partition(|(s, _, _)| s == service);
        self.parked = rest;
        for (_, preview, s) in mine {
            if preview {
                a.preview.push(s);
            } else {
                a.main.push(s);
            }
        }
        a
    }
}

/// Writes the hand-over file and replaces this program with a new copy of itself. Returns
/// only if that failed. Must run on the thread that spawned the instances (see the module
/// doc).
pub fn exec(
    state_dir: &Path,
    listeners: &[(String, OwnedFd)],
    parked: Vec<cutover_proxy::ParkedConn>,
    adoption: Adoption,
) -> String {
    let keep = |fd: std::os::fd::BorrowedFd<'_>| cutover_runtime::inherit::keep_across_exec(fd);
    let keep_opt = |fd: &Option<OwnedFd>| fd.as_ref().and_then(|f| keep(f.as_fd()).ok());
    let mut h = Handover {
        keeper: keep_opt(&adoption.keeper),
        ..Handover::default()
    };
    for i in &adoption.instances {
        let inherited = adoption
            .inherited
            .iter()
            .find(|(id, _)| *id == i.instance)
            .map(|(_, x)| x);
        h.instances.push(HandedInstance {
            id: i.instance.to_string(),
            healthy: i.healthy,
            stdout: inherited.and_then(|x| keep_opt(&x.stdout)),
            stderr: inherited.and_then(|x| keep_opt(&x.stderr)),
            cgroup: inherited.and_then(|x| x.leaf.clone()),
        });
    }
    for (key, fd) in listeners {
        match keep(fd.as_fd()) {
            Ok(raw) => {
                h.listeners.insert(key.clone(), raw);
            }
            Err(e) => return format!("cannot keep the listener {key} open: {e}"),
        }
    }
    // The parked connections must stay open until the exec: they are leaked into the new
    // program by number.
    let mut kept = Vec::new();
    for p in parked {
        if let Ok(raw) = keep(p.stream.as_fd()) {
            h.parked.push(ParkedFd {
                service: p.service.to_string(),
                preview: p.preview,
                fd: raw,
            });
            kept.push(p.stream);
        }
    }
    let file = path(state_dir);
    let text = match serde_json::to_string(&h) {
        Ok(t) => t,
        Err(e) => return format!("cannot write the hand-over: {e}"),
    };
    if let Err(e) = cutover_store::write_private(&file, text.as_bytes()) {
        return format!("cannot write {}: {e}", file.display());
    }
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return format!("cannot find cutover's own executable: {e}"),
    };
    // An upgraded binary replaces the file, and the kernel then names the running one
    // "… (deleted)": run what is at the path now.
    let exe = PathBuf::from(
        exe.to_string_lossy()
            .trim_end_matches(" (deleted)")
            .to_owned(),
    );
    // `--reset-state` accepted the state once, at that start; a restart must not accept a
    // database that went bad since without being asked again.
    let args = std::env::args_os().skip(1).filter(|a| a != "--reset-state");
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(&exe)
        .args(args)
        .env(ENV, &file)
        .exec();
    drop(kept);
    drop(adoption);
    format!("cannot execute {}: {err}", exe.display())
}

/// `state_dir/boot`: changes each time a daemon program is up and serving.
pub fn boot_path(state_dir: &Path) -> PathBuf {
    state_dir.join("boot")
}

/// `state_dir/daemon.pid`.
pub fn pid_path(state_dir: &Path) -> PathBuf {
    state_dir.join("daemon.pid")
}

/// `state_dir/restart-error`: why the last asked-for restart did not happen.
pub fn error_path(state_dir: &Path) -> PathBuf {
    state_dir.join("restart-error")
}

/// What the CLI asks of a running daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    /// `cutover reload` (SIGHUP): the edited config.
    Reload,
    /// `cutover up --upgrade` (SIGUSR2): the binary now at the daemon's path.
    Upgrade,
}

/// Signals the running daemon of `settings` to restart in place and waits until it serves
/// again. The config was loaded (and so validated) by the caller: a bad one never reaches the
/// daemon, and the CLI has already exited 2 naming file:line:col.
pub fn ask(settings: &cutover_config::Settings, what: Ask) -> crate::exit::CliResult {
    use crate::exit::{CliError, Code};
    let dir = &settings.daemon.state_dir;
    let unreachable = |why: String| {
        CliError::new(
            Code::Unreachable,
            format!("{why}; is `cutover up` running with this config?"),
        )
    };
    let pid = std::fs::read_to_string(pid_path(dir))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| unreachable(format!("no daemon pid in {}", pid_path(dir).display())))?;
    // A stale pid file may name a process that has nothing to do with cutover now: signal
    // only a `cutover … up` (its command line says so).
    let cmdline =
        std::fs::read(format!("/proc/{}/cmdline", pid.as_raw_nonzero())).unwrap_or_default();
    let is_daemon = cmdline.split(|b| *b == 0).any(|a| a == b"up");
    if !is_daemon {
        return Err(unreachable(format!(
            "no cutover daemon runs as pid {} (from {})",
            pid.as_raw_nonzero(),
            pid_path(dir).display()
        )));
    }
    let boot = std::fs::read_to_string(boot_path(dir)).unwrap_or_default();
    let _ = std::fs::remove_file(error_path(dir));
    let signal = match what {
        Ask::Reload => rustix::process::Signal::HUP,
        Ask::Upgrade => rustix::process::Signal::USR2,
    };
    rustix::process::kill_process(pid, signal)
        .map_err(|e| unreachable(format!("cannot signal the daemon (pid {pid:?}): {e}")))?;
    let started = std::time::Instant::now();
    loop {
        if let Ok(why) = std::fs::read_to_string(error_path(dir)) {
            return Err(CliError::new(
                Code::Failure,
                format!(
                    "the daemon refused to restart and runs on as before: {}",
                    why.trim()
                ),
            ));
        }
        let now = std::fs::read_to_string(boot_path(dir)).unwrap_or_default();
        if !now.is_empty() && now != boot {
            crate::output::err(format_args!(
                "cutover: {} in {:.2}s: the daemon serves again (same pid, instances and connections kept)",
                match what {
                    Ask::Reload => "reloaded",
                    Ask::Upgrade => "upgraded",
                },
                started.elapsed().as_secs_f64()
            ));
            return Ok(());
        }
        if started.elapsed() > std::time::Duration::from_secs(60) {
            return Err(CliError::new(
                Code::Failure,
                format!(
                    "the daemon did not come back within 60 s; see its log (pid {})",
                    pid.as_raw_nonzero()
                ),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
