//! Writing to stdout and stderr without panicking when the reader has gone.
//!
//! `println!` panics when stdout is a pipe whose reader has exited (`cutover status | head -1`
//! reads one line and leaves: the next write fails with EPIPE). Every command writes through
//! here instead: a closed stdout becomes [`Code::Closed`], which `main` turns into a quiet,
//! successful exit, since the reader got all it wanted. Stderr is where failures are told, so a
//! failed write there is ignored: nobody is left to tell.

use std::fmt::Display;
use std::io::Write;

use crate::exit::{CliError, CliResult, Code};

fn stdout_error(e: &std::io::Error) -> CliError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        CliError::new(Code::Closed, "stdout was closed")
    } else {
        CliError::new(Code::Failure, format!("cannot write to stdout: {e}"))
    }
}

/// `println!`, but a closed stdout is an error to return, not a panic.
pub fn out(text: impl Display) -> CliResult {
    let mut o = std::io::stdout().lock();
    writeln!(o, "{text}")
        .and_then(|()| o.flush())
        .map_err(|e| stdout_error(&e))
}

/// `print!` and flush: for text that ends without a newline, or already has its own.
pub fn out_raw(text: &str) -> CliResult {
    let mut o = std::io::stdout().lock();
    o.write_all(text.as_bytes())
        .and_then(|()| o.flush())
        .map_err(|e| stdout_error(&e))
}

/// `eprintln!` that never panics.
pub fn err(text: impl Display) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// Resolves when stdout is a pipe whose reader has gone, and never otherwise (a terminal, a
/// file). `status --watch` prints only when something changes, so without this it would notice
/// that `| head` has left only at the next change, and the pipeline would hang until then.
pub async fn stdout_closed() {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    // A detached thread, not `spawn_blocking`: it may wait forever, and a runtime waits for its
    // blocking tasks when it shuts down. It ends with the process.
    let spawned = std::thread::Builder::new()
        .name("stdout-watch".into())
        .spawn(move || {
            let stdout = std::io::stdout();
            // No events asked for: poll(2) still reports POLLERR, which a pipe's write end gets
            // once its reader is gone (and POLLHUP, a hung-up terminal). A regular file reports
            // neither, so this waits forever there, as it should.
            let mut fds = [rustix::event::PollFd::new(
                &stdout,
                rustix::event::PollFlags::empty(),
            )];
            loop {
                match rustix::event::poll(&mut fds, None) {
                    Ok(_) if !fds[0].revents().is_empty() => {
                        let _ = tx.send(());
                        return;
                    }
                    Ok(_) | Err(rustix::io::Errno::INTR) => continue,
                    // Nothing to watch with: dropping the sender leaves the waiter pending.
                    Err(_) => return,
                }
            }
        });
    if spawned.is_err() || rx.await.is_err() {
        std::future::pending::<()>().await;
    }
}
