//! Fingerprint encodings: which computation produced a fingerprint's digest, named by a one-byte
//! id that every record stores next to its digest.
//!
//! Each encoding hashes under its own domain-separation tag, so two digests of different
//! encodings never agree: comparing digests alone can never let a different request meet a
//! record. The id is there so that a retry can be compared *in the record's encoding*: when the
//! handler now fingerprints in another encoding than the one that wrote the record (a rolling
//! upgrade, a handler that changed its fingerprint mode), the lifecycle fingerprints the request
//! again in the record's encoding and claims again (see `lifecycle::claim_in_record_encoding`).
//!
//! | id | encoding | since |
//! | --- | --- | --- |
//! | 2 | raw, v2: method, routed path, query, `Content-Type`, `Content-Encoding`, raw body (`idem/fingerprint/v2`) | the first release with record format 1 (implicit there) |
//! | 3 | JSON, v1: the same head, then the body's canonical JSON form without its ignored members, or its raw bytes tagged apart (`idem/fingerprint/json/v1`); `fingerprint = "json"` | the first release with record format 2 |
//!
//! Ids 0 and 1 are never used (1 would be the raw v1 encoding, whose records no longer exist). A
//! new encoding takes the next free id, is added to [`FingerprintEncoding::KNOWN`], and to the
//! one place that computes each encoding for a request, `http::fingerprint_in`.

use std::fmt;

/// The id of the encoding that computed a [`Fingerprint`](crate::Fingerprint)'s digest.
///
/// Any id can be represented, also one this release does not know (written by a newer
/// release): a record in an unknown encoding is neither replayed nor refused as a different
/// request, but answered with a 503 until an instance that knows it serves the retry.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FingerprintEncoding(u8);

impl FingerprintEncoding {
    /// The raw encoding, version 2 (`idem/fingerprint/v2`): the method, the path as routed, the
    /// query, the normalised `Content-Type` and `Content-Encoding`, and the body's raw bytes.
    /// Every record of record format 1 is in it.
    pub const RAW_V2: Self = Self(2);

    /// The JSON encoding, version 1 (`idem/fingerprint/json/v1`), of a handler with
    /// `fingerprint = "json"`: the same head as [`RAW_V2`](Self::RAW_V2), then the body's
    /// canonical JSON form without the members its `ignore` pointers name (or its raw bytes,
    /// tagged apart, when it has no canonical form).
    pub const JSON_V1: Self = Self(3);

    /// The encodings this release computes, the one every record of format 1 is in first.
    pub const KNOWN: &'static [Self] = &[Self::RAW_V2, Self::JSON_V1];

    /// The encoding with `id`, known to this release or not.
    pub const fn from_id(id: u8) -> Self {
        Self(id)
    }

    /// The id stored in records.
    pub const fn id(self) -> u8 {
        self.0
    }

    /// Whether this release can fingerprint a request in this encoding.
    pub fn is_known(self) -> bool {
        Self::KNOWN.contains(&self)
    }
}

impl fmt::Debug for FingerprintEncoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::RAW_V2 => write!(f, "raw/v2 ({})", self.0),
            Self::JSON_V1 => write!(f, "json/v1 ({})", self.0),
            _ => write!(f, "unknown ({})", self.0),
        }
    }
}

impl fmt::Display for FingerprintEncoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_unknown_ids_are_representable() {
        assert_eq!(FingerprintEncoding::RAW_V2.id(), 2);
        assert_eq!(FingerprintEncoding::from_id(2), FingerprintEncoding::RAW_V2);
        assert!(FingerprintEncoding::RAW_V2.is_known());
        let newer = FingerprintEncoding::from_id(200);
        assert!(!newer.is_known());
        assert_eq!(newer.to_string(), "unknown (200)");
        let mut ids: Vec<u8> = FingerprintEncoding::KNOWN.iter().map(|e| e.id()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), FingerprintEncoding::KNOWN.len());
        assert!(ids.iter().all(|&id| id >= 2));
    }
}
