//! An instance's stdout and stderr, appended line by line to
//! `logs/<service>/<version>/<instance>.log` and rotated by size; and the last lines of its
//! stderr, kept in memory for the report of an exit.
//!
//! Rotation keeps `files` files per instance: the current one and `.log.1` (newest) up to
//! `.log.<files-1>`, each at most `max_bytes` (10 MiB × 5 by default), so a chatty instance can
//! never fill the disk. Output is written in whole lines: stdout and stderr share one file, and
//! a line cut in two by the other stream, or by a rotation, would be unreadable. `cutover logs`
//! reads these files directly, with the same layout ([`log_path`], [`rotated_path`]).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

use crate::contain::safe_component;

/// Size and number of an instance's log files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogLimits {
    /// A file is rotated before a write would take it past this size.
    pub max_bytes: u64,
    /// Files kept per instance, the current one included (at least 1).
    pub files: usize,
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits {
            max_bytes: 10 * 1024 * 1024,
            files: 5,
        }
    }
}

/// A line longer than this is written in pieces (a program that never prints a newline must
/// not make the daemon buffer without bound).
const MAX_LINE: usize = 64 * 1024;
/// Lines of stderr kept for an exit report, and the bytes kept of each.
pub const TAIL_LINES: usize = 10;
pub const TAIL_LINE_BYTES: usize = 512;

/// The current log file of an instance.
pub fn log_path(logs_dir: &Path, service: &str, version: &str, instance: &str) -> PathBuf {
    logs_dir
        .join(safe_component(service))
        .join(safe_component(version))
        .join(format!("{}.log", safe_component(instance)))
}

/// The `i`th older file of the log at `path` (1 is the newest).
pub fn rotated_path(path: &Path, i: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

/// One instance's log file, shared by its stdout and stderr pumps and kept across restarts.
pub struct LogFile {
    path: PathBuf,
    state: Mutex<Option<(tokio::fs::File, u64)>>,
    limits: LogLimits,
}

impl LogFile {
    pub fn new(path: PathBuf, limits: LogLimits) -> Self {
        LogFile {
            path,
            state: Mutex::new(None),
            limits,
        }
    }

    /// Appends `bytes` (whole lines), rotating first whenever the next lines would not fit.
    pub async fn write(&self, mut bytes: &[u8]) -> std::io::Result<()> {
        let max = usize::try_from(self.limits.max_bytes)
            .unwrap_or(usize::MAX)
            .max(1);
        while bytes.len() > max {
            // As many whole lines as fit; a single longer line goes alone.
            let cut = bytes[..max]
                .iter()
                .rposition(|b| *b == b'\n')
                .map(|i| i + 1)
                .or_else(|| bytes.iter().position(|b| *b == b'\n').map(|i| i + 1))
                .unwrap_or(bytes.len());
            let (now, rest) = bytes.split_at(cut);
            self.write_fitting(now).await?;
            bytes = rest;
        }
        if bytes.is_empty() {
            return Ok(());
        }
        self.write_fitting(bytes).await
    }

    async fn write_fitting(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut st = self.state.lock().await;
        let full = st
            .as_ref()
            .is_some_and(|(_, n)| *n > 0 && *n + bytes.len() as u64 > self.limits.max_bytes);
        if full {
            // Close before renaming so that a reader that sees a new file at `path` knows the
            // old one is complete.
            *st = None;
            self.rotate().await;
        }
        if st.is_none() {
            if let Some(dir) = self.path.parent() {
                tokio::fs::create_dir_all(dir).await?;
            }
            let f = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .await?;
            let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
            *st = Some((f, len));
            if len > 0 && len + bytes.len() as u64 > self.limits.max_bytes {
                // A file left big by an earlier run (or earlier limits).
                *st = None;
                self.rotate().await;
                let f = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)
                    .await?;
                *st = Some((f, 0));
            }
        }
        if let Some((f, n)) = st.as_mut() {
            f.write_all(bytes).await?;
            // tokio's File hands writes to a blocking thread; flush so the bytes are in the
            // file when this returns, not whenever that thread gets to them.
            f.flush().await?;
            *n += bytes.len() as u64;
        }
        Ok(())
    }

    async fn rotate(&self) {
        let keep = self.limits.files.max(1);
        if keep == 1 {
            let _ = tokio::fs::remove_file(&self.path).await;
            return;
        }
        let _ = tokio::fs::remove_file(rotated_path(&self.path, keep - 1)).await;
        for i in (1..keep - 1).rev() {
            let _ = tokio::fs::rename(rotated_path(&self.path, i), rotated_path(&self.path, i + 1))
                .await;
        }
        let _ = tokio::fs::rename(&self.path, rotated_path(&self.path, 1)).await;
    }

    /// Copies `r` into the log, in whole lines, until it ends (the process tree closed the
    /// pipe); feeds `tail` with every line when given.
    pub async fn pump(&self, mut r: impl AsyncRead + Unpin, tail: Option<Arc<StderrTail>>) {
        let mut buf = vec![0u8; 16 * 1024];
        let mut pending: Vec<u8> = Vec::new();
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
            let cut = match pending.iter().rposition(|b| *b == b'\n') {
                Some(i) => i + 1,
                None if pending.len() >= MAX_LINE => {
                    pending.push(b'\n');
                    pending.len()
                }
                None => continue,
            };
            let rest = pending.split_off(cut);
            self.emit(&pending, tail.as_deref()).await;
            pending = rest;
        }
        if !pending.is_empty() {
            pending.push(b'\n');
            self.emit(&pending, tail.as_deref()).await;
        }
    }

    async fn emit(&self, lines: &[u8], tail: Option<&StderrTail>) {
        if let Some(t) = tail {
            t.push(lines);
        }
        // A full disk must not block the instance: the pump keeps draining the pipe.
        let _ = self.write(lines).await;
    }
}

