//! Containment of an instance's whole process tree: nothing an instance starts may outlive it,
//! nor outlive the daemon.
//!
//! A forking server (gunicorn, a shell with background jobs) starts workers that are not the
//! daemon's children: `PR_SET_PDEATHSIG` on the instance's first process does not reach them,
//! and after a `kill -9` of the daemon nothing of the daemon runs to kill them. So every
//! instance is put where it can be found again, by a later process, without the daemon's memory:
//!
//! - **cgroup v2**, where the machine lets the daemon create cgroups: every instance runs in a
//!   leaf `<daemon's cgroup>/cutover-<hash of state dir>/<instance>`, joined before `exec`, so
//!   every process it ever forks is inside. A stop writes `cgroup.kill`, which the kernel
//!   applies to the whole leaf at once, daemonized grandchildren included. The parent cgroup's
//!   path is recorded in `state_dir/cgroup`, so a later daemon (or the keeper) finds it even
//!   from another cgroup.
//! - **Otherwise** (no cgroup2 mount, read-only `/sys/fs/cgroup` in a container, no
//!   `cgroup.kill` before Linux 5.14, `CUTOVER_CGROUPS=0`): the instance's process group, plus
//!   a marker in every instance's environment (`CUTOVER_STATE_DIR`), which children inherit
//!   even when they leave the group: a stop kills the group and every process carrying this
//!   instance's marker, and a sweep kills every process carrying the state dir's marker.
//!
//! A *sweep* ([`sweep_leftovers`]) kills everything a previous daemon with the same state dir
//! left: its cgroups, its marked processes, its recorded groups. The daemon runs one before it
//! starts any instance, and its *keeper* process runs one the moment the daemon dies.
//!
//! The registry (`state_dir/run/<instance>`, one small file per running instance) records each
//! instance's process group, service and version: the sweep uses it, and `cutover logs` uses
//! it to tell running instances from stopped ones.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Every instance gets `CUTOVER_STATE_DIR=<canonical state dir>`; children inherit it.
pub const STATE_DIR_ENV: &str = "CUTOVER_STATE_DIR";
/// Set to `0` to keep the daemon from creating cgroups (it then relies on process groups).
pub const CGROUPS_ENV: &str = "CUTOVER_CGROUPS";
/// `state_dir/cgroup`: the path of the cgroup that holds this state dir's instances.
const CGROUP_RECORD: &str = "cgroup";
/// `state_dir/run/`: one file per running instance.
const RUN_DIR: &str = "run";
/// Held (flock) by the live keeper, and by a sweep while it runs.
const LOCK_FILE: &str = "keeper.lock";
/// How long a sweep or a stop waits for killed processes to be gone.
const GONE_WITHIN: Duration = Duration::from_secs(5);

/// What a sweep found and killed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Processes killed (those in cgroups counted as they were listed before the kill).
    pub processes: usize,
    /// Leftover cgroups killed and removed.
    pub cgroups: usize,
    /// Processes still present when the sweep gave up waiting (should be 0).
    pub survivors: usize,
}

/// A running instance as the registry records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registered {
    pub instance: String,
    pub service: String,
    pub version: String,
    pub pgid: u32,
    /// Unix time in milliseconds of the instance's (last) start.
    pub started_ms: u64,
}

/// The state dir as instances see it in their marker: canonical, so that every daemon and
/// keeper of one state dir agrees on the bytes.
pub fn canonical_state_dir(state_dir: &Path) -> PathBuf {
    let _ = std::fs::create_dir_all(state_dir);
    std::fs::canonicalize(state_dir)
        .or_else(|_| std::path::absolute(state_dir))
        .unwrap_or_else(|_| state_dir.to_owned())
}

/// `CUTOVER_STATE_DIR=<dir>` as it appears in `/proc/<pid>/environ`.
fn marker(state_dir: &Path) -> Vec<u8> {
    let mut m = format!("{STATE_DIR_ENV}=").into_bytes();
    m.extend_from_slice(state_dir.as_os_str().as_bytes());
    m
}

