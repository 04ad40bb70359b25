//! `Retry-After` (RFC 9110 §10.2.3): delta-seconds or an HTTP-date, clamped to a cap.

use std::time::{Duration, SystemTime};

use http::{header::RETRY_AFTER, HeaderMap};

/// How long the response asks the client to wait, at most `cap`.
///
/// `None` when the header is absent, repeated, or neither delta-seconds nor an HTTP-date: the
/// caller falls back to its own backoff. A date in the past is a wait of zero. A number of seconds
/// too large for a `u64` is taken as "very long", i.e. `cap`.
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime, cap: Duration) -> Option<Duration> {
    let mut values = headers.get_all(RETRY_AFTER).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    parse(value.to_str().ok()?, now).map(|wait| wait.min(cap))
}

fn parse(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if value.bytes().all(|b| b.is_ascii_digit()) {
        // All digits: delta-seconds. Only overflow can fail here.
        return Some(
            value
                .parse::<u64>()
                .map_or(Duration::MAX, Duration::from_secs),
        );
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    const CAP: Duration = Duration::from_secs(10);

    fn with(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(
                RETRY_AFTER,
                HeaderValue::from_str(v).expect("a header value"),
            );
        }
        headers
    }

    fn now() -> SystemTime {
        // A fixed instant with whole seconds, so HTTP-dates (second precision) compare exactly.
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000)
    }

    #[test]
    fn delta_seconds() {
        assert_eq!(retry_after(&with(&["0"]), now(), CAP), Some(Duration::ZERO));
        assert_eq!(
            retry_after(&with(&["3"]), now(), CAP),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            retry_after(&with(&[" 7 "]), now(), CAP),
            Some(Duration::from_secs(7))
        );
    }

    #[test]
    fn http_date_in_the_future() {
        let at = httpdate::fmt_http_date(now() + Duration::from_secs(4));
        assert_eq!(
            retry_after(&with(&[&at]), now(), CAP),
            Some(Duration::from_secs(4))
        );
        // The obsolete formats RFC 9110 still requires recipients to accept.
        let rfc850 = "Sunday, 06-Nov-94 08:49:37 GMT";
        let asctime = "Sun Nov  6 08:49:37 1994";
        let then = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").expect("a date");
        let before = then - Duration::from_secs(2);
        assert_eq!(parse(rfc850, before), Some(Duration::from_secs(2)));
        assert_eq!(parse(asctime, before), Some(Duration::from_secs(2)));
    }

    #[test]
    fn past_dates_mean_now() {
        let past = httpdate::fmt_http_date(now() - Duration::from_secs(60));
        assert_eq!(
            retry_after(&with(&[&past]), now(), CAP),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn the_cap_bounds_every_form() {
        assert_eq!(retry_after(&with(&["30"]), now(), CAP), Some(CAP));
        let far = httpdate::fmt_http_date(now() + Duration::from_secs(3600));
        assert_eq!(retry_after(&with(&[&far]), now(), CAP), Some(CAP));
        let huge = "99999999999999999999999999";
        assert_eq!(retry_after(&with(&[huge]), now(), CAP), Some(CAP));
    }

    #[test]
    fn garbage_falls_back_to_backoff() {
        for garbage in [
            "",
            " ",
            "-1",
            "1.5",
            "+3",
            "3s",
            "soon",
            "Sun, 06 Nov 1994",
            "Sun, 32 Nov 1994 08:49:37 GMT",
        ] {
            assert_eq!(
                retry_after(&with(&[garbage]), now(), CAP),
                None,
                "{garbage:?}"
            );
        }
        assert_eq!(retry_after(&HeaderMap::new(), now(), CAP), None, "absent");
        assert_eq!(
            retry_after(&with(&["1", "2"]), now(), CAP),
            None,
            "repeated"
        );
        let mut opaque = HeaderMap::new();
        opaque.insert(
            RETRY_AFTER,
            HeaderValue::from_bytes(b"\xff1").expect("an opaque header value"),
        );
        assert_eq!(retry_after(&opaque, now(), CAP), None, "not ASCII");
    }
}
