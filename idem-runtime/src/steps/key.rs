//! Downstream keys: what a step sends to another system as its own `Idempotency-Key`.

use std::fmt;

use sha2::{Digest as _, Sha256};

use crate::{fingerprint::Fingerprint, scope::RecordKey};

/// The domain of the digest, so that it never equals any other digest idem computes.
const DOMAIN: &[u8] = b"idem/downstream-key/v1\0";

/// A key to send to another system as its `Idempotency-Key` (from `Steps::run` or
/// `Steps::key`).
///
/// 64 lowercase hexadecimal characters: a SHA-256 digest over the request's record address
/// (itself a digest of the scope and the client's key), the request's fingerprint, the
/// handler's name and the step's name. So it is the same for every execution of one request,
/// on every instance and after restarts, and differs between steps, handlers, scopes, client
/// keys and request bodies; no client byte is in it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct DownstreamKey([u8; 64]);

impl DownstreamKey {
    /// The key of step `step` of `handler` for the request at `record` with `fingerprint`.
    pub(crate) fn derive(
        record: &RecordKey,
        fingerprint: &Fingerprint,
        handler: &str,
        step: &str,
    ) -> Self {
        Self::digest(record.as_bytes(), fingerprint.as_bytes(), handler, step)
    }

    /// The key of step `step` outside an idempotent execution: over a random nonce of the
    /// execution, so that two unkeyed requests never share one.
    pub(crate) fn unjournaled(nonce: &[u8; 32], handler: &str, step: &str) -> Self {
        Self::digest(nonce, &[0; 32], handler, step)
    }

    fn digest(a: &[u8; 32], b: &[u8; 32], handler: &str, step: &str) -> Self {
        let mut h = Sha256::new();
        h.update(DOMAIN);
        h.update(a);
        h.update(b);
        h.update((handler.len() as u64).to_be_bytes());
        h.update(handler.as_bytes());
        h.update((step.len() as u64).to_be_bytes());
        h.update(step.as_bytes());
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 64];
        for (i, b) in h.finalize().iter().enumerate() {
            out[2 * i] = HEX[usize::from(b >> 4)];
            out[2 * i + 1] = HEX[usize::from(b & 0xf)];
        }
        Self(out)
    }

    /// The key, as text (64 characters, `0-9a-f`).
    pub fn as_str(&self) -> &str {
        // Built from the hex alphabet only.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Display for DownstreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for DownstreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DownstreamKey({})", self.as_str())
    }
}

impl AsRef<str> for DownstreamKey {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::IdempotencyKey;

    fn record(scope: &str, key: &str) -> RecordKey {
        RecordKey::new(
            scope,
            &IdempotencyKey::parse(key.as_bytes()).expect("a valid key"),
        )
    }

    fn fp(body: &[u8]) -> Fingerprint {
        Fingerprint::compute("POST", "/payments", "", body)
    }

    #[test]
    fn equal_for_one_request_and_different_for_anything_else() {
        let base = DownstreamKey::derive(&record("acct_1", "k-1"), &fp(b"{}"), "pay", "charge");
        // Another execution of the same request (on any instance): the same key.
        assert_eq!(
            base,
            DownstreamKey::derive(&record("acct_1", "k-1"), &fp(b"{}"), "pay", "charge")
        );
        for other in [
            DownstreamKey::derive(&record("acct_1", "k-1"), &fp(b"{}"), "pay", "email"),
            DownstreamKey::derive(&record("acct_1", "k-1"), &fp(b"{}"), "refund", "charge"),
            DownstreamKey::derive(&record("acct_2", "k-1"), &fp(b"{}"), "pay", "charge"),
            DownstreamKey::derive(&record("acct_1", "k-2"), &fp(b"{}"), "pay", "charge"),
            DownstreamKey::derive(&record("acct_1", "k-1"), &fp(b"{ }"), "pay", "charge"),
            // The length prefixes keep the handler and the step apart.
            DownstreamKey::derive(&record("acct_1", "k-1"), &fp(b"{}"), "payc", "harge"),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn printable_at_most_64_characters_and_free_of_client_bytes() {
        let client_key = "my-very-own-client-key-0123456789";
        let key = DownstreamKey::derive(&record("acct_1", client_key), &fp(b"{}"), "pay", "charge");
        let s = key.as_str();
        assert_eq!(s.len(), 64);
        assert!(s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert!(!s.contains(client_key) && !s.contains("acct_1"));
        assert_eq!(key.to_string(), s);
    }

    #[test]
    fn unjournaled_keys_differ_per_nonce() {
        let a = DownstreamKey::unjournaled(&[1; 32], "pay", "charge");
        let b = DownstreamKey::unjournaled(&[2; 32], "pay", "charge");
        assert_ne!(a, b);
        assert_eq!(a, DownstreamKey::unjournaled(&[1; 32], "pay", "charge"));
    }
}
