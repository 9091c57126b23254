//! Instances as process trees, through the real binary: workers a forking server started die
//! with a SIGKILLed daemon (its keeper kills them) or, if the keeper died too, before the next
//! daemon starts anything; `cutover logs` reads and follows instances' output; relative
//! commands run from the config's directory; static versions use every listed address.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::harness::{Daemon, EXE, free_port, healthy, http, pid_alive, stderr, stdout, write};

/// A gunicorn-like server: the first process binds the port and forks two workers that serve
/// it; neither worker sets a parent-death signal. Prints `worker PID`, `master PID`, `cwd DIR`.
const FORKING_APP: &str = r#"#!/usr/bin/env python3
import os, signal, socket, sys
port = int(sys.argv[1])
version = os.environ.get("CUTOVER_VERSION", "")
instance = os.environ.get("CUTOVER_INSTANCE", "")
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(64)

def serve():
    while True:
        c, _ = s.accept()
        try:
            c.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = c.recv(4096)
                if not chunk:
                    break
                data += chunk
            body = ('{"version":"%s","instance":"%s","pid":%d}' % (version, instance, os.getpid())).encode()
            head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
            c.sendall(head.encode() + body)
        except Exception:
            pass
        finally:
            c.close()

for _ in range(2):
    pid = os.fork()
    if pid == 0:
        serve()
        os._exit(0)
    print("worker %d" % pid, flush=True)
print("master %d" % os.getpid(), flush=True)
print("cwd %s" % os.getcwd(), flush=True)
print("to stderr", file=sys.stderr, flush=True)
while True:
    signal.pause()
"#;

