//! Names of services, versions and instances.
//!
//! They are cheap to clone (`Arc<str>`) because the proxy and the metrics keep them in every
//! route table and per-version counter. They validate nothing themselves: what a legal name is
//! belongs to `cutover-config`.

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
}
