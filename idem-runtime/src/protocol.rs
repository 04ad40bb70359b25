//! The idempotency protocol, apart from any transport: what a claim finds and what it answers.
//!
//! Both stores call [`classify`] on the record they found, so the decision is made in one place and
//! tested without a server.

use std::time::Duration;

use crate::{
    encoding::FingerprintEncoding,
    record::{Record, StoredResponse},
    store::Ticket,
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
        /// How long the current lease still runs, by the store's clock: the `Retry-After` of the
        /// 409 when the record's handler does not run in this process (its owner is another
        /// instance, or crashed). A store that cannot tell answers the `lease` its `claim` was
        /// called with, an upper bound.
        retry_after: Duration,
    },
    /// A record (in any state) whose fingerprint was computed in another encoding than the
    /// ticket's: the request is fingerprinted again in `encoding` and claimed again, or, when
    /// this release does not know `encoding` (a record of a newer release), answered 503.
    OtherEncoding {
        /// The record's fingerprint encoding.
        encoding: FingerprintEncoding,
    },
}

/// Decides what a claim by `ticket` that found `existing` answers.
///
/// A different fingerprint wins over every state (422 before 409), so a client that reuses a key for
/// another request learns of its mistake at once. A pending record that holds the ticket's own
/// token is the ticket's own claim, written by an earlier attempt of the same call whose answer
/// was lost (a broken connection): it is still `Acquired`.
///
/// A record in another fingerprint encoding than the ticket's cannot be compared with it:
/// [`Claim::OtherEncoding`], whatever its state.
pub(crate) fn classify(existing: Record, ticket: &Ticket, lease_remaining: Duration) -> Claim {
    let encoding = existing.fingerprint().encoding();
    if encoding != ticket.fingerprint().encoding() {
        return Claim::OtherEncoding { encoding };
    }
    if existing.fingerprint() != ticket.fingerprint() {
        return Claim::Mismatch;
    }
    match existing {
        Record::Completed { response, .. } => Claim::Replay(response),
        Record::Pending { token, .. } if token == *ticket.token() => Claim::Acquired,
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
    use crate::{fingerprint::Fingerprint, record::OwnerToken, scope::RecordKey};

    fn fp(body: &[u8]) -> Fingerprint {
        Fingerprint::compute("POST", "/p", "", body)
    }

    fn ticket(body: &[u8]) -> Ticket {
        Ticket::new(RecordKey::from_bytes([1; 32]), fp(body))
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
        match classify(completed(b"a"), &ticket(b"a"), Duration::ZERO) {
            Claim::Replay(r) => assert_eq!(r.body, Bytes::from_static(b"done")),
            other => panic!("expected replay, got {other:?}"),
        }
    }

    #[test]
    fn same_fingerprint_pending_is_in_flight_with_the_remaining_lease() {
        assert_eq!(
            classify(pending(b"a"), &ticket(b"a"), Duration::from_millis(1500)),
            Claim::InFlight {
                retry_after: Duration::from_millis(1500)
            }
        );
    }

    #[test]
    fn mismatch_wins_over_every_state() {
        assert_eq!(
            classify(completed(b"a"), &ticket(b"b"), Duration::ZERO),
            Claim::Mismatch
        );
        assert_eq!(
            classify(pending(b"a"), &ticket(b"b"), Duration::from_secs(5)),
            Claim::Mismatch
        );
    }

    #[test]
    fn a_record_in_another_encoding_is_compared_in_neither() {
        let other = FingerprintEncoding::from_id(200);
        let in_other = |record: Record| match record {
            Record::Completed {
                fingerprint,
                response,
            } => Record::Completed {
                fingerprint: Fingerprint::new(other, *fingerprint.as_bytes()),
                response,
            },
            Record::Pending { fingerprint, token } => Record::Pending {
                fingerprint: Fingerprint::new(other, *fingerprint.as_bytes()),
                token,
            },
        };
        // Even the same digest bytes: encodings are compared first.
        for record in [completed(b"a"), pending(b"a"), completed(b"b")] {
            assert_eq!(
                classify(in_other(record), &ticket(b"a"), Duration::ZERO),
                Claim::OtherEncoding { encoding: other }
            );
        }
    }

    #[test]
    fn a_pending_record_with_the_tickets_own_token_is_its_own_claim() {
        let mine = ticket(b"a");
        let own = Record::Pending {
            fingerprint: *mine.fingerprint(),
            token: *mine.token(),
        };
        assert_eq!(
            classify(own, &mine, Duration::from_secs(5)),
            Claim::Acquired
        );
    }
}
