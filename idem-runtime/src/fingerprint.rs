//! The request fingerprint: SHA-256 over method, path, query string and the raw body bytes.
//!
//! Every field but the last is length-prefixed, and the body's length closes the hash, so no two
//! distinct requests share an encoding: `("/a", "bc")` and `("/ab", "c")` hash differently.

use std::fmt;

use sha2::{Digest, Sha256};

const DOMAIN: &[u8] = b"idem/fingerprint/v1\0";

/// A SHA-256 digest identifying one request's content.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of a request whose body is already in memory.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn compute(method: &str, path: &str, query: &str, body: &[u8]) -> Self {
        let mut hasher = FingerprintHasher::new(method, path, query);
        hasher.update(body);
        hasher.finish()
    }

    /// Wraps raw digest bytes (as stored in a record).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

/// Incremental fingerprinting, for a body that arrives in chunks.
#[derive(Clone)]
pub(crate) struct FingerprintHasher {
    hasher: Sha256,
    body_len: u64,
}

impl FingerprintHasher {
    /// Starts a fingerprint with the request line's parts.
    pub(crate) fn new(method: &str, path: &str, query: &str) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(DOMAIN);
        for field in [method, path, query] {
            hasher.update((field.len() as u64).to_be_bytes());
            hasher.update(field.as_bytes());
        }
        Self {
            hasher,
            body_len: 0,
        }
    }

    /// Feeds the next chunk of the raw body.
    pub(crate) fn update(&mut self, chunk: &[u8]) {
        self.body_len += chunk.len() as u64;
        self.hasher.update(chunk);
    }

    /// Finishes the digest.
    pub(crate) fn finish(mut self) -> Fingerprint {
        self.hasher.update(self.body_len.to_be_bytes());
        Fingerprint(self.hasher.finalize().into())
    }
}

impl fmt::Debug for FingerprintHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FingerprintHasher")
            .field("body_len", &self.body_len)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_boundaries_are_unambiguous() {
        let a = Fingerprint::compute("POST", "/a", "bc", b"");
        let b = Fingerprint::compute("POST", "/ab", "c", b"");
        assert_ne!(a, b);
        let c = Fingerprint::compute("POST", "/p", "q", b"x");
        let d = Fingerprint::compute("POST", "/p", "qx", b"");
        assert_ne!(c, d);
        let e = Fingerprint::compute("POS", "T/p", "", b"");
        let f = Fingerprint::compute("POST", "/p", "", b"");
        assert_ne!(e, f);
    }

    #[test]
    fn every_field_counts() {
        let base = Fingerprint::compute("POST", "/payments", "a=1", b"{}");
        assert_eq!(
            base,
            Fingerprint::compute("POST", "/payments", "a=1", b"{}")
        );
        assert_ne!(base, Fingerprint::compute("PUT", "/payments", "a=1", b"{}"));
        assert_ne!(base, Fingerprint::compute("POST", "/payment", "a=1", b"{}"));
        assert_ne!(
            base,
            Fingerprint::compute("POST", "/payments", "a=2", b"{}")
        );
        assert_ne!(
            base,
            Fingerprint::compute("POST", "/payments", "a=1", b"{ }")
        );
    }

    #[test]
    fn chunking_does_not_change_the_digest() {
        let whole = Fingerprint::compute("POST", "/x", "", b"hello world");
        let mut h = FingerprintHasher::new("POST", "/x", "");
        h.update(b"hello");
        h.update(b"");
        h.update(b" world");
        assert_eq!(whole, h.finish());
    }

    fn hex(fp: Fingerprint) -> String {
        fp.as_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn known_vectors_are_pinned() {
        // Computed independently (SHA-256 of "idem/fingerprint/v1\0", then method, path and
        // query each as a big-endian u64 length and its bytes, then the body and its length):
        // changing the encoding turns every retry of a stored request into a 422.
        for (method, path, query, body, digest) in [
            (
                "POST",
                "/payments",
                "",
                &b"{\"amount\":100}"[..],
                "ce381b8ea7418a82aa1bd3051e5bbea0e7dafea5e4e17f3164ed45223fc2694c",
            ),
            (
                "POST",
                "/p",
                "",
                b"",
                "59fda3bcdbe41915d42a1dcfda43ec6bbafbaf3392e0a677c2e64fad26078792",
            ),
            (
                "PATCH",
                "/orders/7",
                "a=1&b=2",
                b"xxx",
                "3556d3ad95fb18102f02505102638455373b0538be229ca759dadbada32dc7b4",
            ),
        ] {
            assert_eq!(hex(Fingerprint::compute(method, path, query, body)), digest);
        }
    }
}
