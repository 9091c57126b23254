//! Running one command the way hooks, migrations and the PostgreSQL tools are run: an argv
//! (no shell), a timeout, and a bounded tail of what it wrote.
//!
//! The command gets its own process group, so a timeout (SIGTERM, then SIGKILL after a grace)
//! reaches whatever it started, and so does dropping the future (a cancelled job). Its output,
//! stdout and stderr together, goes through a fixed-size ring: a command that writes gigabytes
//! costs no more memory than one that writes a line, and the end of it (what usually says what
//! went wrong) is kept. With `marker`, the command carries the daemon's state-dir marker in its
//! environment, which is how the daemon's keeper finds and kills it if the daemon dies (so a
//! migration never outlives the daemon that ran it).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Bytes of output kept (the end of it).
const TAIL_BYTES: usize = 8 * 1024;
/// Lines of the tail shown in an event.
const TAIL_LINES: usize = 12;
/// Characters of one line shown in an event.
const LINE_CHARS: usize = 240;
/// After SIGTERM on a timeout, how long the command has before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);
/// Most bytes of stdout kept when it is captured (psql's answers).
const CAPTURE_MAX: usize = 64 * 1024 * 1024;

/// A command to run.
#[derive(Clone, Debug, Default)]
pub struct Cmd {
    pub argv: Vec<String>,
    /// Added to the daemon's own environment.
    pub env: BTreeMap<String, String>,
    pub workdir: Option<PathBuf>,
    pub timeout: Duration,
    /// Keep stdout whole (up to 64 MiB) instead of in the tail.
    pub capture: bool,
    /// Written to its stdin, then stdin is closed.
    pub stdin: Option<Vec<u8>>,
    /// Where the command's process group is registered while it runs, so that its owner
    /// can kill every command it has running at once ([`Groups::kill_all`]).
    pub groups: Option<Groups>,
}

impl Cmd {
    pub fn new(argv: Vec<String>, timeout: Duration) -> Cmd {
        Cmd {
            argv,
            timeout,
            ..Cmd::default()
        }
    }

    /// The command as a person would type it, for messages (never with the environment).
    pub fn shown(&self) -> String {
        self.argv
            .iter()
            .map(|a| {
                if a.is_empty() || a.contains(char::is_whitespace) {
                    format!("{a:?}")
                } else {
                    a.clone()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// How a command ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    Exited(i32),
    Signaled(i32),
    /// It ran longer than its timeout and was killed.
    TimedOut,
    /// It could not be started (no such program, not executable).
    NotStarted(String),
}

/// What running a command gave.
#[derive(Clone, Debug)]
pub struct Ran {
    pub ending: Ending,
    pub duration: Duration,
    /// The last lines of its output (stdout and stderr together, or stderr alone when stdout
    /// is captured).
    pub tail: Vec<String>,
    /// Bytes it wrote in all.
    pub output_bytes: u64,
    /// Its stdout, when captured.
    pub stdout: Vec<u8>,
}

impl Ran {
    pub fn ok(&self) -> bool {
        self.ending == Ending::Exited(0)
    }

    /// `exited with code 3 after 1.2s; last output: … ⏎ …` (the output only on failure).
    pub fn describe(&self, timeout: Duration) -> String {
        let took = secs(self.duration);
        let how = match &self.ending {
            Ending::Exited(0) => return format!("passed in {took}"),
            Ending::Exited(c) => format!("exited with code {c} after {took}"),
            Ending::Signaled(s) => format!("was killed by signal {s} after {took}"),
            Ending::TimedOut => format!("timed out after {} and was killed", secs(timeout)),
            Ending::NotStarted(why) => return format!("could not be started: {why}"),
        };
        if self.tail.is_empty() {
            format!("{how}; it wrote nothing")
        } else {
            format!("{how}; last output: {}", self.tail.join(" ⏎ "))
        }
    }
}

/// `1.2s`, `250ms`, `3m04s`.
pub fn secs(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

/// The end of a stream of bytes, in a ring of fixed size.
#[derive(Default)]
struct Tail {
    ring: VecDeque<u8>,
    total: u64,
}

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let bytes = &bytes[bytes.len().saturating_sub(TAIL_BYTES)..];
        let over = (self.ring.len() + bytes.len()).saturating_sub(TAIL_BYTES);
        self.ring.drain(..over);
        self.ring.extend(bytes);
    }

    fn lines(&self) -> Vec<String> {
        let (a, b) = self.ring.as_slices();
        let text = String::from_utf8_lossy(&[a, b].concat()).into_owned();
        let mut lines: Vec<String> = text
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.is_empty())
            .map(|l| {
                if l.chars().count() > LINE_CHARS {
                    format!("{}…", l.chars().take(LINE_CHARS).collect::<String>())
                } else {
                    l.to_owned()
                }
            })
            .collect();
        // The first line may be the end of a longer one cut by the ring.
        if self.total > TAIL_BYTES as u64 && !lines.is_empty() {
            lines[0] = format!("…{}", lines[0]);
        }
        let skip = lines.len().saturating_sub(TAIL_LINES);
        lines.split_off(skip)
    }
}

async fn pump(mut from: impl AsyncRead + Unpin, tail: Arc<Mutex<Tail>>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Ok(mut t) = tail.lock() {
                    t.push(&buf[..n]);
                }
            }
        }
    }
}