/// The last lines an instance wrote to stderr, bounded in lines and bytes.
#[derive(Default)]
pub struct StderrTail {
    lines: std::sync::Mutex<VecDeque<String>>,
}

impl StderrTail {
    /// Adds the lines of `bytes` (each ending in `\n`).
    fn push(&self, bytes: &[u8]) {
        let Ok(mut lines) = self.lines.lock() else {
            return;
        };
        for raw in bytes.split(|b| *b == b'\n') {
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            if raw.is_empty() {
                continue;
            }
            let cut = &raw[..raw.len().min(TAIL_LINE_BYTES)];
            let mut line = String::from_utf8_lossy(cut).into_owned();
            if cut.len() < raw.len() {
                line.push('…');
            }
            if lines.len() == TAIL_LINES {
                lines.pop_front();
            }
            lines.push_back(line);
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rotates_by_size_and_keeps_the_configured_number_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.log");
        let log = LogFile::new(
            path.clone(),
            LogLimits {
                max_bytes: 20,
                files: 3,
            },
        );
        for i in 0..6 {
            log.write(format!("line {i:04}\n").as_bytes())
                .await
                .unwrap();
        }
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(path.clone()), "line 0004\nline 0005\n");
        assert_eq!(read(rotated_path(&path, 1)), "line 0002\nline 0003\n");
        assert_eq!(read(rotated_path(&path, 2)), "line 0000\nline 0001\n");
        assert!(!rotated_path(&path, 3).exists());
        log.write(b"line 0006\n").await.unwrap();
        assert_eq!(read(rotated_path(&path, 2)), "line 0002\nline 0003\n");
        assert!(!rotated_path(&path, 3).exists(), "the oldest is dropped");
    }

    #[tokio::test]
    async fn pump_writes_whole_lines_and_keeps_a_bounded_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.log");
        let log = LogFile::new(path.clone(), LogLimits::default());
        let tail = Arc::new(StderrTail::default());
        let long = "x".repeat(TAIL_LINE_BYTES + 10);
        let mut input = String::new();
        for i in 0..15 {
            input.push_str(&format!("err {i}\r\n"));
        }
        input.push_str(&long);
        input.push_str("\nno newline at the end");
        // A reader that hands out a few bytes at a time, cutting lines anywhere.
        let (mut w, r) = tokio::io::duplex(7);
        let writer = tokio::spawn(async move {
            w.write_all(input.as_bytes()).await.unwrap();
        });
        log.pump(r, Some(tail.clone())).await;
        writer.await.unwrap();
        let lines = tail.lines();
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines[0], "err 7");
        assert_eq!(lines[7], "err 14");
        assert_eq!(lines[8], format!("{}…", &long[..TAIL_LINE_BYTES]));
        assert_eq!(lines[9], "no newline at the end");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with("no newline at the end\n"), "{text:?}");
    }
}
