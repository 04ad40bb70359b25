//! The runtime of [idem](https://docs.rs/idem): everything `#[idempotent]` runs.
//!
//! Most users depend on the `idem` facade, which re-exports this crate's public items, and never
//! name this crate.
//!
//! # Public surface
//!
//! - [`Idempotency`]: the app-wide configuration (the store, defaults, the scope resolver),
//!   registered with `App::app_data`;
//! - the stores: [`MemoryStore`] (one per process: `MemoryStore::new()` built in every worker
//!   reaches the same records), [`RedisStore`] and [`RedisClusterStore`] with
//!   their builders, [`NotReplicated`] (a cluster write too few replicas confirmed) and
//!   [`EvictionRisk`] (a Redis whose `maxmemory-policy` could evict records); with the
//!   `postgres` feature, `PostgresStore`, its builder, `InvalidTableName` and `SchemaMismatch`, and the
//!   transactional mode's extractor `PgTransaction` with its `PgTransactionGuard` and
//!   `NotTransactional`;
//! - the caller: [`IdempotencyScope`], [`ScopeId`], [`Unscoped`];
//! - calls to other systems: the [`Steps`] extractor (journaled steps, recovery points), its
//!   [`StepError`], and the [`DownstreamKey`] each step sends;
//! - [`shutdown`]: a graceful stop that waits for running handlers, also those whose client left,
//!   and starts no new one (503 on connections still open);
//! - what a custom store implements and handles: [`Store`], [`Ticket`] (with [`RecordKey`],
//!   [`Fingerprint`], [`FingerprintEncoding`] and [`OwnerToken`]), [`Claim`], [`Ownership`],
//!   [`StoreError`], [`StoredResponse`];
//! - with the `openapi` feature, `openapi::IdempotencyDocs`: a utoipa `Modify` that documents
//!   the endpoints `#[idempotent]` marked;
//! - [`deadpool_redis`] and [`redis`] (and `sqlx` with the `postgres` feature), re-exported so
//!   that versions cannot drift.
//!
//! Everything else is private. The macro's contract lives in `__private` (no stable API); test
//! hooks live in `testing`, behind the non-default `testing` feature.
//!
//! # Where things are
//!
//! | module | holds |
//! | --- | --- |
//! | `config` | [`Idempotency`] and its settings, checked where they are set |
//! | `key`, `scope`, `fingerprint`, `encoding` | the key header, the record address (scope, key), the request fingerprint and the ids of its encodings |
//! | `record` | stored responses and the versioned binary record encoding |
//! | `protocol`, `policy` | what a claim answers, which responses are stored: plain functions |
//! | `cache` | the replay cache: copies of completed records in this process, bounded in bytes, none outliving its record |
//! | `lifecycle`, `waiters` | the state machine over the [`Store`] trait (claim, wait, run and renew, settle), without actix-web; the waiters of one record sharing one poll |
//! | `http` | the actix-web adapter: the macro's contract, body reading, run-to-end, capture and replay |
//! | `observe` | the metrics, through the `metrics` facade (the application installs the recorder) |
//! | `problem` | the `application/problem+json` errors |
//! | `steps` | [`Steps`]: the journal of a request's calls to other systems, and their [`DownstreamKey`]s |
//! | `shutdown` | [`shutdown`], the count of running handlers it waits for, and the admission that refuses new ones once it began |
//! | `store` | the trait; `store::memory`; `store::redis` with the shared plumbing (`scripts`, `lanes`, `eviction`) below its two sibling stores (`single`, `cluster`); `store::postgres` (feature `postgres`) |
//!
//! # Supported Rust versions
//!
//! The minimum supported Rust version is 1.89 (the dependency floor). The repository pins the
//! toolchain it tests with in `rust-toolchain.toml`.

#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod cache;
mod config;
mod encoding;
mod fingerprint;
mod http;
mod key;
mod lifecycle;
mod observe;
#[cfg(feature = "openapi")]
pub mod openapi;
mod policy;
mod problem;
mod protocol;
mod record;
mod scope;
mod shutdown;
mod steps;
mod store;
mod waiters;

pub use deadpool_redis;
pub use deadpool_redis::redis;
#[cfg(feature = "postgres")]
pub use sqlx;
#[cfg(feature = "postgres")]
pub use store::postgres::{
    InvalidTableName, NotTransactional, PgTransaction, PgTransactionGuard, PostgresStore,
    PostgresStoreBuilder, SchemaMismatch,
};

pub use crate::{
    config::Idempotency,
    encoding::FingerprintEncoding,
    fingerprint::Fingerprint,
    protocol::Claim,
    record::{OwnerToken, StoredResponse},
    scope::{IdempotencyScope, RecordKey, ScopeId, Unscoped},
    shutdown::shutdown,
    steps::{DownstreamKey, StepError, Steps},
    store::{
        memory::MemoryStore,
        redis::{
            EvictionRisk, NotReplicated, RedisClusterStore, RedisClusterStoreBuilder, RedisStore,
            RedisStoreBuilder,
        },
        Ownership, Store, StoreError, Ticket,
    },
};

/// Not public API: the items the `#[idempotent]` expansion names. Anything here may change in any
/// release.
#[doc(hidden)]
pub mod __private {
    pub use actix_web;
    pub use core::time::Duration;

    pub use crate::fingerprint::FingerprintMode;
    pub use crate::http::{extractor_error, handle, respond, AppScope, HandlerSpec, KeyHeader};
    pub use crate::lifecycle::HandlerTiming;
    pub use crate::policy::ServerErrors;
}

#[cfg(feature = "testing")]
pub mod testing;

#[cfg(test)]
mod properties;