async fn capture(mut from: impl AsyncRead + Unpin, tail: Arc<Mutex<Tail>>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => {
                if out.len() + n <= CAPTURE_MAX {
                    out.extend_from_slice(&buf[..n]);
                } else if let Ok(mut t) = tail.lock() {
                    t.push(&buf[..n]);
                }
            }
        }
    }
}

/// The process groups of the commands one owner (the daemon's driver) runs now.
#[derive(Clone, Debug, Default)]
pub struct Groups(Arc<Mutex<Vec<i32>>>);

impl Groups {
    /// Kills every command registered here that runs now, and what they started. The daemon
    /// calls it when it stops or replaces itself (a restart in place), after which nothing
    /// would wait for them.
    pub fn kill_all(&self) {
        let groups = self.0.lock().map(|g| g.clone()).unwrap_or_default();
        for g in groups {
            if let Some(p) = rustix::process::Pid::from_raw(g) {
                let _ = rustix::process::kill_process_group(p, rustix::process::Signal::KILL);
            }
        }
    }
}

/// Kills the command's process group when dropped before the command was reaped: a timeout,
/// or the job running it cancelled.
struct GroupGuard {
    pgid: Option<rustix::process::Pid>,
    groups: Option<Groups>,
}

impl GroupGuard {
    fn new(pgid: Option<rustix::process::Pid>, groups: Option<Groups>) -> GroupGuard {
        if let (Some(p), Some(g)) = (pgid, &groups)
            && let Ok(mut g) = g.0.lock()
        {
            g.push(p.as_raw_nonzero().get());
        }
        GroupGuard { pgid, groups }
    }

    fn signal(&self, sig: rustix::process::Signal) {
        if let Some(p) = self.pgid {
            let _ = rustix::process::kill_process_group(p, sig);
        }
    }

