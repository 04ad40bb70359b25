//! Which handler outcomes are stored for replay, and which release the key so a retry runs again.

use actix_web::http::StatusCode;

/// What happens to a key once the handler has answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// Store the response; every retry replays it.
    Store,
    /// Delete the record; a retry runs the handler again.
    Release,
}

/// How server errors are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServerErrors {
    /// 5xx responses release the key, so a retry runs the handler again (the default: a transient
    /// failure should not be replayed forever).
    #[default]
    Release,
    /// 5xx responses are stored and replayed, as Stripe does: use it when a 5xx may follow a side
    /// effect that must not be repeated.
    Store,
}

/// The default policy: 1xx is never stored (not a final answer), 2xx, 3xx and
/// 4xx are stored, except 408 (Request Timeout) and 429 (Too Many Requests), which say "try again";
/// 5xx follows `server_errors`.
pub(crate) fn disposition(status: StatusCode, server_errors: ServerErrors) -> Disposition {
    match status.as_u16() {
        100..=199 | 408 | 429 => Disposition::Release,
        500..=599 => match server_errors {
            ServerErrors::Release => Disposition::Release,
            ServerErrors::Store => Disposition::Store,
        },
        _ => Disposition::Store,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(code: u16, se: ServerErrors) -> Disposition {
        disposition(StatusCode::from_u16(code).expect("valid status"), se)
    }

    #[test]
    fn success_and_client_errors_are_stored() {
        for code in [
            200, 201, 202, 204, 301, 303, 400, 401, 402, 403, 404, 409, 422,
        ] {
            assert_eq!(d(code, ServerErrors::Release), Disposition::Store, "{code}");
        }
    }

    #[test]
    fn retryable_client_errors_release() {
        assert_eq!(d(408, ServerErrors::Release), Disposition::Release);
        assert_eq!(d(429, ServerErrors::Release), Disposition::Release);
        assert_eq!(d(408, ServerErrors::Store), Disposition::Release);
    }

    #[test]
    fn server_errors_follow_the_choice() {
        for code in [500, 502, 503, 504] {
            assert_eq!(
                d(code, ServerErrors::Release),
                Disposition::Release,
                "{code}"
            );
            assert_eq!(d(code, ServerErrors::Store), Disposition::Store, "{code}");
        }
    }

    #[test]
    fn informational_is_never_final() {
        assert_eq!(d(100, ServerErrors::Store), Disposition::Release);
    }
}
