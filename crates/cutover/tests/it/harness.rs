//! A real `cutover up` in a temporary directory, driven through the real CLI, plus a load
//! generator that tallies every answer by the version that served it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const EXE: &str = env!("CARGO_BIN_EXE_cutover");

/// A port for a daemon's listener, never handed out twice in this test process.
///
/// A port from the kernel (bind to 0) is released before the daemon binds it, so another test
/// asking at the same moment could be given the same one. These come from below the kernel's
/// ephemeral range (32768 and up on Linux), where the kernel never picks ports for binds to 0
/// or for outgoing connections, through one counter per process (each a port that binds now),
/// so tests running side by side never collide.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const LOW: u16 = 20_000;
    const SPAN: u16 = 12_000;
    // Test binaries run one after another, but start each at its own place in the range.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = LOW + (std::process::id() % u32::from(SPAN / 2)) as u16;
    loop {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(n < SPAN / 2, "ran out of test ports");
        let port = base + n;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A fast config: short health intervals and steps so a rollout takes seconds.
pub const FAST: &str = r#"
[daemon]
api = "127.0.0.1:API_PORT"
state_dir = "state"
worker_threads = 2

[services.web]
listen = "127.0.0.1:WEB_PORT"
version = "v1"
command = ["cutover", "demo-app", "--port", "{port}", "--version", "{version}"]
instances = 2
strategy = "canary"
drain_timeout = "5s"
stop_timeout = "2s"
progress_deadline = "20s"

[services.web.health]
path = "/healthz"
interval = "200ms"
timeout = "150ms"
healthy_threshold = 1
unhealthy_threshold = 2

[services.web.canary]
steps = STEPS

[services.web.blue_green]
auto_promote = AUTO_PROMOTE
preview_listen = "127.0.0.1:PREVIEW_PORT"
scale_down_delay = "1s"

[services.web.analysis]
interval = "500ms"
min_requests = 20
max_error_rate = 0.01
max_p99 = "500ms"
failure_limit = 2
compare_to_stable = true
"#;

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub api: SocketAddr,
    pub web: SocketAddr,
    /// The blue-green preview listener.
    pub preview: SocketAddr,
    /// Extra environment for `cutover up`.
    pub env: Vec<(String, String)>,
    /// Extra arguments for `cutover up` (e.g. `--reset-state`).
    pub up_args: Vec<String>,
    /// Shell commands run before `cutover up` replaces the shell (`ulimit -n 1024`, `umask 0`).
    pub shell_prefix: Option<String>,
    child: Option<Child>,
}

impl Daemon {
    /// Starts a daemon with `FAST` and the given canary steps, and waits for v1 to be healthy.
    pub fn start(steps: &str) -> Daemon {
        Daemon::start_with(steps, "")
    }

    /// Like `start`, with `extra` TOML appended to the config.
    pub fn start_with(steps: &str, extra: &str) -> Daemon {
        Daemon::start_edited(|t| t.replace("STEPS", steps) + extra)
    }

    /// Starts a daemon with `FAST` as `edit` changes it (`STEPS` must be replaced;
    /// `AUTO_PROMOTE` is `true` unless replaced).
    pub fn start_edited(edit: impl FnOnce(String) -> String) -> Daemon {
        let mut d = Daemon::create(edit);
        d.spawn();
        d.wait_for("v1 healthy on 2 instances", |s| healthy(s, "v1") >= 2);
        d
    }

