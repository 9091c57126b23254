//! An instance's stdout and stderr, appended to `logs/<instance>.log` and rotated by size.
//!
//! Rotation keeps `KEEP` old files (`.log.1` newest): a chatty instance can never fill the disk.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

const MAX_BYTES: u64 = 10 * 1024 * 1024;
const KEEP: usize = 3;

/// One instance's log file, shared by its stdout and stderr readers.
pub struct LogFile {
    path: PathBuf,
    state: Mutex<Option<(tokio::fs::File, u64)>>,
    max_bytes: u64,
}

impl LogFile {
    pub fn new(path: PathBuf) -> Self {
        LogFile::with_limit(path, MAX_BYTES)
    }

    pub fn with_limit(path: PathBuf, max_bytes: u64) -> Self {
        LogFile {
            path,
            state: Mutex::new(None),
            max_bytes,
        }
    }

    pub async fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut st = self.state.lock().await;
        if st.as_ref().is_none_or(|(_, n)| *n >= self.max_bytes) {
            if st.is_some() {
                *st = None;
                rotate(&self.path).await;
            }
            let f = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .await?;
            let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
            *st = Some((f, len));
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

    /// Copies `r` into the log until it ends (the process closed the pipe).
    pub async fn pump(&self, mut r: impl AsyncRead + Unpin) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if self.write(&buf[..n]).await.is_err() {
                        // A full disk must not block the instance: keep draining the pipe.
                        continue;
                    }
                }
            }
        }
    }
}

fn numbered(path: &Path, i: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

async fn rotate(path: &Path) {
    for i in (1..KEEP).rev() {
        let _ = tokio::fs::rename(numbered(path, i), numbered(path, i + 1)).await;
    }
    let _ = tokio::fs::rename(path, numbered(path, 1)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rotates_by_size_and_keeps_three() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.log");
        let log = LogFile::with_limit(path.clone(), 10);
        for i in 0..6 {
            log.write(format!("line {i:04}\n").as_bytes())
                .await
                .unwrap();
        }
        assert_eq!(
            tokio::fs::read_to_string(&path).await.unwrap(),
            "line 0005\n"
        );
        assert_eq!(
            tokio::fs::read_to_string(numbered(&path, 1)).await.unwrap(),
            "line 0004\n"
        );
        assert_eq!(
            tokio::fs::read_to_string(numbered(&path, 3)).await.unwrap(),
            "line 0002\n"
        );
        assert!(!numbered(&path, 4).exists());
    }
}
