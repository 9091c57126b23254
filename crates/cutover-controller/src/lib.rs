//! The release controller: a pure step function and the async driver that runs its commands.
