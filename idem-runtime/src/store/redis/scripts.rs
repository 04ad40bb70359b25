//! The four Lua scripts, the one place that builds a script command, and the parsing of the
//! scripts' answers. Both Redis stores run exactly these.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use bytes::Bytes;
use deadpool_redis::redis::{self, Cmd, Script, Value};

use crate::{
    config::Idempotency,
    protocol::{classify, Claim},
    record::Record,
    store::{Ownership, StoreError, Ticket},
};

/// `KEYS[1]` record, `ARGV[1]` pending record, `ARGV[2]` lease in ms.
/// Answers 1 when the claim was taken, else `{existing record, PTTL}`. Only an in-flight record
/// needs its PTTL (the `Retry-After` of a 409), so the script asks for it only when the record's
/// kind byte (the 4th, see [`crate::record`]) is `P` (80): a replay costs Redis one inner call,
/// not two, and answers `{record, 0}`.
const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if v then
  if string.byte(v, 4) == 80 then
    return {v, redis.call('PTTL', KEYS[1])}
  end
  return {v, 0}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// `KEYS[1]` record, `ARGV[1]` the owner's pending record, `ARGV[2]` lease in ms.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// `KEYS[1]` record, `ARGV[1]` the owner's pending record, `ARGV[2]` completed record,
/// `ARGV[3]` ttl in ms. A record that already is this very completed record answers 1: the same
/// completion sent again after its answer was lost on a broken connection (re-sent by the lanes
/// or retried by the lifecycle) is not a lost lease.
const COMPLETE: &str = r"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
if v == ARGV[2] then
  return 1
end
return 0
";

/// `KEYS[1]` record, `ARGV[1]` the owner's pending record.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

/// The four scripts by name, as sent to Redis.
#[cfg(any(test, feature = "testing"))]
pub(crate) const SOURCES: [(&str, &str); 4] = [
    ("claim", CLAIM),
    ("renew", RENEW),
    ("complete", COMPLETE),
    ("release", RELEASE),
];

/// The four scripts, hashed once.
pub(crate) struct Scripts {
    pub(crate) claim: Lua,
    pub(crate) renew: Lua,
    pub(crate) complete: Lua,
    pub(crate) release: Lua,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Self {
            claim: Lua::new(CLAIM),
            renew: Lua::new(RENEW),
            complete: Lua::new(COMPLETE),
            release: Lua::new(RELEASE),
        }
    }
}

/// A script with its source: `EVALSHA` names the hash; where a server does not know it yet, the
/// single-server store loads it (`SCRIPT LOAD`) and the cluster store sends the source (`EVAL`,
/// routed by key like the call itself).
pub(crate) struct Lua {
    script: Script,
    source: &'static str,
}

impl Lua {
    pub(crate) fn new(source: &'static str) -> Self {
        Self {
            script: Script::new(source),
            source,
        }
    }

    pub(crate) fn script(&self) -> &Script {
        &self.script
    }

