//! Stored records and their compact, versioned binary encoding.
//!
//! ```text
//! magic "id" | version 1 | kind | fingerprint (32 bytes) | kind-specific part
//!   kind 'P' (pending):   owner token (16 bytes)
//!   kind 'C' (completed): status u16 | header count u16 |
//!                         per header: name length u16, name, value length u32, value |
//!                         body (the rest)
//! ```
//!
//! All integers are big-endian. Decoding never panics: a truncated, foreign or corrupt value is a
//! [`DecodeError`].

use std::fmt;

use actix_web::http::{
    header::{HeaderMap, HeaderName, HeaderValue, CONNECTION},
    StatusCode,
};
use bytes::{BufMut, Bytes, BytesMut};

use crate::fingerprint::Fingerprint;

const MAGIC: &[u8; 2] = b"id";
const VERSION: u8 = 1;
const KIND_PENDING: u8 = b'P';
const KIND_COMPLETED: u8 = b'C';
const HEADER_LEN: usize = 2 + 1 + 1 + 32;
/// The encoded size of a pending record.
pub(crate) const PENDING_LEN: usize = HEADER_LEN + 16;

/// A random secret naming the request that holds a record's lease.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct OwnerToken([u8; 16]);

impl OwnerToken {
    /// A fresh random token.
    pub(crate) fn random() -> Self {
        Self(rand::random())
    }

    /// Wraps raw token bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The token bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Debug for OwnerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A token is a capability: never print it whole.
        write!(f, "OwnerToken({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

/// A response as stored for replay.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// The status code.
    pub status: StatusCode,
    /// The headers to replay, in order (hop-by-hop headers, those named in `Connection`, `Date`
    /// and `Set-Cookie` removed).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The body bytes, exactly as first sent.
    pub body: Bytes,
}

impl StoredResponse {
    /// Captures `status`, `headers` and `body`, keeping only the headers that are replayed: not
    /// the hop-by-hop ones (the fixed list, and those the response names in `Connection`), not
    /// `Date`, `Set-Cookie` or the framing headers.
    pub fn capture(status: StatusCode, headers: &HeaderMap, body: Bytes) -> Self {
        let hop_by_hop = connection_options(headers);
        let headers = headers
            .iter()
            .filter(|(name, _)| is_replayed_header(name) && !hop_by_hop.contains(name))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        Self {
            status,
            headers,
            body,
        }
    }
}

impl fmt::Debug for StoredResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredResponse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// Whether a response header is stored and replayed.
///
/// Hop-by-hop headers (RFC 9110 §7.6.1) describe one connection, `Date` describes one moment,
/// `Set-Cookie` may carry a session that must not be handed out twice, and the framing headers
/// (`Content-Length`, `Transfer-Encoding`) are recomputed from the replayed body.
pub(crate) fn is_replayed_header(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "date"
            | "set-cookie"
            | "content-length"
    )
}

/// The header names a message lists in its `Connection` header lines (RFC 9110 §7.6.1: each
/// names a header that describes this connection only, which a sender must not forward). Empty,
/// and no allocation, for the usual response without `Connection`. A token that is not a valid
/// header name names no header that the response can hold, and is skipped.
fn connection_options(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(CONNECTION)
        .flat_map(|line| line.as_bytes().split(|&b| b == b','))
        .filter_map(|token| HeaderName::from_bytes(token.trim_ascii()).ok())
        .collect()
}

/// One record as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    /// A request holds the lease and is running the handler.
    Pending {
        /// The first request's fingerprint.
        fingerprint: Fingerprint,
        /// The lease holder.
        token: OwnerToken,
    },
    /// The handler finished; its response is replayed.
    Completed {
        /// The first request's fingerprint.
        fingerprint: Fingerprint,
        /// What to replay.
        response: StoredResponse,
    },
}

impl Record {
    /// The fingerprint of the request that created the record.
    pub(crate) fn fingerprint(&self) -> &Fingerprint {
        match self {
            Self::Pending { fingerprint, .. } | Self::Completed { fingerprint, .. } => fingerprint,
        }
    }

