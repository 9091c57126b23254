//! `cutover logs`: the output of a service's instances. Docker services' comes from the Engine
//! (`containers::logs`); process services' is read straight from the files the process
//! runtime writes (`state_dir/logs/<service>/<version>/<instance>.log`, rotated to
//! `.log.1`, `.log.2`, …), so it works whether or not the daemon is up.
//!
//! Which instances: `--instance` names one; otherwise those running now (the runtime's registry
//! in `state_dir/run/`), newest first, or if none runs, the one that ran last; `--version`
//! narrows either to one version. Each line is prefixed with `instance | ` unless one instance
//! was asked for. `--follow` polls the files: it reads a rotated file to its end before it
//! opens the new one, and picks up instances that start while it runs.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use cutover_config::{RuntimeSettings, Settings};
use cutover_runtime::logs::rotated_path;

use crate::cli::LogsArgs;
use crate::exit::{CliError, CliResult, Code};

/// How often `--follow` looks for new lines, and for new instances.
const POLL: Duration = Duration::from_millis(200);
const DISCOVER: Duration = Duration::from_secs(1);

/// One instance that has a log.
#[derive(Clone, Debug)]
struct Found {
    instance: String,
    version: String,
    path: PathBuf,
    running: bool,
    /// Its start (running) or its last write (stopped), in ms since the epoch: newest first.
    recency: u64,
}

pub fn run(settings: &Settings, a: &LogsArgs) -> CliResult {
    let Some(service) = settings.service(&a.service) else {
        let names: Vec<&str> = settings.services.iter().map(|s| s.name.as_str()).collect();
        return Err(CliError::new(
            Code::Usage,
            format!(
                "no service named {:?} in {}; services: {}",
                a.service,
                settings.file.display(),
                names.join(", ")
            ),
        ));
    };
    if let RuntimeSettings::Docker(d) = &service.runtime {
        // Containers keep their output in the Engine, not in the state dir.
        return crate::containers::logs(settings, d, a);
    }
    if matches!(service.runtime, RuntimeSettings::Static { .. }) {
        return Err(CliError::new(
            Code::Usage,
            format!(
                "{} is a static service: cutover runs none of its instances, so it has no logs of them",
                a.service
            ),
        ));
    }
    let state_dir = &settings.daemon.state_dir;
    let service_dir = state_dir
        .join("logs")
        .join(cutover_runtime::safe_component(&a.service));
    let all = find(state_dir, &service_dir, &a.service);
    let chosen = choose(&all, a, &service_dir)?;
    let prefixed = a.instance.is_none();
    let mut out = Out::new(prefixed);
    for f in &chosen {
        for line in last_lines(&f.path, a.lines) {
            if !out.line(&f.instance, &line) {
                return Ok(());
            }
        }
    }
    if !out.flush() || !a.follow {
        return Ok(());
    }
    let mut tails: Vec<Tail> = chosen
        .iter()
        .map(|f| Tail::at_end(&f.instance, &f.path))
        .collect();
    let mut seen: BTreeSet<String> = chosen.iter().map(|f| f.instance.clone()).collect();
    let mut discovered = Instant::now();
    loop {
        for t in &mut tails {
            if !t.poll(&mut out) {
                return Ok(());
            }
        }
        if !out.flush() {
            return Ok(());
        }
        if a.instance.is_none() && discovered.elapsed() >= DISCOVER {
            discovered = Instant::now();
            // Instances started since: read from their beginning.
            for f in find(state_dir, &service_dir, &a.service) {
                let wanted = a.version.as_ref().is_none_or(|v| *v == f.version);
                if f.running && wanted && seen.insert(f.instance.clone()) {
                    tails.push(Tail::from_start(&f.instance, &f.path));
                }
            }
        }
        std::thread::sleep(POLL);
    }
}