    /// `EVALSHA <hash> 1 <key> <args...>`.
    pub(crate) fn evalsha(&self, key: &[u8], args: &[Arg<'_>]) -> Cmd {
        command("EVALSHA", self.script.get_hash(), key, args)
    }

    /// `EVAL <source> 1 <key> <args...>`.
    pub(crate) fn eval(&self, key: &[u8], args: &[Arg<'_>]) -> Cmd {
        command("EVAL", self.source, key, args)
    }
}

/// One script argument after the key.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg<'a> {
    Bytes(&'a [u8]),
    /// A duration in milliseconds (at least 1, so that a tiny duration never means "no
    /// expiry"), sent as its decimal digits.
    Millis(Duration),
}

impl Arg<'_> {
    /// The most bytes the argument takes in the command.
    fn len(&self) -> usize {
        match self {
            Self::Bytes(bytes) => bytes.len(),
            Self::Millis(_) => 20,
        }
    }
}

/// Milliseconds for a store command: at least 1, so that a tiny duration never means "no expiry",
/// and at most [`Idempotency::MAX_TTL`], so that a huge duration from a custom caller of the
/// [`Store`](crate::Store) trait is clamped instead of making Redis refuse the `PX`.
pub(crate) fn millis(d: Duration) -> u64 {
    let d = d.min(Idempotency::MAX_TTL);
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// The one builder of a script command. It is packed straight from the borrowed arguments into
/// one buffer sized up front: a request copies its record into the command once.
fn command(verb: &str, script: &str, key: &[u8], args: &[Arg<'_>]) -> Cmd {
    let data = verb.len() + script.len() + 1 + key.len();
    let data = data + args.iter().map(Arg::len).sum::<usize>();
    let mut cmd = Cmd::with_capacity(4 + args.len(), data);
    cmd.arg(verb).arg(script).arg(1).arg(key);
    for arg in args {
        match *arg {
            Arg::Bytes(bytes) => cmd.arg(bytes),
            Arg::Millis(d) => cmd.arg(millis(d)),
        };
    }
    cmd
}

/// Parses the claim script's answer.
///
/// A pending record that holds this very ticket's token is this request's own claim, written by
/// an earlier attempt of the same call whose answer was lost (a connection that broke after the
/// command was sent, re-sent by the client or by the store): it answers `Acquired`.
#[cfg(test)]
pub(crate) fn parse_claim(value: Value, ticket: &Ticket) -> Result<Claim, StoreError> {
    parse_claim_expiring(value, ticket).map(|(claim, _)| claim)
}

/// [`parse_claim`], and the expiry a completed record it replays carries (milliseconds since
/// the Unix epoch, by its writer's clock), if any.
pub(crate) fn parse_claim_expiring(
    value: Value,
    ticket: &Ticket,
) -> Result<(Claim, Option<u64>), StoreError> {
    match value {
        Value::Int(1) => Ok((Claim::Acquired, None)),
        Value::Array(items) => match <[Value; 2]>::try_from(items) {
            Ok([Value::BulkString(raw), Value::Int(pttl)]) => {
                if raw.as_slice() == ticket.pending_record() {
                    return Ok((Claim::Acquired, None));
                }
                let (record, expires_at) = Record::decode_with_expiry(Bytes::from(raw))?;
                let remaining = Duration::from_millis(u64::try_from(pttl).unwrap_or(0));
                Ok((classify(record, ticket, remaining), expires_at))
            }
            _ => Err(StoreError::Protocol(
                "claim answered a malformed array".into(),
            )),
        },
        other => Err(StoreError::Protocol(format!("claim answered {other:?}"))),
    }
}

/// The native claim (Redis 7.0 and later): `SET <key> <pending> NX GET PX <lease>` writes the
/// pending record when the key is absent and answers nil, or leaves the key as it is and answers
/// the record it holds. One command, no script: Redis runs it as fast as a `GET`. The fenced writes
/// (renew, complete, release) stay Lua scripts: they compare before they write.
pub(crate) fn native_claim(key: &[u8], pending: &[u8], lease: Duration) -> Cmd {
    let mut cmd = Cmd::with_capacity(7, 3 + key.len() + pending.len() + 2 + 3 + 2 + 20);
    cmd.arg("SET")
        .arg(key)
        .arg(pending)
        .arg("NX")
        .arg("GET")
        .arg("PX")
        .arg(millis(lease));
    cmd
}

/// Parses the native claim's answer. The remaining lease of an in-flight record is not in it: its
/// `retry_after` is the whole `lease`, an upper bound, which the stores replace with the record's
/// `PTTL` (see [`pttl`] and [`remaining_lease`]): a second round trip, on a 409 only.
#[cfg(test)]
pub(crate) fn parse_native_claim(
    value: Value,
    ticket: &Ticket,
    lease: Duration,
) -> Result<Claim, StoreError> {
    parse_native_claim_expiring(value, ticket, lease).map(|(claim, _)| claim)
}

/// [`parse_native_claim`], and the expiry a completed record it replays carries, if any.
pub(crate) fn parse_native_claim_expiring(
    value: Value,
    ticket: &Ticket,
    lease: Duration,
) -> Result<(Claim, Option<u64>), StoreError> {
    match value {
        Value::Nil => Ok((Claim::Acquired, None)),
        Value::BulkString(raw) => {
            if raw.as_slice() == ticket.pending_record() {
                return Ok((Claim::Acquired, None));
            }
            let (record, expires_at) = Record::decode_with_expiry(Bytes::from(raw))?;
            Ok((classify(record, ticket, lease), expires_at))
        }
        other => Err(StoreError::Protocol(format!("claim answered {other:?}"))),
    }
}

/// The expiry a Redis store writes into a completed record kept for `ttl` from now: milliseconds
/// since the Unix epoch by this instance's clock.
pub(crate) fn expires_at(ttl: Duration) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from((now + ttl).as_millis()).unwrap_or(u64::MAX)
}

/// How long a completed record whose section says it expires at `expires_at` may still be
/// copied by this instance: until then by this instance's clock, less [`CLOCK_SKEW`] (the
/// writer's clock may run ahead of this one's).
pub(crate) fn remaining_life(expires_at: Option<u64>) -> Option<Duration> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    let left = Duration::from_millis(expires_at?).checked_sub(now)?;
    left.checked_sub(CLOCK_SKEW)
}

/// How far apart the clocks of two instances may be (synchronised by NTP) for a record's expiry,
/// written by one, to be read by the other's clock.
pub(crate) const CLOCK_SKEW: Duration = Duration::from_secs(1);

/// `PTTL <key>`: how long an in-flight record's lease still runs.
pub(crate) fn pttl(key: &[u8]) -> Cmd {
    let mut cmd = Cmd::with_capacity(2, 4 + key.len());
    cmd.arg("PTTL").arg(key);
    cmd
}

/// The remaining lease in a `PTTL` answer: the milliseconds left; nothing when the record is gone
/// (it expired or was released since the claim: a retry may run at once); `lease` (the upper
/// bound the claim had) for anything else.
pub(crate) fn remaining_lease(value: &Value, lease: Duration) -> Duration {
    match value {
        Value::Int(ms) if *ms >= 0 => Duration::from_millis(u64::try_from(*ms).unwrap_or(0)),
        Value::Int(-2) => Duration::ZERO,
        _ => lease,
    }
}

/// Whether the server refused the native claim's syntax: `SET` with both `NX` and `GET` came with
/// Redis 7.0, and older servers answer `ERR syntax error`.
pub(crate) fn refuses_native_claim(err: &redis::RedisError) -> bool {
    err.code() == Some("ERR") && err.detail().is_some_and(|d| d.contains("syntax error"))
}

/// Whether a store still claims natively: until a server refuses the syntax once (a Redis older
/// than 7.0), after which it claims with the Lua script for good.
#[derive(Debug)]
pub(crate) struct ClaimMode(AtomicBool);

impl ClaimMode {
    pub(crate) const fn native() -> Self {
        Self(AtomicBool::new(true))
    }

