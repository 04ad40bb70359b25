//! The idempotency protocol, apart from any transport: what a claim finds and what it answers.
//!
//! Both stores call [`classify`] on the record they found, so the decision is made in one place and
//! tested without a server.

use std::time::Duration;

use crate::{
    fingerprint::Fingerprint,
    record::{Record, StoredResponse},
};

/// What a claim answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// No record existed: this request now owns the key under a lease, and runs the handler.
    Acquired,
    /// A completed record with the same fingerprint: replay it.
    Replay(StoredResponse),
    /// A record (in any state) with a different fingerprint: 422.
    Mismatch,
    /// A pending record with the same fingerprint: 409, or wait.
    InFlight {
        /// How long the current lease still runs.
        retry_after: Duration,
    },
}

/// Decides what a claim that found `existing` answers to a request with `fingerprint`.
///
/// A different fingerprint wins over every state (422 before 409), so a client that reuses a key for
/// another request learns of its mistake at once.
pub fn classify(existing: Record, fingerprint: &Fingerprint, lease_remaining: Duration) -> Claim {
    if existing.fingerprint() != fingerprint {
        return Claim::Mismatch;
    }
    match existing {
        Record::Completed { response, .. } => Claim::Replay(response),
        Record::Pending { .. } => Claim::InFlight {
            retry_after: lease_remaining,
        },
    }
}

#[cfg(test)]
mod tests {
    use actix_web::http::StatusCode;
    use bytes::Bytes;

    use super::*;
    use crate::record::OwnerToken;

    fn fp(body: &[u8]) -> Fingerprint {
        Fingerprint::compute("POST", "/p", "", body)
    }

    fn completed(body: &[u8]) -> Record {
        Record::Completed {
            fingerprint: fp(body),
            response: StoredResponse {
                status: StatusCode::CREATED,
                headers: vec![],
                body: Bytes::from_static(b"done"),
            },
        }
    }

    fn pending(body: &[u8]) -> Record {
        Record::Pending {
            fingerprint: fp(body),
            token: OwnerToken::random(),
        }
    }

    #[test]
    fn same_fingerprint_completed_replays() {
        match classify(completed(b"a"), &fp(b"a"), Duration::ZERO) {
            Claim::Replay(r) => assert_eq!(r.body, Bytes::from_static(b"done")),
            other => panic!("expected replay, got {other:?}"),
        }
    }

    #[test]
    fn same_fingerprint_pending_is_in_flight_with_the_remaining_lease() {
        assert_eq!(
            classify(pending(b"a"), &fp(b"a"), Duration::from_millis(1500)),
            Claim::InFlight {
                retry_after: Duration::from_millis(1500)
            }
        );
    }

    #[test]
    fn mismatch_wins_over_every_state() {
        assert_eq!(
            classify(completed(b"a"), &fp(b"b"), Duration::ZERO),
            Claim::Mismatch
        );
        assert_eq!(
            classify(pending(b"a"), &fp(b"b"), Duration::from_secs(5)),
            Claim::Mismatch
        );
    }
}