    /// The command was reaped: its group is not ours to signal any more.
    fn reaped(&mut self) {
        if let (Some(p), Some(g)) = (self.pgid.take(), &self.groups)
            && let Ok(mut g) = g.0.lock()
        {
            g.retain(|x| *x != p.as_raw_nonzero().get());
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.signal(rustix::process::Signal::KILL);
        self.reaped();
    }
}

/// Where `program` is: a path with a directory part relative to `workdir`, else as given (a
/// bare name is looked up in PATH when it starts).
fn program_path(program: &str, workdir: Option<&Path>) -> PathBuf {
    let p = PathBuf::from(program);
    match workdir {
        Some(dir) if p.is_relative() && p.components().count() > 1 => dir.join(p),
        _ => p,
    }
}

/// Runs `cmd` to its end or its timeout.
pub async fn run(cmd: &Cmd) -> Ran {
    let started = Instant::now();
    let not_started = |why: String| Ran {
        ending: Ending::NotStarted(why),
        duration: started.elapsed(),
        tail: Vec::new(),
        output_bytes: 0,
        stdout: Vec::new(),
    };
    let Some((program, args)) = cmd.argv.split_first() else {
        return not_started("the command is empty".into());
    };
    let path = program_path(program, cmd.workdir.as_deref());
    let mut c = tokio::process::Command::new(&path);
    c.args(args)
        .envs(&cmd.env)
        .stdin(if cmd.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .process_group(0)
        .kill_on_drop(true);
    // Unless stdout is captured, stdout and stderr share one pipe, so the tail keeps the
    // order in which the command wrote its lines.
    let mut merged = None;
    if cmd.capture {
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
    } else {
        match std::io::pipe().and_then(|(r, w)| Ok((r, w.try_clone()?, w))) {
            Ok((r, w1, w2)) => {
                c.stdout(w1).stderr(w2);
                merged = Some(r);
            }
            Err(e) => return not_started(format!("cannot create a pipe: {e}")),
        }
    }
    if let Some(dir) = &cmd.workdir {
        c.current_dir(dir);
    }
    let spawned = c.spawn();
    // The command holds the pipe's write ends: dropped now, the reader sees the end of the
    // output when the command (and what it started) closes its own.
    drop(c);
    let mut child = match spawned {
        Ok(ch) => ch,
        Err(e) => {
            let why = match e.kind() {
                std::io::ErrorKind::NotFound => format!("{} not found", path.display()),
                std::io::ErrorKind::PermissionDenied => format!(
                    "{} is not executable (chmod +x it, or name its interpreter first)",
                    path.display()
                ),
                _ => format!("{}: {e}", path.display()),
            };
            return not_started(why);
        }
    };
    let mut guard = GroupGuard::new(
        child
            .id()
            .and_then(|id| rustix::process::Pid::from_raw(i32::try_from(id).unwrap_or(0))),
        cmd.groups.clone(),
    );
    let tail = Arc::new(Mutex::new(Tail::default()));
    if let (Some(mut stdin), Some(bytes)) = (child.stdin.take(), cmd.stdin.clone()) {
        tokio::spawn(async move {
            let _ = stdin.write_all(&bytes).await;
        });
    }
    let merged = match merged
        .map(|r| tokio::net::unix::pipe::Receiver::from_owned_fd(std::os::fd::OwnedFd::from(r)))
        .transpose()
    {
        Ok(m) => m,
        Err(e) => return not_started(format!("cannot read the command's output: {e}")),
    };
    let out = child.stdout.take();
    let err = child.stderr.take();
    let (t1, t2) = (tail.clone(), tail.clone());
    let want_stdout = cmd.capture;
    // The readers run apart from the wait: a command that leaves a background process holding
    // its output open must not hold its own ending.
    let readers = tokio::spawn(async move {
        let stdout = async move {
            match out {
                Some(o) if want_stdout => capture(o, t1).await,
                Some(o) => {
                    pump(o, t1).await;
                    Vec::new()
                }
                None => Vec::new(),
            }
        };
        let stderr = async move {
            if let Some(e) = err {
                pump(e, t2).await;
            } else if let Some(m) = merged {
                pump(m, t2).await;
            }
        };
        let (stdout, ()) = tokio::join!(stdout, stderr);
        stdout
    });
    let waited = tokio::time::timeout(cmd.timeout, child.wait()).await;
    let ending = match waited {
        Ok(Ok(status)) => {
            use std::os::unix::process::ExitStatusExt;
            guard.reaped();
            match (status.code(), status.signal()) {
                (Some(code), _) => Ending::Exited(code),
                (None, Some(sig)) => Ending::Signaled(sig),
                (None, None) => Ending::Exited(-1),
            }
        }
        Ok(Err(e)) => Ending::NotStarted(format!("waiting for it failed: {e}")),
        Err(_) => {
            guard.signal(rustix::process::Signal::TERM);
            if tokio::time::timeout(TERM_GRACE, child.wait())
                .await
                .is_err()
            {
                guard.signal(rustix::process::Signal::KILL);
                let _ = child.wait().await;
            }
            guard.reaped();
            Ending::TimedOut
        }
    };
    let duration = started.elapsed();
    let stdout = tokio::time::timeout(Duration::from_secs(1), readers)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let (lines, total) = tail
        .lock()
        .map(|t| (t.lines(), t.total))
        .unwrap_or_default();
    Ran {
        ending,
        duration,
        tail: lines,
        output_bytes: total + stdout.len() as u64,
        stdout,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn sh(script: &str, timeout: Duration) -> Cmd {
        Cmd::new(vec!["sh".into(), "-c".into(), script.into()], timeout)
    }

    #[tokio::test]
    async fn passes_fails_and_keeps_the_end_of_the_output() {
        let ok = run(&sh("echo hello", Duration::from_secs(5))).await;
        assert!(ok.ok(), "{ok:?}");
        let bad = run(&sh(
            "echo one; echo two >&2; echo three; exit 3",
            Duration::from_secs(5),
        ))
        .await;
        assert_eq!(bad.ending, Ending::Exited(3));
        assert_eq!(
            bad.tail,
            vec!["one", "two", "three"],
            "in the order written"
        );
        let text = bad.describe(Duration::from_secs(5));
        assert!(text.starts_with("exited with code 3 after"), "{text}");
        assert!(text.contains("last output:"), "{text}");
    }

    #[tokio::test]
    async fn megabytes_of_output_keep_a_bounded_tail() {
        // 20 MB of output: the tail holds the end, and memory does not grow with it.
        let r = run(&sh(
            "head -c 20000000 /dev/zero | tr '\\0' 'x' | fold -w 100; echo; echo THE-END",
            Duration::from_secs(30),
        ))
        .await;
        assert!(r.ok(), "{r:?}");
        assert!(r.output_bytes > 20_000_000);
        assert_eq!(r.tail.last().map(String::as_str), Some("THE-END"));
        assert!(r.tail.len() <= TAIL_LINES);
        assert!(r.tail.iter().map(String::len).sum::<usize>() <= TAIL_BYTES + 64);
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        let script = format!("(sleep 2; touch {}) & sleep 60", marker.display());
        let r = run(&sh(&script, Duration::from_millis(300))).await;
        assert_eq!(r.ending, Ending::TimedOut);
        assert!(r.duration < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!marker.exists(), "the background child was killed too");
        assert!(
            r.describe(Duration::from_millis(300))
                .contains("timed out after 300ms")
        );
    }

    #[tokio::test]
    async fn a_missing_or_not_executable_program_says_so() {
        let r = run(&Cmd::new(
            vec!["/no/such/hook".into()],
            Duration::from_secs(1),
        ))
        .await;
        assert!(
            matches!(&r.ending, Ending::NotStarted(w) if w.contains("not found")),
            "{r:?}"
        );
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("gate.sh");
        std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
        let r = run(&Cmd::new(
            vec![script.display().to_string()],
            Duration::from_secs(1),
        ))
        .await;
        assert!(
            matches!(&r.ending, Ending::NotStarted(w) if w.contains("not executable")),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn a_background_process_holding_the_output_does_not_hold_the_ending() {
        let r = run(&sh("sleep 30 & echo started", Duration::from_secs(20))).await;
        assert!(r.ok());
        assert!(r.duration < Duration::from_secs(5), "{:?}", r.duration);
    }

    #[tokio::test]
    async fn stdout_can_be_captured_and_stdin_given() {
        let mut c = sh("cat; echo err >&2", Duration::from_secs(5));
        c.capture = true;
        c.stdin = Some(b"a\tb\n".to_vec());
        let r = run(&c).await;
        assert!(r.ok());
        assert_eq!(r.stdout, b"a\tb\n");
        assert_eq!(r.tail, vec!["err".to_owned()]);
    }
}