    /// Writes the config as `start_edited` does, but starts nothing.
    pub fn create(edit: impl FnOnce(String) -> String) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let (api, web, preview) = (free_port(), free_port(), free_port());
        let text = edit(
            FAST.replace("API_PORT", &api.to_string())
                .replace("WEB_PORT", &web.to_string())
                .replace("PREVIEW_PORT", &preview.to_string()),
        )
        .replace("AUTO_PROMOTE", "true");
        let config = dir.path().join("cutover.toml");
        std::fs::write(&config, text).unwrap();
        Daemon {
            dir,
            config,
            api: SocketAddr::from(([127, 0, 0, 1], api)),
            web: SocketAddr::from(([127, 0, 0, 1], web)),
            preview: SocketAddr::from(([127, 0, 0, 1], preview)),
            env: Vec::new(),
            up_args: Vec::new(),
            shell_prefix: None,
            child: None,
        }
    }

    /// `cutover up` in the config's directory, and waits for its API.
    pub fn spawn(&mut self) {
        let (cwd, config) = (self.dir.path().to_owned(), self.config.clone());
        self.spawn_from(&cwd, config.to_str().unwrap());
    }

    /// The daemon's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `cutover -c CONFIG up` run from `cwd`; waits for its API.
    pub fn spawn_from(&mut self, cwd: &Path, config: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        let mut command = match &self.shell_prefix {
            // `exec`: the daemon keeps the shell's pid, so `pid()` and `stop()` still reach it.
            Some(p) => {
                let mut c = Command::new("sh");
                c.args(["-c", &format!("{p}; exec \"$0\" \"$@\""), EXE]);
                c
            }
            None => Command::new(EXE),
        };
        let child = command
            .args(["-c", config, "up"])
            .args(&self.up_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while http(self.api, "GET", "/healthz", None, "").0 != 200 {
            assert!(
                Instant::now() < deadline,
                "daemon did not come up:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("state/token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(EXE)
            .args(["-c", self.config.to_str().unwrap()])
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("CUTOVER_TOKEN")
            .output()
            .unwrap()
    }

    pub fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "web", "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Polls `status web` until `f` holds (a readiness signal, not a timing assertion: the
    /// generous limit only stops a broken build from hanging the suite).
    pub fn wait_for(
        &self,
        what: &str,
        f: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        self.wait_for_service("web", what, f)
    }

    /// Polls `status SERVICE` until `f` holds, like [`Daemon::wait_for`].
    pub fn wait_for_service(
        &self,
        service: &str,
        what: &str,
        mut f: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.cli(&["status", service, "--json"]);
            if out.status.success() {
                let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                if f(&s) {
                    return s;
                }
                assert!(
                    Instant::now() < deadline,
                    "gave up waiting for {what}; last status {s:#}\n{}",
                    self.log()
                );
            } else {
                assert!(
                    Instant::now() < deadline,
                    "gave up waiting for {what}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        c.wait().ok()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Healthy instances of `version` in a status document.
pub fn healthy(s: &serde_json::Value, version: &str) -> usize {
    s["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|i| i["version"] == version && i["health"] == "healthy")
                .count()
        })
        .unwrap_or(0)
}

/// A minimal blocking HTTP/1.1 request: `(status, body)`; status 0 when the connection failed.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The pid of a process instance as `status --json` shows it (`"runs_as": "pid 4242"`).
pub fn pid_of(instance: &serde_json::Value) -> Option<u64> {
    instance["runs_as"]
        .as_str()?
        .strip_prefix("pid ")?
        .parse()
        .ok()
}

pub fn pid_alive(pid: u32) -> bool {
    // A zombie is dead for our purposes: it runs no code and holds no port.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .map(|(_, r)| !r.starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

/// What the load generator saw.
#[derive(Default, Debug, Clone)]
pub struct Tally {
    /// version → (answers, 5xx answers)
    pub per_version: BTreeMap<String, (u64, u64)>,
    /// Requests that got no HTTP answer at all, or an answer from the proxy itself.
    pub failed: u64,
    /// Why the first few of them failed, so an assertion on `failed` explains itself.
    pub reasons: Vec<String>,
}

impl Tally {
    /// 5xx answers and failures, except those of `version`.
    pub fn errors_except(&self, version: &str) -> u64 {
        self.failed
            + self
                .per_version
                .iter()
                .filter(|(v, _)| v.as_str() != version)
                .map(|(_, (_, e))| e)
                .sum::<u64>()
    }
}

/// `workers` threads each sending requests over one keep-alive connection, pausing `gap`
/// between requests, until stopped (and at most 3 minutes).
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: SocketAddr, workers: usize, gap: Duration) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let threads = (0..workers)
            .map(|_| {
                let (stop, tally) = (stop.clone(), tally.clone());
                std::thread::spawn(move || worker(addr, gap, &stop, &tally))
            })
            .collect();
        Load {
            stop,
            tally,
            threads,
        }
    }

    /// Answers counted so far.
    pub fn answered(&self) -> u64 {
        let t = self.tally.lock().unwrap();
        t.per_version.values().map(|(n, _)| n).sum::<u64>() + t.failed
    }

    /// Waits until `n` more answers have come back (the load is flowing).
    pub fn wait_answers(&self, n: u64) {
        let target = self.answered() + n;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.answered() < target {
            assert!(Instant::now() < deadline, "the load stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn stop(self) -> Tally {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for t in self.threads {
            t.join().unwrap();
        }
        self.tally.lock().unwrap().clone()
    }
}

fn worker(
    addr: SocketAddr,
    gap: Duration,
    stop: &std::sync::atomic::AtomicBool,
    tally: &Mutex<Tally>,
) {
    let end = Instant::now() + Duration::from_secs(180);
    let mut conn: Option<std::io::BufReader<TcpStream>> = None;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < end {
        if conn.is_none() {
            conn = TcpStream::connect(addr).ok().map(|s| {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                std::io::BufReader::new(s)
            });
        }
        let outcome = match conn.as_mut() {
            Some(c) => one_request(c, addr),
            None => Err("cannot connect".to_owned()),
        };
        let mut t = tally.lock().unwrap();
        match outcome {
            Ok((status, version, close)) => {
                let e = t.per_version.entry(version).or_default();
                e.0 += 1;
                e.1 += u64::from(status >= 500);
                if close {
                    conn = None;
                }
            }
            Err(why) => {
                t.failed += 1;
                if t.reasons.len() < 5 {
                    t.reasons.push(why);
                }
                conn = None;
            }
        }
        drop(t);
        std::thread::sleep(gap);
    }
}

/// One keep-alive GET: `(status, version that answered, server asked to close)`, or why it got
/// no answer from an instance.
fn one_request(
    c: &mut std::io::BufReader<TcpStream>,
    addr: SocketAddr,
) -> Result<(u16, String, bool), String> {
    use std::io::BufRead;
    let req = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    c.get_mut()
        .write_all(req.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    c.read_line(&mut line)
        .map_err(|e| format!("read status line: {e}"))?;
    let status: u16 = line
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {line:?}"))?;
    let (mut len, mut close) = (0usize, false);
    loop {
        let mut h = String::new();
        c.read_line(&mut h)
            .map_err(|e| format!("read header: {e}"))?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| format!("bad header {h:?}"))?;
        match k.to_ascii_lowercase().as_str() {
            "content-length" => {
                len = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("bad content-length {v:?}"))?;
            }
            "connection" => close = v.trim().eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let mut body = vec![0; len];
    c.read_exact(&mut body)
        .map_err(|e| format!("read body: {e}"))?;
    serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["version"].as_str().map(str::to_owned))
        // The proxy's own answers are errors; a success is an app's, even one (not the
        // demo-app) that does not name its version.
        .or_else(|| (status < 400).then(|| "(unnamed)".to_owned()))
        .map(|version| (status, version, close))
        .ok_or_else(|| {
            format!(
                "{status} from the proxy: {}",
                String::from_utf8_lossy(&body).trim()
            )
        })
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// The `(kind, message)` of each event of rollout `id`, from the API.
pub fn rollout_events(d: &Daemon, id: i64) -> Vec<(String, String)> {
    let (status, body) = http(
        d.api,
        "GET",
        &format!("/api/v1/rollouts/{id}"),
        Some(&d.token()),
        "",
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_owned(),
                e["message"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// `config` with its `command = [...]` line replaced by `line`.
pub fn with_command(config: &str, line: &str) -> String {
    let old = config
        .lines()
        .find(|l| l.starts_with("command = "))
        .unwrap()
        .to_owned();
    config.replace(&old, line)
}
