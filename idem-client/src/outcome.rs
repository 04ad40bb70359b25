//! What the middleware tells the caller: on a response, the key and whether it was a replay; on a
//! failure, the key and the attempts made.

use std::{fmt, time::Duration};

/// What happened to a request, inserted in the extensions of every response the middleware
/// returns. Read it with [`ResponseExt::idempotency`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    pub(crate) key: Option<String>,
    pub(crate) replayed: bool,
    pub(crate) attempts: u32,
}

impl Idempotency {
    /// The key the request was sent with (made by the middleware, or the caller's own), unquoted.
    /// `None` for a method sent without a key (an idempotent `GET`, `PUT`, `DELETE`...).
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// Whether the server answered with a stored response (`Idempotent-Replayed: true`): the
    /// operation had already run, on an earlier attempt or an earlier call with this key.
    pub fn replayed(&self) -> bool {
        self.replayed
    }

    /// How many times the request was sent, the last one included.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

/// Reads the middleware's report from a response.
pub trait ResponseExt {
    /// The key used and whether the answer was a replay; `None` if the response did not come
    /// through [`IdempotencyMiddleware`](crate::IdempotencyMiddleware), or came through it
    /// untouched (a method that neither gets a key nor is idempotent by definition).
    fn idempotency(&self) -> Option<&Idempotency>;
}

impl ResponseExt for reqwest::Response {
    fn idempotency(&self) -> Option<&Idempotency> {
        self.extensions().get::<Idempotency>()
    }
}

/// A request that got no answer to hand back: every attempt failed, the deadline passed, the
/// server still had the key in flight when the retries ran out ([`is_in_flight`](Self::is_in_flight)),
/// or the key could not be made. It carries the key, so the caller can store it and send the
/// request again later with the same key (as its own `Idempotency-Key` header), which the server
/// answers with the first execution's response if there was one.
///
/// The middleware returns it inside [`reqwest_middleware::Error::Middleware`]; get it back with
/// [`IdempotencyError::of`].
#[derive(Debug)]
pub struct IdempotencyError {
    pub(crate) key: Option<String>,
    pub(crate) attempts: u32,
    pub(crate) cause: Cause,
}

#[derive(Debug)]
pub(crate) enum Cause {
    /// The last attempt's error.
    Request(reqwest_middleware::Error),
    /// The total deadline passed during an attempt.
    Deadline,
    /// The server answered 409 to the last attempt: another attempt with this key (an earlier
    /// one of this call, or one that crashed) still holds it, for this long by its `Retry-After`.
    InFlight(Option<Duration>),
    /// The key generator made a key that is not 1 to 255 visible ASCII characters.
    InvalidKey,
}

impl IdempotencyError {
    /// The middleware's error inside `err`, if it is one.
    pub fn of(err: &reqwest_middleware::Error) -> Option<&Self> {
        match err {
            reqwest_middleware::Error::Middleware(e) => e.downcast_ref::<Self>(),
            reqwest_middleware::Error::Reqwest(_) => None,
        }
    }

    /// The key the request was sent with: send the request again with it to learn what became of
    /// the operation. `None` for a method sent without a key.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// How many times the request was sent (`0` if the key could not be made).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The last attempt's error; `None` when the deadline cut an attempt short, the key was
    /// still in flight, or the key could not be made.
    pub fn last_error(&self) -> Option<&reqwest_middleware::Error> {
        match &self.cause {
            Cause::Request(e) => Some(e),
            Cause::Deadline | Cause::InFlight(_) | Cause::InvalidKey => None,
        }
    }

    /// Whether the server still had the key in flight when the retries ran out: every attempt
    /// got `409 Conflict` (an earlier attempt of this call still runs, or one that crashed holds
    /// the key until its lease runs out). The operation may have run or may still run: retry
    /// later with [`key`](Self::key), never with a new key, which could run it a second time.
    pub fn is_in_flight(&self) -> bool {
        matches!(self.cause, Cause::InFlight(_))
    }

    /// For an in-flight key ([`is_in_flight`](Self::is_in_flight)), how long the server's last
    /// answer asked to wait (its `Retry-After`, uncapped), if it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self.cause {
            Cause::InFlight(after) => after,
            _ => None,
        }
    }

    /// Whether the total deadline ([`RetryPolicy::deadline`](crate::RetryPolicy::deadline))
    /// ended the request.
    pub fn is_deadline(&self) -> bool {
        matches!(self.cause, Cause::Deadline)
    }
}

impl fmt::Display for IdempotencyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.cause {
            Cause::Request(e) => {
                write!(f, "request failed after {} attempt(s): {e}", self.attempts)?
            }
            Cause::Deadline => write!(
                f,
                "request deadline passed after {} attempt(s)",
                self.attempts
            )?,
            Cause::InFlight(after) => {
                write!(
                    f,
                    "still in flight after {} attempt(s): retry later with this key",
                    self.attempts
                )?;
                if let Some(after) = after {
                    write!(f, ", in {} s or more", after.as_secs().max(1))?;
                }
            }
            Cause::InvalidKey => {
                return f.write_str(
                    "the key generator made an invalid idempotency key \
                     (1 to 255 visible ASCII characters)",
                )
            }
        }
        match &self.key {
            Some(key) => write!(f, " (idempotency key {key})"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for IdempotencyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.cause {
            Cause::Request(e) => Some(e),
            Cause::Deadline | Cause::InFlight(_) | Cause::InvalidKey => None,
        }
    }
}
