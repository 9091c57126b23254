//! CPU stress beside a process instance (docs/reference.md §11, action `cpu-stress`).
//!
//! The instance's threads are pinned to one of the CPUs they may run on, and a busy loop (the
//! hidden `cutover __burn` subcommand) is pinned to the same CPU, busy for `load` of every
//! 100 ms. The instance then has to share that CPU with it, as it would with a noisy
//! neighbour, while the rest of the machine (the daemon's proxy among it) keeps the other
//! CPUs. At the end the burner is killed and the instance's threads get their CPUs back.
//!
//! Nothing of it can outlive what started it: the burner has its own deadline, gets SIGKILL
//! from the kernel when the thread that forked it dies (`PR_SET_PDEATHSIG`), and also exits
//! when it finds that its parent changed (checked every slice). A restarted instance is a new
//! process and starts with every CPU.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The hidden subcommand of the cutover binary that runs the busy loop.
pub const BURN_COMMAND: &str = "__burn";

/// One slice of the busy loop: busy for `load` of it, asleep for the rest.
const SLICE: Duration = Duration::from_millis(100);

/// The CPUs a thread may run on (`None` if it is gone).
pub(crate) fn affinity(tid: i32) -> Option<libc::cpu_set_t> {
    // SAFETY: `set` is a plain bit set that sched_getaffinity fills; its size is passed.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let r = libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set);
        (r == 0).then_some(set)
    }
}

/// Pins a thread to `set`; false if it is gone (a thread may end at any time).
pub(crate) fn set_affinity(tid: i32, set: &libc::cpu_set_t) -> bool {
    // SAFETY: `set` is a valid cpu_set_t of the size passed; the kernel only reads it.
    unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), set) == 0 }
}

/// A set with only `cpu`.
pub(crate) fn only(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: CPU_ZERO and CPU_SET write bits inside the zeroed set; `cpu` is below
    // CPU_SETSIZE (checked by the caller's `cpus`).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        set
    }
}

/// The CPUs in a set, lowest first.
pub(crate) fn cpus(set: &libc::cpu_set_t) -> Vec<usize> {
    let max = usize::try_from(libc::CPU_SETSIZE).unwrap_or(1024);
    // SAFETY: CPU_ISSET reads a bit inside the set for every index below CPU_SETSIZE.
    (0..max)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, set) })
        .collect()
}

/// Every thread of the processes `pids`.
pub(crate) fn threads(pids: &[u32]) -> Vec<i32> {
    let mut out = Vec::new();
    for pid in pids {
        let dir = PathBuf::from(format!("/proc/{pid}/task"));
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        out.extend(
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok()),
        );
    }
    out
}

/// Pins every thread of `pids` to `set`; how many it pinned.
pub(crate) fn pin_all(pids: &[u32], set: &libc::cpu_set_t) -> usize {
    threads(pids)
        .into_iter()
        .filter(|t| set_affinity(*t, set))
        .count()
}

/// The busy loop's arguments: `LOAD MILLIS CPU`.
pub fn burn_args(load: f64, duration: Duration, cpu: usize) -> Vec<String> {
    vec![
        BURN_COMMAND.to_owned(),
        format!("{load}"),
        duration.as_millis().to_string(),
        cpu.to_string(),
    ]
}

/// `cutover __burn LOAD MILLIS CPU`: pins itself to CPU and is busy for LOAD of every 100 ms
/// until MILLIS have passed or its parent is gone.
pub fn burn_main(args: &[String]) -> Result<(), String> {
    let usage = || "usage: cutover __burn LOAD MILLIS CPU".to_owned();
    let [load, millis, cpu] = args else {
        return Err(usage());
    };
    let load: f64 = load.parse().map_err(|_| usage())?;
    let millis: u64 = millis.parse().map_err(|_| usage())?;
    let cpu: usize = cpu.parse().map_err(|_| usage())?;
    if !(load > 0.0 && load <= 1.0) {
        return Err(format!("LOAD {load} is a share above 0 and at most 1"));
    }
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    if !set_affinity(0, &only(cpu)) {
        return Err(format!(
            "cannot pin the busy loop to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let end = Instant::now() + Duration::from_millis(millis);
    let busy = SLICE.mul_f64(load);
    let mut spin: u64 = 0;
    while Instant::now() < end {
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } != parent {
            break;
        }
        let slice = Instant::now();
        while slice.elapsed() < busy {
            spin = std::hint::black_box(spin.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        if let Some(rest) = SLICE.checked_sub(slice.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    Ok(())
}

/// Spawns the busy loop as a child of the calling thread, which must live as long as the
/// stress may (the controller's thread does).
pub(crate) fn spawn_burner(
    self_exe: &Path,
    load: f64,
    duration: Duration,
    cpu: usize,
) -> std::io::Result<tokio::process::Child> {
    use std::os::unix::process::CommandExt as _;
    let parent = std::process::id();
    let mut cmd = std::process::Command::new(self_exe);
    cmd.args(burn_args(load, duration, cpu))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: the closure runs in the forked child before exec and calls only the
    // async-signal-safe prctl, getppid and _exit.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    cmd.spawn()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_and_cpus_round_trip() {
        assert_eq!(cpus(&only(0)), vec![0]);
        assert_eq!(cpus(&only(3)), vec![3]);
        let mine = affinity(0).expect("own affinity");
        assert!(!cpus(&mine).is_empty());
    }

    #[test]
    fn the_burner_refuses_bad_arguments() {
        assert!(burn_main(&["2".into(), "10".into(), "0".into()]).is_err());
        assert!(burn_main(&["x".into(), "10".into(), "0".into()]).is_err());
        assert!(burn_main(&[]).is_err());
        assert_eq!(
            burn_args(0.5, Duration::from_secs(2), 1),
            ["__burn", "0.5", "2000", "1"]
        );
    }

    #[test]
    fn the_burner_ends_at_its_deadline() {
        let t = Instant::now();
        burn_main(&["0.2".into(), "250".into(), "0".into()]).expect("burn");
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(250), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
}
