//! The runtime of [idem](https://docs.rs/idem): everything `#[idempotent]` runs.
//!
//! Most users depend on the `idem` facade and never name this crate. It holds:
//!
//! - [`key`]: parsing the `Idempotency-Key` header (quoted or bare);
//! - [`scope`]: who is asking, and the record address derived from (scope, key);
//! - [`fingerprint`]: the SHA-256 request fingerprint;
//! - [`record`]: stored responses and their versioned encoding;
//! - [`protocol`] and [`policy`]: what a claim answers and which outcomes are stored, as plain
//!   functions;
//! - [`store`]: the [`Store`] trait, [`MemoryStore`], [`RedisStore`] and (feature `postgres`)
//!   `PostgresStore`;
//! - [`problem`]: the `application/problem+json` errors;
//! - [`Idempotency`]: the app-wide configuration.
//!
//! # Supported Rust versions
//!
//! The minimum supported Rust version is 1.89 (the dependency floor; tested on 1.95).

#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod config;
pub mod fingerprint;
pub mod http;
pub mod key;
pub mod policy;
pub mod problem;
pub mod protocol;
pub mod record;
pub mod scope;
pub mod store;

pub use deadpool_redis;
pub use deadpool_redis::redis;
#[cfg(feature = "postgres")]
pub use sqlx;
#[cfg(feature = "postgres")]
pub use store::PostgresStore;

pub use crate::{
    config::Idempotency,
    fingerprint::Fingerprint,
    key::{IdempotencyKey, KeyError},
    policy::ServerErrors,
    problem::Problem,
    protocol::Claim,
    record::StoredResponse,
    scope::{IdempotencyScope, RecordKey, ScopeId, Unscoped},
    store::RedisClusterStore,
    store::{MemoryStore, Ownership, RedisStore, Store, StoreError, Ticket},
};

/// Not public API: the items the `#[idempotent]` expansion names. Anything here may change in any
/// release.
#[doc(hidden)]
pub mod __private {
    pub use actix_web;
    pub use core::time::Duration;

    pub use crate::http::{extractor_error, handle, respond, AppScope, HandlerSpec};
    pub use crate::policy::ServerErrors;
}