/// Every instance of the service with a current log file.
fn find(state_dir: &Path, service_dir: &Path, service: &str) -> Vec<Found> {
    let running = cutover_runtime::registered(state_dir);
    let mut found = Vec::new();
    let Ok(versions) = std::fs::read_dir(service_dir) else {
        return found;
    };
    for v in versions.flatten() {
        let Ok(files) = std::fs::read_dir(v.path()) else {
            continue;
        };
        let version = v.file_name().to_string_lossy().into_owned();
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            let Some(instance) = name.strip_suffix(".log") else {
                continue;
            };
            let reg = running
                .iter()
                .find(|r| r.service == service && r.instance == instance);
            let modified = f
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0);
            found.push(Found {
                instance: instance.to_owned(),
                version: version.clone(),
                path: f.path(),
                running: reg.is_some(),
                recency: reg.map_or(modified, |r| r.started_ms),
            });
        }
    }
    // Running first, then newest first; the name breaks ties so the order is stable.
    found.sort_by(|a, b| {
        (b.running, b.recency)
            .cmp(&(a.running, a.recency))
            .then_with(|| a.instance.cmp(&b.instance))
    });
    found
}

fn choose(all: &[Found], a: &LogsArgs, dir: &Path) -> CliResult<Vec<Found>> {
    let service = &a.service;
    let mut pool: Vec<Found> = all.to_vec();
    if let Some(v) = &a.version {
        pool.retain(|f| &f.version == v);
        if pool.is_empty() {
            let versions: BTreeSet<&str> = all.iter().map(|f| f.version.as_str()).collect();
            return Err(CliError::new(
                Code::Usage,
                if versions.is_empty() {
                    format!(
                        "{service} has no logs yet, of {v} or any version (looked in {})",
                        dir.display()
                    )
                } else {
                    format!(
                        "{service} has no logs of version {v}; versions with logs: {}",
                        versions.into_iter().collect::<Vec<_>>().join(", ")
                    )
                },
            ));
        }
    }
    if let Some(id) = &a.instance {
        let one: Vec<Found> = pool.iter().filter(|f| &f.instance == id).cloned().collect();
        if one.is_empty() {
            let names: Vec<&str> = pool.iter().take(10).map(|f| f.instance.as_str()).collect();
            return Err(CliError::new(
                Code::Usage,
                if names.is_empty() {
                    format!(
                        "{service} has no instance {id:?} with logs; none has logs yet (looked in {})",
                        dir.display()
                    )
                } else {
                    format!(
                        "{service} has no instance {id:?} with logs{}; instances, newest first: {}",
                        a.version
                            .as_ref()
                            .map(|v| format!(" of {v}"))
                            .unwrap_or_default(),
                        names.join(", ")
                    )
                },
            ));
        }
        return Ok(one);
    }
    let running: Vec<Found> = pool.iter().filter(|f| f.running).cloned().collect();
    if !running.is_empty() {
        return Ok(running);
    }
    match pool.into_iter().next() {
        Some(newest) => Ok(vec![newest]),
        None if a.follow => {
            crate::output::err(format_args!(
                "cutover: {service} has no logs yet; waiting for its instances to start"
            ));
            Ok(Vec::new())
        }
        None => Err(CliError::new(
            Code::Failure,
            format!(
                "{service} has no logs yet: its instances write them to {} once `cutover up` starts them",
                dir.display()
            ),
        )),
    }
}

/// stdout, line by line; `false` once it is gone (a closed pipe ends the command quietly).
struct Out {
    w: std::io::BufWriter<std::io::Stdout>,
    prefixed: bool,
}

impl Out {
    fn new(prefixed: bool) -> Out {
        Out {
            w: std::io::BufWriter::new(std::io::stdout()),
            prefixed,
        }
    }

    fn line(&mut self, instance: &str, line: &[u8]) -> bool {
        let line = String::from_utf8_lossy(line);
        let r = if self.prefixed {
            writeln!(self.w, "{instance} | {line}")
        } else {
            writeln!(self.w, "{line}")
        };
        r.is_ok()
    }

    fn flush(&mut self) -> bool {
        self.w.flush().is_ok()
    }
}

/// The last `n` lines of a log, reaching into its rotated files when the current one has fewer.
fn last_lines(path: &Path, n: usize) -> Vec<Vec<u8>> {
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut i = 0;
    while lines.len() < n {
        let p = if i == 0 {
            path.to_owned()
        } else {
            rotated_path(path, i)
        };
        let Ok(mut older) = last_lines_of_file(&p, n - lines.len()) else {
            break;
        };
        older.append(&mut lines);
        lines = older;
        i += 1;
    }
    lines
}