/// A file or cgroup name made of `[A-Za-z0-9._-]` only, never `.` or `..`.
pub fn safe_component(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.chars().all(|c| c == '.') {
        out = format!("_{out}");
    }
    out
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

// ---- cgroup v2 ----------------------------------------------------------------------------

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mount(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if b[i] == b'\\'
            && let Some(d) = octal
        {
            let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// The directory of this process's own cgroup in the cgroup2 hierarchy, if one is mounted.
fn own_cgroup_dir() -> Option<PathBuf> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let own = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        let (Some(root), Some(mount)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        // The mount shows the subtree at `root`; our path is relative to the same namespace.
        let root = root.trim_end_matches('/');
        let Some(rel) = own.strip_prefix(root) else {
            continue;
        };
        let rel = rel.trim_start_matches('/');
        let mut dir = unescape_mount(mount);
        if !rel.is_empty() {
            dir.push(rel);
        }
        return Some(dir);
    }
    None
}

/// The cgroup that holds the instances of the daemon of `state_dir` (canonical), below the
/// calling process's own cgroup. Not created here.
fn cgroup_for(state_dir: &Path) -> Option<PathBuf> {
    let name = format!("cutover-{:016x}", fnv1a(state_dir.as_os_str().as_bytes()));
    Some(own_cgroup_dir()?.join(name))
}

/// Creates this daemon's cgroup and records it, or says why instances will use process
/// groups instead.
pub(crate) fn prepare_cgroup(state_dir: &Path) -> Result<PathBuf, String> {
    if std::env::var(CGROUPS_ENV).is_ok_and(|v| v == "0" || v == "off") {
        return Err(format!("{CGROUPS_ENV}=0"));
    }
    let dir = cgroup_for(state_dir).ok_or("no cgroup2 hierarchy is mounted")?;
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
    }
    if !dir.join("cgroup.kill").exists() {
        // Before Linux 5.14 a tree can only be killed process by process, racing its forks.
        let _ = std::fs::remove_dir(&dir);
        return Err("the kernel has no cgroup.kill (Linux 5.14+)".into());
    }
    std::fs::write(
        state_dir.join(CGROUP_RECORD),
        dir.as_os_str()
            .as_bytes()
            .iter()
            .chain(b"\n")
            .copied()
            .collect::<Vec<u8>>(),
    )
    .map_err(|e| format!("cannot record the cgroup in the state dir: {e}"))?;
    Ok(dir)
}

/// A leaf cgroup for one instance, and what `pre_exec` needs to join it without allocating.
pub(crate) struct Leaf {
    pub dir: PathBuf,
    pub procs: CString,
}

impl Leaf {
    pub fn create(parent: &Path, instance: &str) -> std::io::Result<Leaf> {
        let dir = parent.join(safe_component(instance));
        if dir.exists() {
            // A previous run of the same instance id: nothing of it may remain.
            kill_cgroup(&dir);
        } else {
            std::fs::create_dir(&dir)?;
        }
        let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
            .map_err(|_| std::io::Error::other("cgroup path contains a NUL byte"))?;
        Ok(Leaf { dir, procs })
    }

    /// The leaf of an instance a previous program of this daemon created and handed over.
    pub fn existing(dir: &Path) -> std::io::Result<Leaf> {
        let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
            .map_err(|_| std::io::Error::other("cgroup path contains a NUL byte"))?;
        Ok(Leaf {
            dir: dir.to_owned(),
            procs,
        })
    }
}

/// Kills every process in the cgroup at `dir` and in its descendants.
pub(crate) fn kill_cgroup(dir: &Path) {
    let _ = std::fs::write(dir.join("cgroup.kill"), b"1");
}

/// Whether any process is left in the cgroup at `dir` or below it.
pub(crate) fn cgroup_populated(dir: &Path) -> bool {
    match std::fs::read_to_string(dir.join("cgroup.events")) {
        Ok(ev) => ev.lines().any(|l| l.trim() == "populated 1"),
        Err(_) => false,
    }
}

/// Processes in the cgroup at `dir` and below it.
pub(crate) fn cgroup_pids(dir: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                pids.extend(cgroup_pids(&e.path()));
            }
        }
    }
    pids
}

/// Removes the (empty) cgroup at `dir` and its descendants, deepest first.
pub(crate) fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

// ---- processes ----------------------------------------------------------------------------

/// One process as `/proc` shows it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Proc {
    pub pid: u32,
    pub pgid: u32,
}

/// Every live (not zombie) process but this one.
pub(crate) fn processes() -> Vec<Proc> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields after the command name (which may contain spaces) start at the last ") ".
            let (_, rest) = stat.rsplit_once(") ")?;
            let mut f = rest.split_whitespace();
            let state = f.next()?;
            if state == "Z" || state == "X" {
                return None;
            }
            let pgid = f.nth(1)?.parse().ok()?;
            Some(Proc { pid, pgid })
        })
        .collect()
}

/// Whether `/proc/<pid>/environ` has an entry that is exactly one of `entries`.
pub(crate) fn environ_has(pid: u32, entries: &[&[u8]]) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| env.split(|b| *b == 0).any(|kv| entries.contains(&kv)))
        .unwrap_or(false)
}

