//! Exit codes (docs/reference.md §9) and the error type that carries one.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// Stdout's reader has gone (`| head`): stop quietly and successfully, like `yes | head`
    /// without the SIGPIPE status.
    Closed = 0,
    /// The operation ran but its outcome is a failure.
    Failure = 1,
    /// Usage or configuration error.
    Usage = 2,
    /// Daemon unreachable or authentication refused.
    Unreachable = 3,
    /// Conflict, e.g. a rollout already in progress.
    Conflict = 4,
}

/// An error for the user: one sentence, and the exit code it deserves.
#[derive(Debug)]
pub struct CliError {
    pub code: Code,
    pub message: String,
}

impl CliError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        CliError {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<CliError>() {
            Ok(c) => c,
            Err(e) => CliError::new(Code::Failure, format!("{e:#}")),
        }
    }
}

pub type CliResult<T = ()> = Result<T, CliError>;
