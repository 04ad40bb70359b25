//! The journal of steps on Redis (see `Steps`): one hash per record, beside it, in the record's
//! slot. Both Redis stores send exactly these commands.
//!
//! The journal of the record `<prefix>{<hex>}` is the hash `<prefix>{<hex>}:steps` (the same hash
//! tag, so the same cluster slot; a record key always ends in `}`, so the two never meet). Its
//! field `fp` is the version byte of this layout followed by the fingerprint of the request whose
//! steps it holds; each step is the field `s:<name>`, holding the entry as `Steps` encoded it.
//! It is not in the record's value on purpose: a pending record's TTL is its lease, and a release
//! deletes it, while the journal must outlive both (the retry resumes from it).
//!
//! - Loading is one `HGETALL` (not fenced: a journal under another fingerprint reads as empty).
//! - Recording a step is one `EVALSHA` of [`RECORD_STEP`] on both keys: it checks that the record
//!   is still the owner's pending record, replaces a journal of another fingerprint, writes the
//!   step and sets the journal's TTL to the handler's ttl.

use bytes::Bytes;
use deadpool_redis::redis::{Cmd, Script, Value};

use super::scripts::millis;
use crate::store::{StoreError, Ticket};

/// The version byte of the journal's layout, first byte of its `fp` field.
const JOURNAL_V1: u8 = 1;
/// The suffix of a journal's key after its record's key.
const SUFFIX: &[u8] = b":steps";
/// The prefix of a step's field.
const STEP_FIELD: &[u8] = b"s:";

/// `KEYS[1]` record, `KEYS[2]` journal; `ARGV[1]` the owner's pending record, `ARGV[2]` the
/// journal's `fp` field, `ARGV[3]` the step's field, `ARGV[4]` its entry, `ARGV[5]` ttl in ms.
/// Answers 1 when written, 0 when the ticket no longer owns the record (nothing written).
pub(crate) const RECORD_STEP: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local fp = redis.call('HGET', KEYS[2], 'fp')
if fp and fp ~= ARGV[2] then
  redis.call('DEL', KEYS[2])