/// Whether a process is running (a zombie runs no code and holds no port).
pub(crate) fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, r)| !r.starts_with('Z') && !r.starts_with('X'))
        })
        .unwrap_or(false)
}

pub(crate) fn signal_pid(pid: u32, sig: i32) -> bool {
    match libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) takes plain integers and only delivers a signal.
        Ok(p) if p > 1 => unsafe { libc::kill(p, sig) == 0 },
        _ => false,
    }
}

pub(crate) fn signal_group(pgid: u32, sig: i32) -> bool {
    match libc::pid_t::try_from(pgid) {
        // SAFETY: kill(2) takes plain integers; a negative pid addresses the process group.
        // It cannot affect memory safety, only deliver a signal.
        Ok(p) if p > 1 => unsafe { libc::kill(-p, sig) == 0 },
        _ => false,
    }
}

/// SIGKILLs every process of the instance tree outside a cgroup: the group, and whoever
/// carries the instance's markers (a child that left the group with `setsid` keeps them).
/// Returns the pids it signalled.
pub(crate) fn kill_marked_tree(state_dir: &Path, instance: &str, pgid: u32) -> Vec<u32> {
    let state = marker(state_dir);
    let inst = format!("CUTOVER_INSTANCE={instance}").into_bytes();
    let mut killed = Vec::new();
    for p in processes() {
        let in_group = pgid > 1 && p.pgid == pgid;
        if in_group || (environ_has(p.pid, &[&inst]) && environ_has(p.pid, &[&state])) {
            if p.pgid == p.pid && !in_group {
                // It made its own group: its children are in it.
                signal_group(p.pid, libc::SIGKILL);
            }
            signal_pid(p.pid, libc::SIGKILL);
            killed.push(p.pid);
        }
    }
    killed
}

/// Waits (blocking) until none of `pids` runs; returns how many still do.
fn wait_gone(pids: &[u32], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let left = pids.iter().filter(|p| alive(**p)).count();
        if left == 0 || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---- registry -----------------------------------------------------------------------------

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Records a running instance (written whole, then renamed into place).
pub(crate) fn register(
    state_dir: &Path,
    instance: &str,
    service: &str,
    version: &str,
    pgid: u32,
) -> std::io::Result<()> {
    let dir = state_dir.join(RUN_DIR);
    std::fs::create_dir_all(&dir)?;
    let name = safe_component(instance);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    write!(
        f,
        "instance={instance}\nservice={service}\nversion={version}\npgid={pgid}\nstarted_ms={}\n",
        now_ms()
    )?;
    drop(f);
    std::fs::rename(tmp, dir.join(name))
}

pub(crate) fn unregister(state_dir: &Path, instance: &str) {
    let _ = std::fs::remove_file(state_dir.join(RUN_DIR).join(safe_component(instance)));
}

/// The instances the registry of `state_dir` lists as running.
pub fn registered(state_dir: &Path) -> Vec<Registered> {
    let Ok(entries) = std::fs::read_dir(state_dir.join(RUN_DIR)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path()).ok()?;
            let get = |k: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
                    .map(str::to_owned)
            };
            Some(Registered {
                instance: get("instance")?,
                service: get("service")?,
                version: get("version")?,
                pgid: get("pgid")?.parse().ok()?,
                started_ms: get("started_ms")?.parse().ok()?,
            })
        })
        .collect()
}

// ---- the sweep ----------------------------------------------------------------------------

