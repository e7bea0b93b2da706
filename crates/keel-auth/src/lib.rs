//! Identity and access: users, tenants, projects, memberships, access
//! tokens, and the ONE authorisation decision every handler goes through.
//!
//! - [`http`]: the `/v1/auth/*` and `/v1/projects` handlers (thin).
//! - [`service`]: register, login, project listing.
//! - [`authz`]: `decide(role, action)` and the lookups that return
//!   already-authorised handles ([`authz::ProjectHandle`]); other domains
//!   accept only those handles.
//! - [`context`]: the [`context::Ctx`] extractor: the verified principal,
//!   the request's metadata, and the door to a tenant transaction.
//! - [`members`] (+ [`members_http`]): members and roles, invitations,
//!   per-project grants; the last-owner rule.
//! - [`idempotency`]: the `Idempotency-Key` layer and the purge of old keys.
//! - [`limits`]: rate limits (per IP, per principal, token endpoints) and
//!   failed-login throttling.
//! - [`audit_chain`]: sealing the audit log into per-tenant hash chains,
//!   and verifying them.
//! - [`admin`]: operators (platform principals, own login and tokens) and
//!   the `/v1/admin` api.
//! - [`credentials`] (+ [`credentials_http`]): service accounts and keys,
//!   personal API tokens, and their exchange for access tokens.
//! - [`session`]: login, refresh-token rotation, logout, password change.
//! - [`secret`]: opaque bearer secrets (refresh and invitation tokens),
//!   stored hashed.
//! - [`token`]: signed, expiring access tokens (JWT, HS256, with key ids so
//!   signing keys can rotate).
//! - [`password`]: Argon2id hashing.

pub mod admin;
pub mod audit;
pub mod audit_chain;
pub mod authz;
pub mod context;
pub mod credentials;
pub mod credentials_http;
mod error;
pub mod http;
pub mod idempotency;
pub mod limits;
pub mod members;
pub mod members_http;
pub mod model;
pub mod password;
pub mod secret;
pub mod service;
pub mod session;
pub mod token;

pub use authz::{Action, ProjectHandle, Role};
pub use context::{Ctx, Principal};
pub use error::AuthError;
pub use token::{TokenConfig, TokenKeys};