end
redis.call('HSET', KEYS[2], 'fp', ARGV[2], ARGV[3], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return 1
";

/// The step script, hashed once per process.
pub(crate) static STEP_SCRIPT: std::sync::LazyLock<StepScript> =
    std::sync::LazyLock::new(StepScript::new);

/// The step script and its hash.
pub(crate) struct StepScript {
    script: Script,
}

impl StepScript {
    pub(crate) fn new() -> Self {
        Self {
            script: Script::new(RECORD_STEP),
        }
    }

    pub(crate) fn script(&self) -> &Script {
        &self.script
    }

    /// `EVALSHA <hash> 2 <record> <journal> ...` (`eval`: `EVAL <source> ...`).
    pub(crate) fn command(
        &self,
        eval: bool,
        record: &[u8],
        ticket: &Ticket,
        name: &str,
        entry: &[u8],
        ttl: std::time::Duration,
    ) -> Cmd {
        let mut cmd = Cmd::new();
        if eval {
            cmd.arg("EVAL").arg(RECORD_STEP);
        } else {
            cmd.arg("EVALSHA").arg(self.script.get_hash());
        }
        cmd.arg(2)
            .arg(record)
            .arg(journal_key(record))
            .arg(ticket.pending_record())
            .arg(&fingerprint_field(ticket)[..])
            .arg(step_field(name))
            .arg(entry)
            .arg(millis(ttl));
        cmd
    }
}

/// The key of the journal of the record whose key is `record`.
pub(crate) fn journal_key(record: &[u8]) -> Vec<u8> {
    [record, SUFFIX].concat()
}

fn fingerprint_field(ticket: &Ticket) -> [u8; 33] {
    let mut field = [0u8; 33];
    field[0] = JOURNAL_V1;
    field[1..].copy_from_slice(ticket.fingerprint().as_bytes());
    field
}

fn step_field(name: &str) -> Vec<u8> {
    [STEP_FIELD, name.as_bytes()].concat()
}

/// `HGETALL <journal>`.
pub(crate) fn load_command(record: &[u8]) -> Cmd {
    let mut cmd = Cmd::new();
    cmd.arg("HGETALL").arg(journal_key(record));
    cmd
}

/// Parses `HGETALL`'s answer: the steps of the ticket's request, none when the journal is
/// missing or holds another request's (another fingerprint).
pub(crate) fn parse_load(
    value: Value,
    ticket: &Ticket,
) -> Result<Vec<(String, Bytes)>, StoreError> {
    let pairs: Vec<(Value, Value)> = match value {
        Value::Map(pairs) => pairs,
        Value::Array(items) | Value::Set(items) => {
            if items.len() % 2 != 0 {
                return Err(StoreError::Protocol("HGETALL answered an odd array".into()));
            }
            let mut items = items.into_iter();
            let mut pairs = Vec::with_capacity(items.len() / 2);
            while let (Some(k), Some(v)) = (items.next(), items.next()) {
                pairs.push((k, v));
            }
            pairs
        }
        Value::Nil => Vec::new(),
        other => return Err(StoreError::Protocol(format!("HGETALL answered {other:?}"))),
    };
    let mut fingerprint = None;
    let mut steps = Vec::new();
    for (field, value) in pairs {
        let (Value::BulkString(field), Value::BulkString(value)) = (field, value) else {
            return Err(StoreError::Protocol(
                "HGETALL answered a field that is not a string".into(),
            ));
        };
        if field == b"fp" {
            fingerprint = Some(value);
        } else if let Some(name) = field.strip_prefix(STEP_FIELD) {
            let name = String::from_utf8(name.to_vec())
                .map_err(|_| StoreError::Corrupt("a journal's step name is not UTF-8".into()))?;
            steps.push((name, Bytes::from(value)));
        } else {
            return Err(StoreError::Corrupt(
                format!(
                    "a journal holds an unknown field {:?}",
                    String::from_utf8_lossy(&field)
                )
                .into(),
            ));
        }
    }
    match fingerprint {
        None if steps.is_empty() => Ok(Vec::new()),
        None => Err(StoreError::Corrupt("a journal has no fingerprint".into())),
        Some(fp) => match fp.split_first() {
            Some((&JOURNAL_V1, fp)) if fp == ticket.fingerprint().as_bytes() => Ok(steps),
            Some((&JOURNAL_V1, _)) => Ok(Vec::new()),
            _ => Err(StoreError::Corrupt(
                "a journal of an unknown version (its first byte)".into(),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{fingerprint::Fingerprint, scope::RecordKey};

    fn ticket(body: &[u8]) -> Ticket {
        Ticket::new(
            RecordKey::from_bytes([3; 32]),
            Fingerprint::compute("POST", "/p", "", body),
        )
    }

    fn bulk(b: &[u8]) -> Value {
        Value::BulkString(b.to_vec())
    }

    #[test]
    fn the_journal_is_in_the_records_slot() {
        assert_eq!(journal_key(b"idem:{00ff}"), b"idem:{00ff}:steps");
    }

    #[test]
    fn a_journal_reads_back_only_under_its_fingerprint() {
        let t = ticket(b"a");
        let fp = fingerprint_field(&t);
        let answer = Value::Array(vec![
            bulk(b"fp"),
            bulk(&fp),
            bulk(b"s:charge"),
            bulk(b"\x01O{}"),
        ]);
        let steps = parse_load(answer.clone(), &t).expect("parses");
        assert_eq!(
            steps,
            vec![("charge".to_owned(), Bytes::from_static(b"\x01O{}"))]
        );
        assert!(parse_load(answer, &ticket(b"b"))
            .expect("parses")
            .is_empty());
        assert!(parse_load(Value::Array(vec![]), &t)
            .expect("parses")
            .is_empty());
        let map = Value::Map(vec![(bulk(b"fp"), bulk(&fp)), (bulk(b"s:x"), bulk(b"1"))]);
        assert_eq!(parse_load(map, &t).expect("parses").len(), 1);
        let mut old = fp;
        old[0] = 9;
        let unknown = Value::Array(vec![bulk(b"fp"), bulk(&old)]);
        assert!(matches!(
            parse_load(unknown, &t),
            Err(StoreError::Corrupt(_))
        ));
    }
}
