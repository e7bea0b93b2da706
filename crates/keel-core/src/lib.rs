//! The vocabulary every Keel crate shares: typed ids, canonical resource
//! names (`krn:keel:…`), the actor behind a change, and cursor pagination.
//!
//! This crate does no I/O. It knows nothing about HTTP, Postgres connections
//! or any domain; domains depend on it, never the other way round.

pub mod actor;
pub mod ids;
pub mod krn;
pub mod page;

pub use actor::Actor;
pub use krn::ResourceName;

/// The default region every fresh installation has. Regions become real
/// inventory objects later; until then resource names use this one.
pub const DEFAULT_REGION: &str = "local-1";