/// The last `n` lines of one file, read from its end in blocks (a log may be 10 MiB).
fn last_lines_of_file(path: &Path, n: usize) -> std::io::Result<Vec<Vec<u8>>> {
    const BLOCK: u64 = 64 * 1024;
    let mut f = File::open(path)?;
    let mut pos = f.metadata()?.len();
    let mut buf: Vec<u8> = Vec::new();
    // n + 1 newlines before the end mean n whole lines are in `buf`.
    while pos > 0 && buf.iter().filter(|b| **b == b'\n').count() <= n {
        let step = BLOCK.min(pos);
        pos -= step;
        f.seek(SeekFrom::Start(pos))?;
        let mut chunk = vec![0u8; usize::try_from(step).unwrap_or(0)];
        f.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&buf);
        buf = chunk;
    }
    let mut lines: Vec<Vec<u8>> = buf.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
    if buf.last() == Some(&b'\n') || buf.is_empty() {
        lines.pop();
    }
    if pos > 0 && !lines.is_empty() {
        // The first piece began mid-line.
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(n);
    Ok(lines.split_off(skip))
}

/// Follows one instance's log file across rotations.
struct Tail {
    instance: String,
    path: PathBuf,
    file: Option<File>,
    ino: u64,
    pos: u64,
    pending: Vec<u8>,
}

impl Tail {
    fn at_end(instance: &str, path: &Path) -> Tail {
        let mut t = Tail::from_start(instance, path);
        if let Some(f) = &mut t.file {
            t.pos = f.seek(SeekFrom::End(0)).unwrap_or(0);
        }
        t
    }

    fn from_start(instance: &str, path: &Path) -> Tail {
        let mut t = Tail {
            instance: instance.to_owned(),
            path: path.to_owned(),
            file: None,
            ino: 0,
            pos: 0,
            pending: Vec::new(),
        };
        t.open();
        t
    }

    fn open(&mut self) {
        self.file = File::open(&self.path).ok();
        self.ino = self
            .file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.ino());
        self.pos = 0;
    }

    /// Prints what was written since the last poll; `false` once stdout is gone.
    fn poll(&mut self, out: &mut Out) -> bool {
        if !self.drain(out) {
            return false;
        }
        match std::fs::metadata(&self.path) {
            Ok(m) if m.ino() != self.ino => {
                // Rotated: the writer closed the old file before renaming it, but it may have
                // written to it since the read above. Finish it, then start on the new one.
                if !self.drain(out) {
                    return false;
                }
                if !self.pending.is_empty() {
                    let rest = std::mem::take(&mut self.pending);
                    if !out.line(&self.instance, &rest) {
                        return false;
                    }
                }
                self.open();
                self.drain(out)
            }
            Ok(m) if m.len() < self.pos => {
                // Truncated in place by someone: start again from its beginning.
                if let Some(f) = &mut self.file {
                    self.pos = f.seek(SeekFrom::Start(0)).unwrap_or(0);
                }
                self.pending.clear();
                self.drain(out)
            }
            _ => true,
        }
    }

    /// Reads the open file to its end and prints its whole lines.
    fn drain(&mut self, out: &mut Out) -> bool {
        let Some(f) = &mut self.file else {
            if self.path.exists() {
                self.open();
                return self.file.is_none() || self.drain(out);
            }
            return true;
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match f.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    self.pos += n as u64;
                    self.pending.extend_from_slice(&buf[..n]);
                }
            }
        }
        while let Some(i) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=i).collect();
            if !out.line(&self.instance, &line[..line.len() - 1]) {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_lines_reach_into_rotated_files_and_skip_partial_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.log");
        std::fs::write(rotated_path(&path, 2), "a\nb\n").unwrap();
        std::fs::write(rotated_path(&path, 1), "c\nd\n").unwrap();
        std::fs::write(&path, "e\nf\n").unwrap();
        let text = |v: Vec<Vec<u8>>| {
            v.into_iter()
                .map(|l| String::from_utf8(l).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(text(last_lines(&path, 3)), ["d", "e", "f"]);
        assert_eq!(text(last_lines(&path, 10)), ["a", "b", "c", "d", "e", "f"]);
        assert!(last_lines(&path, 0).is_empty());
        // A big file: only whole lines from its end.
        let big: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, big).unwrap();
        assert_eq!(
            text(last_lines_of_file(&path, 2).unwrap()),
            ["line 19998", "line 19999"]
        );
        assert_eq!(last_lines_of_file(&path, 15_000).unwrap().len(), 15_000);
    }
}
