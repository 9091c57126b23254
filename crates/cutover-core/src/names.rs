//! Names of services, versions and instances.
//!
//! They are cheap to clone (`Arc<str>`) because the proxy and the metrics keep them in every
//! route table and per-version counter. Constructing one validates nothing; what a legal
//! service name is belongs to `cutover-config`. A version label is checked here, by
//! [`Version::parse`], because three doors let one in (the config, the CLI and the API) and
//! a label ends up in an instance's argv (`{version}`), in file and container names and in
//! metric labels: all three must apply one rule (docs/reference.md).

use std::fmt;
use std::sync::Arc;

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn new(s: impl AsRef<str>) -> Self {
                Self(Arc::from(s.as_ref()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self::new(s)
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(Arc::from(s))
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// A service as named in `[services.NAME]`.
    ServiceName
);
name_type!(
    /// A version label such as `v2`; for process services it is also `{version}` in the command.
    Version
);
/// Separates a version label from its revision (`v1@r2`): `@` is not allowed in a label a
/// user writes, so a revision never collides with a version.
const REVISION_MARK: &str = "@r";

impl Version {
    /// The label a user wrote: what `{version}` and `CUTOVER_VERSION` give an instance.
    pub fn base(&self) -> &str {
        self.as_str()
            .split_once(REVISION_MARK)
            .map_or(self.as_str(), |(b, _)| b)
    }

    /// Which revision of its label this is: 1 for the label alone, n for `label@rn`.
    pub fn revision(&self) -> u32 {
        self.as_str()
            .split_once(REVISION_MARK)
            .and_then(|(_, n)| n.parse().ok())
            .unwrap_or(1)
    }

    /// Revision `n` of `base` (a changed environment or config of the same version).
    pub fn revision_of(base: &str, n: u32) -> Version {
        if n <= 1 {
            Version::new(base)
        } else {
            Version::new(format!("{base}{REVISION_MARK}{n}"))
        }
    }
}

name_type!(
    /// One running instance, unique within the daemon, e.g. `web-v2-1`.
    InstanceId
);

/// The longest version label accepted.
pub const MAX_VERSION_LEN: usize = 128;

/// Why a string is not a version label. Its message quotes (the start of) the label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadVersion {
    /// The label as given, cut to a readable length.
    shown: String,
    why: BadVersionKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum BadVersionKind {
    Empty,
    TooLong(usize),
    /// Starts with `-` (it would read as an option in an instance's argv) or `.` (a hidden or
    /// relative file name).
    Leading(char),
    Char(char),
}

impl fmt::Display for BadVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.why {
            BadVersionKind::Empty => f.write_str("the version label is empty")?,
            BadVersionKind::TooLong(n) => write!(
                f,
                "version {:?} is {n} characters long, more than {MAX_VERSION_LEN}",
                self.shown
            )?,
            BadVersionKind::Leading(c) => {
                write!(f, "version {:?} starts with {c:?}", self.shown)?;
            }
            BadVersionKind::Char(c) => write!(f, "version {:?} contains {c:?}", self.shown)?,
        }
        f.write_str(
            "; a version is 1-128 letters, digits, '.', '_' or '-', not starting with '-' or '.'",
        )
    }
}

impl std::error::Error for BadVersion {}

impl Version {
    /// A version label as the config, the CLI and the API accept it: 1–128 characters of
    /// `[A-Za-z0-9._-]`, not starting with `-` or `.` (docs/reference.md).
    pub fn parse(s: &str) -> Result<Version, BadVersion> {
        let bad = |why| {
            // Enough to recognise it; a 10,000-character label is not echoed whole.
            let mut shown: String = s.chars().take(40).collect();
            if shown.len() < s.len() {
                shown.push('…');
            }
            Err(BadVersion { shown, why })
        };
        let n = s.chars().count();
        if n == 0 {
            return bad(BadVersionKind::Empty);
        }
        if n > MAX_VERSION_LEN {
            return bad(BadVersionKind::TooLong(n));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c)))
        {
            return bad(BadVersionKind::Char(c));
        }
        if let Some(c) = s.chars().next().filter(|c| matches!(c, '-' | '.')) {
            return bad(BadVersionKind::Leading(c));
        }
        Ok(Version::new(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_keep_their_base_label() {
        let v = Version::new("v1");
        assert_eq!((v.base(), v.revision()), ("v1", 1));
        let r = Version::revision_of("v1", 3);
        assert_eq!((r.as_str(), r.base(), r.revision()), ("v1@r3", "v1", 3));
        assert_eq!(Version::revision_of("v1", 1), v);
    }

    #[test]
    fn version_labels() {
        for ok in ["v1", "2024.11.30", "v2-rc_1", "A", "1", &"x".repeat(128)] {
            assert_eq!(Version::parse(ok).map(|v| v.to_string()).as_deref(), Ok(ok));
        }
        for (bad, says) in [
            ("", "is empty"),
            ("-rf", "starts with '-'"),
            ("--help", "starts with '-'"),
            (".hidden", "starts with '.'"),
            ("..", "starts with '.'"),
            ("v 2", "contains ' '"),
            ("v2/../x", "contains '/'"),
            ("v2\n", "contains '\\n'"),
            ("é", "contains 'é'"),
            ("v2;rm", "contains ';'"),
        ] {
            let e = Version::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
            assert!(e.ends_with("not starting with '-' or '.'"), "{e}");
        }
        let long = "v".repeat(10_000);
        let e = Version::parse(&long).unwrap_err().to_string();
        assert!(e.contains("10000 characters long, more than 128"), "{e}");
        assert!(e.len() < 200, "the label is not echoed whole: {e}");
    }
}
