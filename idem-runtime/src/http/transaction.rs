//! The request's database transaction in the transactional mode (feature `postgres`, see
//! `PgTransaction`); without the feature, a stand-in that never holds one.

#[cfg(feature = "postgres")]
pub(super) use crate::store::postgres::RequestTransaction;

#[cfg(not(feature = "postgres"))]
mod none {
    use actix_web::{HttpRequest, HttpResponse};

    use crate::{
        config::{Idempotency, Settings},
        lifecycle::{Completion, StoreCompletion},
        problem::Problem,
    };

    /// No transaction: the store completes every record.
    pub(crate) struct RequestTransaction;

    impl RequestTransaction {
        pub(crate) fn install(_: &HttpRequest, _: &Settings) -> Self {
            Self
        }

        pub(crate) fn is_begun(&self) -> bool {
            false
        }

        pub(crate) fn completion(&self) -> Box<dyn Completion> {
            Box::new(StoreCompletion)
        }

        pub(crate) async fn finish_unrecorded(&self, resp: HttpResponse) -> HttpResponse {
            resp
        }

        pub(crate) fn rolled_back(&self) -> HttpResponse {
            Problem::StoreUnavailable {
                retry_after: Idempotency::DEFAULT_UNAVAILABLE_RETRY_AFTER,
            }
            .to_response()
        }
    }
}

#[cfg(not(feature = "postgres"))]
pub(super) use self::none::RequestTransaction;
