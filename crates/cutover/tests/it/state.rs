//! The daemon's state on disk: a full disk mid-rollout (persist-then-act), and damaged, lost
//! or restored state (refused at start, snapshots, `cutover state`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{Daemon, healthy, stderr};

const SLOW_STEPS: &str = r#"[ { weight = 20, pause = "1h" }, { weight = 100 } ]"#;

/// A small tmpfs mounted on a directory, unmounted (lazily, so even while in use) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap_or_else(|e| panic!("this test needs `mount` (as root): {e}"));
        // A loud failure, never a skip: the full-disk behaviour is what this test proves.
        assert!(
            out.status.success(),
            "this test needs to mount a tmpfs (run the tests as root, or in a container with CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_owned())
    }

    /// Writes a file until the file system is full.
    fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 16 * 1024];
        while f.write_all(&chunk).is_ok() {}
        // Tail bytes, down to the last block.
        while f.write_all(&[0u8; 512]).is_ok() {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn history(d: &Daemon) -> serde_json::Value {
    let out = d.cli(&["history", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_full_disk_holds_the_rollout_until_its_state_is_saved() {
    let mut d = Daemon::create(|t| t.replace("STEPS", SLOW_STEPS));
    let disk = Tmpfs::mount(&d.dir.path().join("state"), "4m");
    d.spawn();
    d.wait_for("v1 healthy", |s| healthy(s, "v1") >= 2);
    assert!(d.cli(&["deploy", "web", "v2"]).status.success());
    d.wait_for("v2 at 20%", |s| s["weights"]["v2"] == 20);

    // 1. Full disk, then recovery in place: the promotion waits for the write.
    let filler = disk.fill();
    let out = d.cli(&["promote", "web"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a promotion that cannot be saved must fail, not be carried out: {}\n{}",
        stderr(&out),
        d.log()
    );
    assert!(
        stderr(&out).contains("could not be saved"),
        "{}",
        stderr(&out)
    );
    let s = d.wait_for("degraded", |s| s["degraded"].is_string());
    assert!(
        s["degraded"].as_str().unwrap().contains("full"),
        "the reason names the full disk: {s:#}"
    );
    assert_eq!(s["weights"]["v2"], 20, "held at the durable step: {s:#}");
    assert_eq!(s["stable"], "v1");
    assert_eq!(history(&d)["rollouts"][0]["outcome"], "in-progress");
    assert!(!d.log().contains("acting anyway"), "{}", d.log());
    std::fs::remove_file(&filler).unwrap();
    let s = d.wait_for("the held promotion carried out", |s| {
        s["degraded"].is_null() && s["phase"] == "stable"
    });
    assert_eq!(s["stable"], "v2", "{s:#}");
    assert_eq!(history(&d)["rollouts"][0]["outcome"], "promoted");

    // 2. Full disk, kill -9, space again, restart: the durable checkpoint is the world.
    d.wait_for("v2 alone", |s| healthy(s, "v2") >= 2);
    assert!(d.cli(&["deploy", "web", "v3"]).status.success());
    d.wait_for("v3 at 20%", |s| s["weights"]["v3"] == 20);
    let filler = disk.fill();
    assert_eq!(d.cli(&["promote", "web"]).status.code(), Some(1));
    d.wait_for("degraded", |s| s["degraded"].is_string());
    d.kill9();
    std::fs::remove_file(&filler).unwrap();
    d.spawn();
    let s = d.wait_for("the rollout resumed at its durable step", |s| {
        s["weights"]["v3"] == 20 && healthy(s, "v3") >= 2
    });
    assert_eq!(
        s["stable"], "v2",
        "the promoted version is still stable: {s:#}"
    );
    assert_eq!(s["phase"], "progressing", "{s:#}");
    let h = history(&d);
    assert_eq!(h["rollouts"][0]["outcome"], "in-progress", "{h:#}");
    assert_eq!(h["rollouts"][1]["outcome"], "promoted", "{h:#}");
    assert!(d.cli(&["promote", "web"]).status.success());
    let s = d.wait_for("v3 promoted", |s| s["phase"] == "stable");
    assert_eq!(s["stable"], "v3");
    d.stop();
    drop(disk);
}

/// `cutover up` that must refuse to start: its output once it exits (within 20 s; a daemon
/// still running then started on state it should have refused).
fn up_refused(d: &Daemon, extra: &[&str]) -> std::process::Output {
    let mut child = Command::new(crate::harness::EXE)
        .args(["-c", d.config.to_str().unwrap(), "up"])
        .args(extra)
        .current_dir(d.dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "`cutover up` started on state it should have refused:\n{}",
                stderr(&out)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// Deploys `version` and promotes it to the end.
fn promote_to(d: &Daemon, version: &str) {
    assert!(d.cli(&["deploy", "web", version]).status.success());
    d.wait_for("the candidate at 20%", |s| s["weights"][version] == 20);
    assert!(d.cli(&["promote", "web"]).status.success());
    d.wait_for("the promotion", |s| {
        s["phase"] == "stable" && s["stable"] == version
    });
}

#[test]
fn a_damaged_database_is_refused_and_a_snapshot_restores_it() {
    let mut d = Daemon::start(SLOW_STEPS);
    promote_to(&d, "v2");
    // One snapshot after the finished rollout; restoring is refused while the daemon runs.
    let list: serde_json::Value =
        serde_json::from_slice(&d.cli(&["state", "list", "--json"]).stdout).unwrap();
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 1, "{list:#}");
    let out = d.cli(&["state", "restore"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("running"), "{}", stderr(&out));
    // A rollout in progress at 20%, then one bad page: the one that holds `rollouts`.
    assert!(d.cli(&["deploy", "web", "v3"]).status.success());
    d.wait_for("v3 at 20%", |s| s["weights"]["v3"] == 20);
    d.stop();
    let db = d.dir.path().join("state/state.db");
    let root: i64 = {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.pragma_update(None, "wal_checkpoint", "TRUNCATE").unwrap();
        c.query_row(
            "SELECT rootpage FROM sqlite_master WHERE name = 'rollouts'",
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    let mut bytes = std::fs::read(&db).unwrap();
    let page = usize::try_from(root - 1).unwrap() * 4096;
    for b in &mut bytes[page..page + 4096] {
        *b = 0xa5;
    }
    std::fs::write(&db, &bytes).unwrap();

    let out = up_refused(&d, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let why = stderr(&out);
    for needle in [
        "state.db",
        "damaged",
        "cutover state restore",
        "--reset-state",
    ] {
        assert!(why.contains(needle), "{needle:?} not in: {why}");
    }

    let out = d.cli(&["state", "restore"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("web v2"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    d.spawn();
    let s = d.wait_for("v2 healthy again", |s| healthy(s, "v2") >= 2);
    assert_eq!(s["stable"], "v2", "{s:#}");
    let h = history(&d);
    assert_eq!(h["rollouts"][0]["outcome"], "promoted", "{h:#}");
    assert_eq!(h["rollouts"][0]["to"], "v2", "{h:#}");
}

#[test]
fn a_lost_database_is_refused_unless_reset() {
    let mut d = Daemon::start(SLOW_STEPS);
    promote_to(&d, "v2");
    d.stop();
    let state = d.dir.path().join("state");
    for ext in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(state.join(format!("state.db{ext}")));
    }
    // 0 bytes: what a full disk or a bad copy leaves.
    std::fs::write(state.join("state.db"), b"").unwrap();
    let out = up_refused(&d, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let why = stderr(&out);
    for needle in [
        "missing or empty",
        "web v2",
        "cutover state restore",
        "--reset-state",
    ] {
        assert!(why.contains(needle), "{needle:?} not in: {why}");
    }
    // Gone altogether: the same.
    std::fs::remove_file(state.join("state.db")).unwrap();
    assert_eq!(up_refused(&d, &[]).status.code(), Some(1));
    // Asked for: the config's version.
    d.up_args = vec!["--reset-state".into()];
    d.spawn();
    let s = d.wait_for("v1 from the config", |s| healthy(s, "v1") >= 2);
    assert_eq!(s["stable"], "v1");
}
