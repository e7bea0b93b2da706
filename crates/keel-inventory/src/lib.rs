//! Inventory: regions, flavors, hosts and their capacity.
//!
//! - [`http`]: `GET /v1/flavors`, `/v1/regions`, `/v1/availability`.
//! - [`catalogue`]: regions and flavors (operators create and retire them)
//!   and availability; [`hosts`]: cordon, uncordon, drain;
//!   [`admin_http`]: the operator endpoints.
//! - [`service`]: flavor lookups, and the capacity ledger the scheduler
//!   uses: [`service::capacity_reserve`] and [`service::capacity_release`]
//!   run inside the caller's transaction, so a placement and the
//!   allocation that holds it commit together. The `hosts` table's CHECK
//!   constraints make over-commit impossible whatever the callers do.
//!
//! Hosts are operator inventory, owned by no tenant.

pub mod admin_http;
pub mod agent_http;
pub mod catalogue;
pub mod enrol;
mod error;
pub mod hosts;
pub mod http;
pub mod model;
pub mod nodes;
pub mod service;
pub mod trust;

pub use error::InventoryError;
pub use model::{Flavor, FlavorView};