    pub(crate) fn is_native(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Switches to the Lua claim for good.
    pub(crate) fn fall_back(&self) {
        if self.0.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                "the Redis server does not support `SET ... NX GET` (Redis 7.0 and later): idem \
                 claims with a Lua script instead, which costs Redis more per request"
            );
        }
    }
}

/// Parses a fenced script's answer.
pub(crate) fn parse_ownership(value: &Value) -> Result<Ownership, StoreError> {
    match value {
        Value::Int(1) => Ok(Ownership::Held),
        Value::Int(0) => Ok(Ownership::Lost),
        other => Err(StoreError::Protocol(format!(
            "a fenced write answered {other:?}"
        ))),
    }
}

/// Whether an error means the connection broke (reset, broken pipe, closed by the server) rather
/// than a live connection that did not answer in time: a call that met it may be re-sent on a
/// fresh connection (see `Lanes::run`).
pub(crate) fn is_broken_connection(err: &redis::RedisError) -> bool {
    !err.is_timeout() && (err.is_connection_dropped() || err.is_io_error())
}

/// Whether an error means the connection itself is no good.
pub(crate) fn is_connection_error(err: &redis::RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
        || err.is_unrecoverable_error()
}

#[cfg(test)]
mod tests {
    use actix_web::http::StatusCode;

    use super::*;
    use crate::{
        fingerprint::Fingerprint,
        record::{encode_completed, encode_pending, OwnerToken, StoredResponse},
    };