/// `FAST` with the forking app as the command, and the app written beside the config.
fn forking_daemon(env: &[(&str, &str)]) -> Daemon {
    let mut d = Daemon::create(|t| {
        t.replace(
            r#"command = ["cutover", "demo-app", "--port", "{port}", "--version", "{version}"]"#,
            r#"command = ["./forking.py", "{port}"]"#,
        )
        .replace("STEPS", r#"[ { weight = 100 } ]"#)
    });
    install_app(d.dir.path());
    d.env = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    d.spawn();
    d.wait_for("v1 healthy on 2 instances", |s| healthy(s, "v1") >= 2);
    d
}

fn install_app(dir: &Path) {
    let app = write(dir, "forking.py", FORKING_APP);
    std::fs::set_permissions(&app, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// The log files of the daemon's instances of `version`.
fn logs_of(d: &Daemon, version: &str) -> Vec<PathBuf> {
    let dir = d.dir.path().join("state/logs/web").join(version);
    std::fs::read_dir(dir)
        .map(|e| e.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Waits until the instances' logs show `want` lines starting with `key`; returns the rest of
/// each.
fn lines_in_logs(d: &Daemon, key: &str, want: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found: Vec<String> = logs_of(d, "v1")
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .flat_map(|p| {
                std::fs::read_to_string(p)
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.strip_prefix(key).map(str::to_owned))
                    .collect::<Vec<_>>()
            })
            .collect();
        if found.len() >= want {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "the logs never showed {want} `{key}` lines:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the instances' logs show `want` lines `key PID`; returns the pids.
fn pids_in_logs(d: &Daemon, key: &str, want: usize) -> Vec<u32> {
    lines_in_logs(d, key, want)
        .iter()
        .map(|p| p.trim().parse().unwrap())
        .collect()
}

fn instance_addrs(d: &Daemon) -> Vec<SocketAddr> {
    d.status()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["address"].as_str()?.parse().ok())
        .collect()
}

fn listening(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

fn wait_dead(pids: &[u32], addrs: &[SocketAddr], what: &str, d: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alive: Vec<&u32> = pids.iter().filter(|p| pid_alive(**p)).collect();
        let open: Vec<&SocketAddr> = addrs.iter().filter(|a| listening(**a)).collect();
        if alive.is_empty() && open.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: processes {alive:?} alive, ports {open:?} open\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The keeper: the daemon's child running `cutover __keeper`.
fn keeper_of(daemon: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(") ")
                .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
            if ppid == Some(daemon) && cmdline.split(|b| *b == 0).any(|a| a == b"__keeper") {
                return pid;
            }
        }
        assert!(Instant::now() < deadline, "daemon {daemon} has no keeper");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn workers_of_a_forking_app_die_with_a_sigkilled_daemon() {
    let mut d = forking_daemon(&[]);
    let workers = pids_in_logs(&d, "worker ", 4);
    let masters = pids_in_logs(&d, "master ", 2);
    let addrs = instance_addrs(&d);
    assert_eq!(addrs.len(), 2);
    assert!(addrs.iter().all(|a| listening(*a)));
    d.kill9();
    // Nothing of the daemon runs now; its keeper, waiting on a pipe only the daemon held,
    // kills the workers at once: nobody has to start `cutover up` again.
    wait_dead(
        &[workers, masters].concat(),
        &addrs,
        "a SIGKILLed daemon's tree",
        &d,
    );
}

fn leftovers_are_swept_before_the_next_start(env: &[(&str, &str)]) {
    let mut d = forking_daemon(env);
    let workers = pids_in_logs(&d, "worker ", 4);
    let masters = pids_in_logs(&d, "master ", 2);
    let addrs = instance_addrs(&d);
    // The worst case: the keeper dies with the daemon (say both were SIGKILLed together).
    let keeper = keeper_of(d.pid().unwrap());
    assert!(
        Command::new("kill")
            .args(["-KILL", &keeper.to_string()])
            .status()
            .unwrap()
            .success()
    );
    wait_dead(&[keeper], &[], "the keeper", &d);
    d.kill9();
    wait_dead(
        &masters,
        &[],
        "the first processes (parent-death signal)",
        &d,
    );
    assert!(
        workers.iter().all(|p| pid_alive(*p)) && addrs.iter().all(|a| listening(*a)),
        "without a keeper the workers outlive the daemon and keep the ports: the premise"
    );
    d.spawn();
    // The API answers only after the sweep: no waiting here.
    let alive: Vec<&u32> = workers.iter().filter(|p| pid_alive(**p)).collect();
    assert!(
        alive.is_empty(),
        "workers {alive:?} survived the next start\n{}",
        d.log()
    );
    let new = instance_addrs(&d);
    let open: Vec<&SocketAddr> = addrs
        .iter()
        .filter(|a| !new.contains(a) && listening(**a))
        .collect();
    assert!(open.is_empty(), "old ports {open:?} still open");
    assert!(d.log().contains("left over"), "{}", d.log());
    d.wait_for("v1 healthy again", |s| healthy(s, "v1") >= 2);
}

#[test]
fn leftovers_are_swept_before_the_next_start_from_their_cgroup() {
    leftovers_are_swept_before_the_next_start(&[]);
}

#[test]
fn leftovers_are_swept_before_the_next_start_by_their_marker() {
    // Where cgroups cannot be created (a container, say): process groups and the environment
    // marker must do.
    leftovers_are_swept_before_the_next_start(&[("CUTOVER_CGROUPS", "0")]);
}

#[test]
fn a_second_daemon_on_the_same_state_dir_is_refused() {
    let d = Daemon::start(r#"[ { weight = 100 } ]"#);
    // Another config (other ports) with the same state dir.
    let text = std::fs::read_to_string(&d.config).unwrap();
    let other = text
        .replace(&d.api.port().to_string(), &free_port().to_string())
        .replace(&d.web.port().to_string(), &free_port().to_string())
        .replace(&d.preview.port().to_string(), &free_port().to_string());
    let config = write(d.dir.path(), "other.toml", &other);
    let out = Command::new(EXE)
        .args(["-c", config.to_str().unwrap(), "up"])
        .current_dir(d.dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("another cutover daemon uses the state dir"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        healthy(&d.status(), "v1"),
        2,
        "the first daemon is untouched"
    );
}

#[test]
fn logs_prints_running_instances_and_names_what_it_does_not_know() {
    let d = forking_daemon(&[]);
    lines_in_logs(&d, "cwd ", 2);
    let out = d.cli(&["logs", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let instances: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.split_once(" | ").map(|(i, _)| i))
        .collect();
    assert_eq!(
        instances.len(),
        2,
        "both running instances, each line prefixed:\n{text}"
    );
    assert!(text.lines().all(|l| l.contains(" | ")), "{text}");
    assert!(
        text.contains(" | to stderr"),
        "stderr is captured too:\n{text}"
    );
    // The instances run in the config's directory.
    let dir = std::fs::canonicalize(d.dir.path()).unwrap();
    assert!(text.contains(&format!("cwd {}", dir.display())), "{text}");

    let one = instances.iter().next().unwrap().to_string();
    let out = d.cli(&[
        "logs",
        "web",
        "--instance",
        &one,
        "--lines",
        "2",
        "--version",
        "v1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(
        !text.contains(" | "),
        "one instance asked for: no prefix\n{text}"
    );

    for (args, says) in [
        (vec!["logs", "nope"], "no service named \"nope\""),
        (
            vec!["logs", "web", "--version", "v9"],
            "no logs of version v9; versions with logs: v1",
        ),
        (
            vec!["logs", "web", "--instance", "web-v1-99"],
            "no instance \"web-v1-99\"",
        ),
    ] {
        let out = d.cli(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
}

/// A child that is killed when the test ends, also by a failed assertion: a `logs --follow`
/// left running would hold the test's output open and hang `cargo test`.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines a child prints, as they come.
fn lines_of(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn expect(rx: &mpsc::Receiver<String>, want: &str) {
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(line) => assert_eq!(line, want),
        Err(e) => panic!("no line {want:?}: {e}"),
    }
}

#[test]
fn logs_follow_reads_across_rotation_and_picks_up_new_instances() {
    // No daemon: `logs` reads the state dir directly.
    let d = Daemon::create(|t| t.replace("STEPS", r#"[ { weight = 100 } ]"#));
    let dir = d.dir.path().join("state/logs/web/v1");
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("web-v1-1.log");
    let append = |p: &Path, s: &str| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .unwrap();
        f.write_all(s.as_bytes()).unwrap();
    };
    append(&log, "old 1\nold 2\n");
    let mut child = KillOnDrop(
        Command::new(EXE)
            .args([
                "-c",
                d.config.to_str().unwrap(),
                "logs",
                "web",
                "--follow",
                "--lines",
                "1",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let rx = lines_of(&mut child.0);
    expect(&rx, "web-v1-1 | old 2");
    append(&log, "new 1\n");
    expect(&rx, "web-v1-1 | new 1");
    // Rotation as the runtime does it: rename, then a new file. A line that reached the old
    // file just before is not lost.
    let rotated = dir.join("web-v1-1.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    append(&rotated, "last of the old file\n");
    append(&log, "first of the new file\n");
    expect(&rx, "web-v1-1 | last of the old file");
    expect(&rx, "web-v1-1 | first of the new file");
    // An instance that starts meanwhile (the runtime registers it, then it writes).
    std::fs::create_dir_all(d.dir.path().join("state/run")).unwrap();
    write(
        &d.dir.path().join("state/run"),
        "web-v1-2",
        "instance=web-v1-2\nservice=web\nversion=v1\npgid=1\nstarted_ms=1\n",
    );
    append(&dir.join("web-v1-2.log"), "hello from two\n");
    expect(&rx, "web-v1-2 | hello from two");
}

#[test]
fn a_relative_command_runs_beside_the_config_from_any_directory() {
    let mut d = Daemon::create(|t| {
        t.replace(
            r#"command = ["cutover", "demo-app", "--port", "{port}", "--version", "{version}"]"#,
            r#"command = ["./forking.py", "{port}"]"#,
        )
        .replace("STEPS", r#"[ { weight = 100 } ]"#)
    });
    // The config and its app in app/, `cutover` run from elsewhere/ with `-c ../app/...`.
    let app = d.dir.path().join("app");
    let elsewhere = d.dir.path().join("elsewhere");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::rename(&d.config, app.join("cutover.toml")).unwrap();
    install_app(&app);
    d.config = app.join("cutover.toml");
    d.spawn_from(&elsewhere, "../app/cutover.toml");
    d.wait_for("v1 healthy on 2 instances", |s| healthy(s, "v1") >= 2);
    let (status, body) = http(d.web, "GET", "/", None, "");
    assert_eq!(status, 200, "{body}");
    let out = Command::new(EXE)
        .args(["-c", "../app/cutover.toml", "logs", "web"])
        .current_dir(&elsewhere)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let cwd = std::fs::canonicalize(&app).unwrap();
    assert!(
        stdout(&out).contains(&format!("cwd {}", cwd.display())),
        "{}",
        stdout(&out)
    );
    let out = Command::new(EXE)
        .args(["-c", "../app/cutover.toml", "validate", "--json"])
        .current_dir(&elsewhere)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let program = v["services"][0]["runtime"]["command"][0].as_str().unwrap();
    assert!(
        Path::new(program).is_absolute(),
        "validate shows the program that will run: {program}"
    );
    assert_eq!(
        std::fs::canonicalize(program).unwrap(),
        std::fs::canonicalize(app.join("forking.py")).unwrap()
    );
}

/// A demo-app on its own port, stopped when dropped.
struct Upstream(std::process::Child, SocketAddr);

impl Upstream {
    fn start(version: &str) -> Upstream {
        let port = free_port();
        let child = Command::new(EXE)
            .args([
                "demo-app",
                "--port",
                &port.to_string(),
                "--version",
                version,
            ])
            .env_remove("CUTOVER_INSTANCE")
            .env_remove("CUTOVER_VERSION")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while http(addr, "GET", "/healthz", None, "").0 != 200 {
            assert!(
                Instant::now() < deadline,
                "demo-app on {port} did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Upstream(child, addr)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Which upstreams (`demo-<port>`) answered `n` requests to `addr`.
fn served_by(addr: SocketAddr, n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|_| {
            let (status, body) = http(addr, "GET", "/", None, "");
            assert_eq!(status, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            v["instance"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[test]
fn static_versions_send_traffic_to_every_listed_address() {
    let v1 = [Upstream::start("v1"), Upstream::start("v1")];
    let v2 = [Upstream::start("v2"), Upstream::start("v2")];
    let v3 = [Upstream::start("v3")];
    let list = |u: &[Upstream]| {
        u.iter()
            .map(|u| format!("\"{}\"", u.1))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let names = |u: &[Upstream]| -> BTreeSet<String> {
        u.iter().map(|u| format!("demo-{}", u.1.port())).collect()
    };
    let upstreams = format!(
        "runtime = \"static\"\nupstreams = {{ v1 = [{}], v2 = [{}], v3 = [{}] }}",
        list(&v1),
        list(&v2),
        list(&v3)
    );
    let d = Daemon::start_edited(|t| {
        t.replace(
            r#"command = ["cutover", "demo-app", "--port", "{port}", "--version", "{version}"]"#,
            &upstreams,
        )
        .replace("STEPS", r#"[ { weight = 100 } ]"#)
    });
    let out = d.cli(&["validate"]);
    assert!(
        stdout(&out).contains(&format!("v1={},{}", v1[0].1, v1[1].1)),
        "{}",
        stdout(&out)
    );
    assert_eq!(served_by(d.web, 20), names(&v1), "both of v1's addresses");

    let out = d.cli(&["deploy", "web", "v2", "--wait"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    d.wait_for("v2 on 2 instances", |s| healthy(s, "v2") == 2);
    assert_eq!(served_by(d.web, 20), names(&v2), "both of v2's addresses");

    // Fewer addresses than the others: its one address serves everything.
    let out = d.cli(&["deploy", "web", "v3", "--wait"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    assert_eq!(served_by(d.web, 10), names(&v3));
}
