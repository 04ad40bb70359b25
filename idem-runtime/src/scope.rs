//! Who is asking: scopes, and the record address derived from (scope, key).
//!
//! A record is addressed by a SHA-256 of the scope and the key, never by the key alone, so one
//! client can neither read nor block another's records, and client-chosen bytes never land raw in a
//! store key.

use std::{borrow::Cow, fmt, future::Ready};

use actix_web::{dev::Payload, FromRequest, HttpRequest};
use sha2::{Digest, Sha256};

use crate::key::IdempotencyKey;

/// An extractor that names the caller for idempotency purposes.
///
/// Implement it for your authenticated-user extractor and name the type in
/// `#[idempotent(scope = AuthUser)]`, or register a resolver on [`crate::Idempotency`].
/// The id must be stable for one client and distinct between clients (an account id, a tenant id,
/// an API key's id). The extractor runs before the body is read, so it must not read the body.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be an idempotency scope: it does not implement `IdempotencyScope`",
    label = "not an `IdempotencyScope`",
    note = "implement `idem::IdempotencyScope` (and `FromRequest`) for your caller type, or write `scope = idem::Unscoped` to share one key space between all callers on purpose"
)]
pub trait IdempotencyScope: FromRequest {
    /// The caller's stable id.
    fn scope_id(&self) -> Cow<'_, str>;
}

/// The explicit choice to share one key space between all callers.
///
/// Use it only where keys are already unguessable and unshared (for example, server-issued). Any
/// client that learns a key can then read the response stored under it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unscoped;

impl FromRequest for Unscoped {
    type Error = actix_web::Error;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(_: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(Ok(Self))
    }
}

impl IdempotencyScope for Unscoped {
    fn scope_id(&self) -> Cow<'_, str> {
        Cow::Borrowed("")
    }
}

/// A resolved caller id.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ScopeId(String);

impl ScopeId {
    /// Wraps a caller id.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The shared scope of [`Unscoped`].
    pub fn unscoped() -> Self {
        Self(String::new())
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ScopeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ScopeId").field(&self.0).finish()
    }
}

/// The address of one record: a digest of (scope, key).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordKey([u8; 32]);

impl RecordKey {
    /// The address of `key` within `scope`.
    pub(crate) fn new(scope: &str, key: &IdempotencyKey<'_>) -> Self {
        let mut h = Sha256::new();
        h.update(b"idem/record/v1\0");
        h.update((scope.len() as u64).to_be_bytes());
        h.update(scope.as_bytes());
        h.update((key.as_str().len() as u64).to_be_bytes());
        h.update(key.as_str().as_bytes());
        Self(h.finalize().into())
    }

    /// Wraps raw digest bytes (as a store reads them back).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordKey(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> IdempotencyKey<'_> {
        IdempotencyKey::parse(s.as_bytes()).expect("valid key")
    }

    #[test]
    fn scope_separates_records() {
        let k = key("abc");
        assert_ne!(RecordKey::new("alice", &k), RecordKey::new("bob", &k));
        assert_eq!(
            RecordKey::new("alice", &k),
            RecordKey::new("alice", &key("\"abc\""))
        );
    }

    #[test]
    fn scope_and_key_boundaries_are_unambiguous() {
        assert_ne!(
            RecordKey::new("ab", &key("c")),
            RecordKey::new("a", &key("bc"))
        );
    }

    #[test]
    fn the_address_is_pinned() {
        // An independent computation (SHA-256 of "idem/record/v1\0", then each field as a
        // big-endian u64 length and its bytes): changing the encoding orphans every stored record.
        let rk = RecordKey::new("alice", &key("7c0e"));
        let hex: String = rk.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "9061223f0d4f19861f2eacd9443aae843a6df4f40500a2ed19c65ae6d357534e"
        );
    }
}