/// An exclusive `flock` on `state_dir/keeper.lock`, released when dropped.
// The file is never read: holding it open is what holds the lock.
pub(crate) struct StateLock(#[allow(dead_code)] std::fs::File);

impl StateLock {
    /// Takes the lock, waiting up to `within` for its holder (a keeper still sweeping, or a
    /// live daemon's keeper) to let go.
    pub fn acquire(state_dir: &Path, within: Duration) -> std::io::Result<StateLock> {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(state_dir.join(LOCK_FILE))?;
        let deadline = Instant::now() + within;
        loop {
            // SAFETY: flock(2) on a descriptor this function owns; no memory is involved.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(StateLock(f));
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(e);
            }
            if Instant::now() >= deadline {
                return Err(std::io::Error::new(std::io::ErrorKind::WouldBlock, e));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Takes the lock, waiting as long as it takes.
    pub fn acquire_blocking(state_dir: &Path) -> std::io::Result<StateLock> {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(state_dir.join(LOCK_FILE))?;
        loop {
            // SAFETY: flock(2) on a descriptor this function owns; no memory is involved.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(StateLock(f));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Kills whatever instances of `state_dir` (canonical) are still running, assuming no daemon
/// of it is alive: the caller holds the state lock. Blocking; returns what it found. Creates
/// nothing: the keeper may sweep a state dir that is being deleted (the demo's).
pub(crate) fn sweep_locked(state_dir: &Path) -> Swept {
    let mut swept = Swept::default();

    // 1. cgroups: the recorded one (a daemon that ran in another cgroup) and ours.
    let mut cgroups: Vec<PathBuf> = Vec::new();
    if let Ok(text) = std::fs::read(state_dir.join(CGROUP_RECORD)) {
        let text = text.strip_suffix(b"\n").unwrap_or(&text);
        if !text.is_empty() {
            cgroups.push(PathBuf::from(std::ffi::OsStr::from_bytes(text)));
        }
    }
    if let Some(ours) = cgroup_for(state_dir)
        && !cgroups.contains(&ours)
    {
        cgroups.push(ours);
    }
    let mut in_cgroups = Vec::new();
    for dir in &cgroups {
        // Only what cutover made: a `cutover-*` cgroup (the record lives in a state dir the
        // user controls, but a stray path must not make the sweep kill a whole machine slice).
        let ours = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("cutover-"));
        if !ours || !dir.join("cgroup.kill").exists() {
            continue;
        }
        let pids = cgroup_pids(dir);
        swept.processes += pids.len();
        in_cgroups.extend(pids);
        kill_cgroup(dir);
        let deadline = Instant::now() + GONE_WITHIN;
        while cgroup_populated(dir) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        remove_cgroup(dir);
        swept.cgroups += 1;
    }

    // 2. Marked processes, and the recorded groups of ours.
    let state = marker(state_dir);
    let recorded: Vec<Registered> = registered(state_dir);
    let mut killed: Vec<u32> = Vec::new();
    let procs = processes();
    for p in &procs {
        if in_cgroups.contains(&p.pid) {
            continue;
        }
        let mut ours = environ_has(p.pid, &[&state]);
        if !ours && let Some(r) = recorded.iter().find(|r| r.pgid == p.pgid) {
            // A recorded group id could have been reused by an unrelated program since; only
            // a member that carries our instance's marker proves the group is ours.
            let inst = format!("CUTOVER_INSTANCE={}", r.instance).into_bytes();
            ours = procs
                .iter()
                .filter(|q| q.pgid == p.pgid)
                .any(|q| environ_has(q.pid, &[&inst, &state]));
        }
        if ours {
            signal_pid(p.pid, libc::SIGKILL);
            killed.push(p.pid);
        }
    }
    swept.processes += killed.len();
    killed.extend(in_cgroups);
    swept.survivors = wait_gone(&killed, GONE_WITHIN);

    // 3. Nothing recorded runs any more.
    if let Ok(entries) = std::fs::read_dir(state_dir.join(RUN_DIR)) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    swept
}

/// Kills everything a previous daemon of `state_dir` left running, waiting (up to `within`)
/// for that daemon's keeper to finish its own sweep first. Fails if the lock stays taken,
/// which means another daemon with this state dir is alive.
pub fn sweep_leftovers(state_dir: &Path, within: Duration) -> std::io::Result<Swept> {
    let state_dir = canonical_state_dir(state_dir);
    let _lock = StateLock::acquire(&state_dir, within)?;
    Ok(sweep_locked(&state_dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_safe_as_one_path_component() {
        assert_eq!(safe_component("web-v1.2-3"), "web-v1.2-3");
        assert_eq!(safe_component("../x/y"), ".._x_y");
        assert_eq!(safe_component(".."), "_..");
        assert_eq!(safe_component(""), "_");
    }

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(
            unescape_mount("/sys/fs/cgroup/my\\040dir"),
            PathBuf::from("/sys/fs/cgroup/my dir")
        );
        assert_eq!(unescape_mount("/a\\9b"), PathBuf::from("/a\\9b"));
    }

    #[test]
    fn the_registry_lists_what_was_registered() {
        let dir = tempfile::tempdir().unwrap();
        register(dir.path(), "web-v1-1", "web", "v1", 42).unwrap();
        let r = registered(dir.path());
        assert_eq!(r.len(), 1);
        assert_eq!(
            (
                r[0].instance.as_str(),
                r[0].service.as_str(),
                r[0].version.as_str(),
                r[0].pgid
            ),
            ("web-v1-1", "web", "v1", 42)
        );
        unregister(dir.path(), "web-v1-1");
        assert!(registered(dir.path()).is_empty());
    }
}