    /// Encodes the record.
    ///
    /// # Errors
    ///
    /// [`EncodeError`] when the response has more than 65535 headers, a header name longer than
    /// 65535 bytes or a header value longer than 4 GiB.
    #[cfg(test)]
    pub(crate) fn encode(&self) -> Result<Bytes, EncodeError> {
        match self {
            Self::Pending { fingerprint, token } => Ok(encode_pending(fingerprint, token)),
            Self::Completed {
                fingerprint,
                response,
            } => encode_completed(fingerprint, response),
        }
    }

    /// Decodes a record.
    ///
    /// # Errors
    ///
    /// [`DecodeError`] for a truncated, foreign or corrupt value.
    pub(crate) fn decode(raw: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader { buf: raw, pos: 0 };
        if r.take(2)? != MAGIC.as_slice() {
            return Err(DecodeError::NotARecord);
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let kind = r.u8()?;
        let fingerprint = Fingerprint::from_bytes(r.array()?);
        match kind {
            KIND_PENDING => {
                let token = OwnerToken::from_bytes(r.array()?);
                if r.remaining() != 0 {
                    return Err(DecodeError::TrailingBytes);
                }
                Ok(Self::Pending { fingerprint, token })
            }
            KIND_COMPLETED => {
                let code = r.u16()?;
                let status =
                    StatusCode::from_u16(code).map_err(|_| DecodeError::InvalidStatus(code))?;
                let count = r.u16()?;
                let mut headers = Vec::with_capacity(usize::from(count).min(64));
                for _ in 0..count {
                    let name_len = usize::from(r.u16()?);
                    let name = HeaderName::from_bytes(&r.take(name_len)?)
                        .map_err(|_| DecodeError::InvalidHeader)?;
                    let value_len =
                        usize::try_from(r.u32()?).map_err(|_| DecodeError::Truncated)?;
                    let value = HeaderValue::from_maybe_shared(r.take(value_len)?)
                        .map_err(|_| DecodeError::InvalidHeader)?;
                    headers.push((name, value));
                }
                let body = r.rest();
                Ok(Self::Completed {
                    fingerprint,
                    response: StoredResponse {
                        status,
                        headers,
                        body,
                    },
                })
            }
            other => Err(DecodeError::UnknownKind(other)),
        }
    }
}

/// The encoding of a pending record: also the exact bytes the owner compares against in the store.
#[cfg(test)]
pub(crate) fn encode_pending(fingerprint: &Fingerprint, token: &OwnerToken) -> Bytes {
    Bytes::copy_from_slice(&pending_bytes(fingerprint, token))
}

/// The encoding of a pending record, on the stack: a ticket keeps it inline, with no allocation.
pub(crate) fn pending_bytes(fingerprint: &Fingerprint, token: &OwnerToken) -> [u8; PENDING_LEN] {
    let mut out = [0u8; PENDING_LEN];
    out[..2].copy_from_slice(MAGIC);
    out[2] = VERSION;
    out[3] = KIND_PENDING;
    out[4..HEADER_LEN].copy_from_slice(fingerprint.as_bytes());
    out[HEADER_LEN..].copy_from_slice(token.as_bytes());
    out
}

/// The encoding of a completed record.
///
/// # Errors
///
/// As [`Record::encode`].
pub(crate) fn encode_completed(
    fingerprint: &Fingerprint,
    response: &StoredResponse,
) -> Result<Bytes, EncodeError> {
    let headers_len: usize = response
        .headers
        .iter()
        .map(|(n, v)| 6 + n.as_str().len() + v.len())
        .sum();
    let mut buf = BytesMut::with_capacity(HEADER_LEN + 4 + headers_len + response.body.len());
    put_header(&mut buf, KIND_COMPLETED, fingerprint);
    buf.put_u16(response.status.as_u16());
    let count = u16::try_from(response.headers.len()).map_err(|_| EncodeError::TooManyHeaders)?;
    buf.put_u16(count);
    for (name, value) in &response.headers {
        let name_len =
            u16::try_from(name.as_str().len()).map_err(|_| EncodeError::HeaderTooLong)?;
        let value_len = u32::try_from(value.len()).map_err(|_| EncodeError::HeaderTooLong)?;
        buf.put_u16(name_len);
        buf.put_slice(name.as_str().as_bytes());
        buf.put_u32(value_len);
        buf.put_slice(value.as_bytes());
    }
    buf.put_slice(&response.body);
    Ok(buf.freeze())
}

fn put_header(buf: &mut BytesMut, kind: u8, fingerprint: &Fingerprint) {
    buf.put_slice(MAGIC);
    buf.put_u8(VERSION);
    buf.put_u8(kind);
    buf.put_slice(fingerprint.as_bytes());
}

/// A response that cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// More than 65535 headers.
    #[error("the response has more than 65535 headers")]
    TooManyHeaders,
    /// A header name or value over its length field.
    #[error("a response header is too long to store")]
    HeaderTooLong,
}