    #[test]
    fn millis_are_at_least_one_and_at_most_the_longest_ttl() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_micros(10)), 1);
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
        let max = u64::try_from(Idempotency::MAX_TTL.as_millis()).expect("fits");
        assert_eq!(millis(Idempotency::MAX_TTL), max);
        assert_eq!(millis(Duration::MAX), max);
    }

    /// The claim script tells an in-flight record by its 4th byte (`string.byte(v, 4) == 80`).
    #[test]
    fn the_claim_script_reads_the_record_kind_where_the_encoding_puts_it() {
        let fp = Fingerprint::compute("POST", "/p", "", b"{}");
        let pending = encode_pending(&fp, &OwnerToken::random());
        assert_eq!(pending[3], 80);
        let completed = encode_completed(
            &fp,
            &StoredResponse {
                status: StatusCode::CREATED,
                headers: vec![],
                body: Bytes::from_static(b"P"),
            },
        )
        .expect("encodes");
        assert_ne!(completed[3], 80);
        assert!(CLAIM.contains("string.byte(v, 4) == 80"));
    }

    #[test]
    fn a_command_is_verb_script_one_key_then_the_arguments() {
        let lua = Lua::new(RELEASE);
        let cmd = lua.evalsha(
            b"idem:{k}",
            &[Arg::Bytes(b"x"), Arg::Millis(Duration::ZERO)],
        );
        let args: Vec<Vec<u8>> = cmd
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => b.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        let hash = lua.script().get_hash().as_bytes().to_vec();
        assert_eq!(
            args,
            [
                b"EVALSHA".to_vec(),
                hash,
                b"1".to_vec(),
                b"idem:{k}".to_vec(),
                b"x".to_vec(),
                b"1".to_vec()
            ]
        );
        let eval = lua.eval(b"k", &[]);
        assert_eq!(eval.args_iter().count(), 4);
    }

    #[test]
    fn a_claim_that_finds_its_own_pending_record_is_acquired() {
        let fp = Fingerprint::compute("POST", "/p", "", b"{}");
        let key = crate::scope::RecordKey::from_bytes([7; 32]);
        let ticket = Ticket::new(key, fp);
        let own = Value::Array(vec![
            Value::BulkString(ticket.pending_record().to_vec()),
            Value::Int(900),
        ]);
        assert_eq!(parse_claim(own, &ticket).expect("parses"), Claim::Acquired);
        let other = Ticket::new(key, fp);
        let theirs = Value::Array(vec![
            Value::BulkString(other.pending_record().to_vec()),
            Value::Int(900),
        ]);
        assert_eq!(
            parse_claim(theirs, &ticket).expect("parses"),
            Claim::InFlight {
                retry_after: Duration::from_millis(900)
            }
        );
    }

    #[test]
    fn the_native_claim_is_one_set_nx_get_px() {
        let cmd = native_claim(b"idem:{k}", b"P", Duration::from_millis(1500));
        let args: Vec<Vec<u8>> = cmd
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => b.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        let want: Vec<&[u8]> = vec![b"SET", b"idem:{k}", b"P", b"NX", b"GET", b"PX", b"1500"];
        assert_eq!(args, want);
    }

    #[test]
    fn the_native_claims_answers() {
        let fp = Fingerprint::compute("POST", "/p", "", b"{}");
        let key = crate::scope::RecordKey::from_bytes([7; 32]);
        let ticket = Ticket::new(key, fp);
        let lease = Duration::from_secs(30);
        assert_eq!(
            parse_native_claim(Value::Nil, &ticket, lease).expect("parses"),
            Claim::Acquired
        );
        let own = Value::BulkString(ticket.pending_record().to_vec());
        assert_eq!(
            parse_native_claim(own, &ticket, lease).expect("parses"),
            Claim::Acquired
        );
        let other = Ticket::new(key, fp);
        let theirs = Value::BulkString(other.pending_record().to_vec());
        assert_eq!(
            parse_native_claim(theirs, &ticket, lease).expect("parses"),
            Claim::InFlight { retry_after: lease }
        );
        let stored = StoredResponse {
            status: StatusCode::CREATED,
            headers: vec![],
            body: Bytes::from_static(b"paid"),
        };
        let done = Value::BulkString(encode_completed(&fp, &stored).expect("encodes").to_vec());
        assert_eq!(
            parse_native_claim(done, &ticket, lease).expect("parses"),
            Claim::Replay(stored)
        );
        assert!(parse_native_claim(Value::BulkString(b"junk".to_vec()), &ticket, lease).is_err());
        assert!(parse_native_claim(Value::Int(1), &ticket, lease).is_err());
    }

    #[test]
    fn the_remaining_lease_is_the_pttl() {
        let lease = Duration::from_secs(30);
        assert_eq!(
            remaining_lease(&Value::Int(1234), lease),
            Duration::from_millis(1234)
        );
        assert_eq!(remaining_lease(&Value::Int(-2), lease), Duration::ZERO);
        assert_eq!(remaining_lease(&Value::Int(-1), lease), lease);
        assert_eq!(remaining_lease(&Value::Nil, lease), lease);
        let args: Vec<Vec<u8>> = pttl(b"idem:{k}")
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => b.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(args, [b"PTTL".to_vec(), b"idem:{k}".to_vec()]);
    }

    #[test]
    fn an_old_servers_refusal_is_told_apart() {
        let syntax = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "An error was signalled by the server",
            "syntax error".to_owned(),
        ));
        // Built by hand, the error carries no server code: check the parser on a real answer.
        let parsed = redis::parse_redis_value(b"-ERR syntax error\r\n").expect("parses");
        let refused = match parsed {
            Value::ServerError(e) => redis::RedisError::from(e),
            other => panic!("a server error, got {other:?}"),
        };
        assert!(refuses_native_claim(&refused), "{refused:?}");
        let wrongtype = match redis::parse_redis_value(
            b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
        )
        .expect("parses")
        {
            Value::ServerError(e) => redis::RedisError::from(e),
            other => panic!("a server error, got {other:?}"),
        };
        assert!(!refuses_native_claim(&wrongtype));
        let _ = syntax;
        let mode = ClaimMode::native();
        assert!(mode.is_native());
        mode.fall_back();
        assert!(!mode.is_native());
    }
}
