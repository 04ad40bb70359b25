//! The Redis stores: [`RedisStore`] on one server and [`RedisClusterStore`] on a cluster, siblings
//! over the same plumbing:
//!
//! - [`scripts`]: the four Lua scripts, the one command builder, and the parsing of their answers;
//! - [`lanes`]: the connections both stores keep (below);
//! - this module: the options both builders share and the one formatter of a record's Redis key.
//!
//! # Connections
//!
//! A deadpool-redis checkout recycles its connection before handing it out (a pipelined `UNWATCH`
//! and `PING`): a hidden round trip per request. Redis connections here are multiplexed, so one
//! connection serves any number of concurrent requests. The stores therefore check a few
//! connections out of the pool once and keep them as *lanes*; a request clones a lane's handle
//! (no I/O) and sends exactly one command. The pool still creates, health-checks and sizes
//! connections: when a lane's connection fails (an I/O error or a timeout), the lane drops it and
//! the next request checks a fresh one out of the pool. A call whose connection broke is re-sent
//! once on a fresh one (see `Lanes::run`).
//!
//! # Eviction
//!
//! The first time a store connects, it reads Redis's `maxmemory-policy` and refuses to serve
//! under one that can evict records (see [`eviction`]).

use std::time::Duration;

use crate::scope::RecordKey;

mod cluster;
mod eviction;
mod lanes;
pub(crate) mod scripts;
mod single;
mod steps;

pub use self::cluster::{NotReplicated, RedisClusterStore, RedisClusterStoreBuilder};
pub use self::eviction::EvictionRisk;
pub use self::single::{RedisStore, RedisStoreBuilder};

/// The settings both Redis builders share, with their defaults in one place. Each builder keeps
/// its own one-line setters for them, on purpose: each carries the docs of its backend (what a
/// lane or a timeout means on a cluster differs), and a shared builder trait would make users
/// import it.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) keys: KeyFormat,
    pub(crate) timeout: Duration,
    pub(crate) lanes: usize,
    /// Serve even when Redis's `maxmemory-policy` can evict records (see [`eviction`]).
    pub(crate) allow_eviction: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            keys: KeyFormat::new(RedisStore::DEFAULT_PREFIX),
            timeout: RedisStore::DEFAULT_TIMEOUT,
            lanes: RedisStore::DEFAULT_LANES,
            allow_eviction: false,
        }
    }
}

/// The Redis key of a record: `<prefix>{<32 hex digits>}`, the hex of the first 16 bytes of the
/// (scope, key) digest. 128 bits keep accidental collisions out of reach while keeping keys
/// short; the `{...}` is a Redis Cluster hash tag, so that everything about one record maps to
/// one slot. This is the only place that formats it.
#[derive(Debug, Clone)]
pub(crate) struct KeyFormat {
    prefix: String,
}

impl KeyFormat {
    pub(crate) fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Calls `f` with the key of `record`, built on the stack for any prefix up to 62 bytes.
    pub(crate) fn with_bytes<R>(&self, record: &RecordKey, f: impl FnOnce(&[u8]) -> R) -> R {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut tag = [0u8; 34];
        tag[0] = b'{';
        for (i, b) in record.as_bytes()[..16].iter().enumerate() {
            tag[1 + 2 * i] = HEX[usize::from(b >> 4)];
            tag[2 + 2 * i] = HEX[usize::from(b & 0xf)];
        }
        tag[33] = b'}';
        let prefix = self.prefix.as_bytes();
        let mut buf = [0u8; 96];
        if let Some(dst) = buf.get_mut(..prefix.len() + tag.len()) {
            let (head, rest) = dst.split_at_mut(prefix.len());
            head.copy_from_slice(prefix);
            rest.copy_from_slice(&tag);
            f(dst)
        } else {
            f(&[prefix, &tag[..]].concat())
        }
    }

    /// The key of `record` as a string.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn string(&self, record: &RecordKey) -> String {
        // The prefix is a `String` and the rest is ASCII: the bytes are valid UTF-8.
        self.with_bytes(record, |bytes| String::from_utf8_lossy(bytes).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_the_prefix_and_a_hash_tag_of_the_digests_hex() {
        let mut digest = [0u8; 32];
        for (i, b) in digest.iter_mut().enumerate() {
            *b = u8::try_from(i * 17 % 256).expect("fits");
        }
        let record = RecordKey::from_bytes(digest);
        assert_eq!(
            KeyFormat::new("idem:").string(&record),
            "idem:{00112233445566778899aabbccddeeff}"
        );
        assert_eq!(
            KeyFormat::new("").string(&record),
            "{00112233445566778899aabbccddeeff}"
        );
    }

    #[test]
    fn a_prefix_longer_than_the_stack_buffer_still_formats() {
        let record = RecordKey::from_bytes([0xab; 32]);
        let long = "a prefix longer than the stack buffer: ".repeat(3);
        let key = KeyFormat::new(long.clone()).string(&record);
        assert_eq!(key, format!("{long}{{{}}}", "ab".repeat(16)));
    }
}
