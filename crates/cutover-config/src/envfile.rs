//! Env files (`deploy --env-file`, the service key `env_file`): `KEY=VALUE` lines, `#`
//! comments and blank lines, an optional `export ` before the name, values optionally in
//! matching single or double quotes (taken as they are: no escapes, no expansion). A `#` after
//! a value is part of it. Messages name `PATH:LINE` but never show the line, since it may hold
//! a secret.

use std::collections::BTreeMap;
use std::path::Path;

/// Reads an env file; the error names the file (and line) and never a value.
pub fn read_env_file(path: &Path) -> Result<BTreeMap<String, String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read env file {}: {e}", path.display()))?;
    let mut env = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let bad = |what: &str| {
            format!(
                "{}:{}: {what} (the line is not shown: it may hold a secret)",
                path.display(),
                i + 1
            )
        };
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| bad("expected KEY=VALUE"))?;
        let key = key.trim();
        let valid = key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(bad(
                "the name before '=' is not a variable name (letters, digits and '_', not starting with a digit)",
            ));
        }
        let value = value.trim();
        let unquoted = ['"', '\'']
            .iter()
            .find_map(|q| value.strip_prefix(*q).and_then(|v| v.strip_suffix(*q)))
            .unwrap_or(value);
        env.insert(key.to_owned(), unquoted.to_owned());
    }
    Ok(env)
}