/// A stored value that is not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The value ends before the record does.
    #[error("the stored record is truncated")]
    Truncated,
    /// The value does not start with the record magic: not written by idem.
    #[error("the stored value is not an idem record")]
    NotARecord,
    /// Written by a newer or older, incompatible version.
    #[error("the stored record has unsupported version {0}")]
    UnsupportedVersion(u8),
    /// An unknown record kind byte.
    #[error("the stored record has unknown kind {0:#04x}")]
    UnknownKind(u8),
    /// A status outside 100..=999.
    #[error("the stored record has invalid status {0}")]
    InvalidStatus(u16),
    /// A header name or value that is not valid HTTP.
    #[error("the stored record has an invalid header")]
    InvalidHeader,
    /// Bytes after a fixed-length record.
    #[error("the stored record has trailing bytes")]
    TrailingBytes,
}

struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated);
        }
        let out = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&bytes);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn rest(&mut self) -> Bytes {
        let out = self.buf.slice(self.pos..);
        self.pos = self.buf.len();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp() -> Fingerprint {
        Fingerprint::compute("POST", "/p", "", b"{}")
    }

    fn response() -> StoredResponse {
        StoredResponse {
            status: StatusCode::CREATED,
            headers: vec![
                (
                    HeaderName::from_static("content-type"),
                    HeaderValue::from_static("application/json"),
                ),
                (
                    HeaderName::from_static("location"),
                    HeaderValue::from_static("/payments/1"),
                ),
                (
                    HeaderName::from_static("x-multi"),
                    HeaderValue::from_static("a"),
                ),
                (
                    HeaderName::from_static("x-multi"),
                    HeaderValue::from_static("b"),
                ),
            ],
            body: Bytes::from_static(b"{\"id\":\"pay_1\"}\x00\xff"),
        }
    }

    #[test]
    fn round_trips() {
        let pending = Record::Pending {
            fingerprint: fp(),
            token: OwnerToken::random(),
        };
        let enc = pending.encode().expect("encodes");
        assert_eq!(enc.len(), PENDING_LEN);
        assert_eq!(Record::decode(enc).expect("decodes"), pending);

        let completed = Record::Completed {
            fingerprint: fp(),
            response: response(),
        };
        let enc = completed.encode().expect("encodes");
        assert_eq!(Record::decode(enc).expect("decodes"), completed);

        let empty = Record::Completed {
            fingerprint: fp(),
            response: StoredResponse {
                status: StatusCode::NO_CONTENT,
                headers: vec![],
                body: Bytes::new(),
            },
        };
        assert_eq!(
            Record::decode(empty.encode().expect("encodes")).expect("decodes"),
            empty
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let enc = Record::Completed {
            fingerprint: fp(),
            response: response(),
        }
        .encode()
        .expect("encodes");
        let body_start = enc.len() - response().body.len();
        for cut in 0..body_start {
            assert!(
                Record::decode(enc.slice(..cut)).is_err(),
                "prefix of {cut} bytes decoded"
            );
        }
        let pending = encode_pending(&fp(), &OwnerToken::random());
        for cut in 0..pending.len() {
            assert_eq!(
                Record::decode(pending.slice(..cut)),
                Err(DecodeError::Truncated)
            );
        }
    }

    #[test]
    fn foreign_and_corrupt_values_are_errors() {
        assert_eq!(
            Record::decode(Bytes::from_static(b"hello world, not a record")),
            Err(DecodeError::NotARecord)
        );
        let mut enc = BytesMut::from(&encode_pending(&fp(), &OwnerToken::random())[..]);
        enc[2] = 9;
        assert_eq!(
            Record::decode(enc.clone().freeze()),
            Err(DecodeError::UnsupportedVersion(9))
        );
        enc[2] = VERSION;
        enc[3] = b'X';
        assert_eq!(
            Record::decode(enc.clone().freeze()),
            Err(DecodeError::UnknownKind(b'X'))
        );
        enc[3] = KIND_PENDING;
        enc.put_u8(0);
        assert_eq!(
            Record::decode(enc.freeze()),
            Err(DecodeError::TrailingBytes)
        );

        let mut bad_status = BytesMut::new();
        put_header(&mut bad_status, KIND_COMPLETED, &fp());
        bad_status.put_u16(42);
        bad_status.put_u16(0);
        assert_eq!(
            Record::decode(bad_status.freeze()),
            Err(DecodeError::InvalidStatus(42))
        );

        let mut bad_header = BytesMut::new();
        put_header(&mut bad_header, KIND_COMPLETED, &fp());
        bad_header.put_u16(200);
        bad_header.put_u16(1);
        bad_header.put_u16(3);
        bad_header.put_slice(b"a b");
        bad_header.put_u32(0);
        assert_eq!(
            Record::decode(bad_header.freeze()),
            Err(DecodeError::InvalidHeader)
        );

        let mut huge_count = BytesMut::new();
        put_header(&mut huge_count, KIND_COMPLETED, &fp());
        huge_count.put_u16(200);
        huge_count.put_u16(u16::MAX);
        assert_eq!(
            Record::decode(huge_count.freeze()),
            Err(DecodeError::Truncated)
        );
    }

    #[test]
    fn capture_drops_unreplayable_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(
            HeaderName::from_static("content-type"),
            HeaderValue::from_static("text/plain"),
        );
        for name in [
            "date",
            "set-cookie",
            "connection",
            "transfer-encoding",
            "content-length",
            "keep-alive",
            "upgrade",
        ] {
            headers.insert(HeaderName::from_static(name), HeaderValue::from_static("x"));
        }
        let captured = StoredResponse::capture(StatusCode::OK, &headers, Bytes::new());
        let names: Vec<_> = captured.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["content-type"]);
    }

    #[test]
    fn capture_drops_the_headers_named_in_connection() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "X-Trace-Hop, close"),
            ("connection", " hop-two ,,\tKeep-Alive ,"),
            ("connection", "not a header name"),
            ("x-trace-hop", "1"),
            ("hop-two", "2"),
            ("x-kept", "3"),
            ("content-type", "text/plain"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_str(value).unwrap_or(HeaderValue::from_static("x")),
            );
        }
        let captured = StoredResponse::capture(StatusCode::OK, &headers, Bytes::new());
        let mut names: Vec<_> = captured.headers.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-type", "x-kept"]);
        // A response whose `Connection` names nothing it holds keeps every other header.
        let mut plain = HeaderMap::new();
        plain.insert(CONNECTION, HeaderValue::from_static("close"));
        plain.insert(
            HeaderName::from_static("x-kept"),
            HeaderValue::from_static("3"),
        );
        let captured = StoredResponse::capture(StatusCode::OK, &plain, Bytes::new());
        assert_eq!(captured.headers.len(), 1);
    }
}
