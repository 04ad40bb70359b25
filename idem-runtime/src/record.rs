//! Stored records and their compact, versioned binary encoding.
//!
//! ```text
//! format 1 (fingerprint encoding raw/v2, implied; written for records in that encoding):
//!   magic "id" | format 1 | kind | fingerprint (32 bytes) | kind-specific part
//!     kind 'P' (pending):   owner token (16 bytes)
//!     kind 'C' (completed): status u16 | header count u16 |
//!                           per header: name length u16, name, value length u32, value |
//!                           body (the rest)
//! format 2 (written for every other fingerprint encoding, and for records with sections):
//!   magic "id" | format 2 | kind | encoding id u8 | fingerprint (32 bytes) | kind-specific part |
//!   sections
//!     kind 'P' (pending):   owner token (16 bytes)
//!     kind 'C' (completed): status u16 | header count u16 | headers as in format 1 |
//!                           body length u32 | body
//!     sections, to the end: tag u16 | length u32 | that many bytes
//! ```
//!
//! All integers are big-endian. The kind byte is the 4th in every format (the Redis claim script
//! reads it there). A section whose tag has its high bit clear ([`SECTION_CRITICAL`]) is
//! additional data that a reader which does not know the tag skips (recovery points will be
//! one); a reader that does not know a critical tag (high bit set) refuses the record, as it
//! refuses a format or a kind it does not know: [`DecodeError::is_newer`].
//!
//! ```text
//! section 0x0001 (additional), "expires at": u64, the record's expiry in milliseconds since the
//!   Unix epoch by the writer's clock. The Redis stores write it on completed records, so that an
//!   instance that reads the record can keep a copy no longer than the record lives (the replay
//!   cache); a reader that does not know it skips it, and one that finds it of another length
//!   reads the record without it.
//! ```
//!
//! A writer uses the oldest format that holds the record, so that the previous release still
//! reads what this one writes. Decoding never panics: a truncated, foreign or corrupt value is a
//! [`DecodeError`].

use std::fmt;

use actix_web::http::{
    header::{HeaderMap, HeaderName, HeaderValue, CONNECTION},
    StatusCode,
};
use bytes::{BufMut, Bytes, BytesMut};

use crate::{encoding::FingerprintEncoding, fingerprint::Fingerprint};

const MAGIC: &[u8; 2] = b"id";
/// Record format 1: no encoding id (raw/v2 implied), no sections.
const FORMAT_1: u8 = 1;
/// Record format 2: an encoding id, a body length, sections.
const FORMAT_2: u8 = 2;
const KIND_PENDING: u8 = b'P';
const KIND_COMPLETED: u8 = b'C';
/// The high bit of a section tag: a reader that does not know the tag must refuse the record.
pub(crate) const SECTION_CRITICAL: u16 = 0x8000;
/// The section that holds a completed record's expiry (milliseconds since the Unix epoch).
const SECTION_EXPIRES_AT: u16 = 0x0001;
const HEADER_LEN_1: usize = 2 + 1 + 1 + 32;
const HEADER_LEN_2: usize = HEADER_LEN_1 + 1;
/// The longest encoded pending record this release writes (format 2, no section).
pub(crate) const PENDING_LEN_MAX: usize = HEADER_LEN_2 + 16;

/// The format a record with `fingerprint` and no section is written in: the oldest that holds it.
const fn format_for(fingerprint: &Fingerprint) -> u8 {
    if fingerprint.encoding().id() == FingerprintEncoding::RAW_V2.id() {
        FORMAT_1
    } else {
        FORMAT_2
    }
}

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
        Self::decode_with_expiry(raw).map(|(record, _)| record)
    }

    /// Decodes a record, and the expiry its writer put in it (milliseconds since the Unix epoch),
    /// if any.
    ///
    /// # Errors
    ///
    /// As [`decode`](Self::decode).
    pub(crate) fn decode_with_expiry(raw: Bytes) -> Result<(Self, Option<u64>), DecodeError> {
        let mut r = Reader { buf: raw, pos: 0 };
        if r.take(2)? != MAGIC.as_slice() {
            return Err(DecodeError::NotARecord);
        }
        let format = r.u8()?;
        if format != FORMAT_1 && format != FORMAT_2 {
            return Err(DecodeError::UnsupportedVersion(format));
        }
        let kind = r.u8()?;
        if kind != KIND_PENDING && kind != KIND_COMPLETED {
            return Err(DecodeError::UnknownKind(kind));
        }
        let encoding = if format == FORMAT_1 {
            FingerprintEncoding::RAW_V2
        } else {
            FingerprintEncoding::from_id(r.u8()?)
        };
        let fingerprint = Fingerprint::new(encoding, r.array()?);
        let record = if kind == KIND_PENDING {
            let token = OwnerToken::from_bytes(r.array()?);
            if format == FORMAT_1 && r.remaining() != 0 {
                return Err(DecodeError::TrailingBytes);
            }
            Self::Pending { fingerprint, token }
        } else {
            let code = r.u16()?;
            let status =
                StatusCode::from_u16(code).map_err(|_| DecodeError::InvalidStatus(code))?;
            let count = r.u16()?;
            let mut headers = Vec::with_capacity(usize::from(count).min(64));
            for _ in 0..count {
                let name_len = usize::from(r.u16()?);
                let name = HeaderName::from_bytes(&r.take(name_len)?)
                    .map_err(|_| DecodeError::InvalidHeader)?;
                let value_len = usize::try_from(r.u32()?).map_err(|_| DecodeError::Truncated)?;
                let value = HeaderValue::from_maybe_shared(r.take(value_len)?)
                    .map_err(|_| DecodeError::InvalidHeader)?;
                headers.push((name, value));
            }
            let body = if format == FORMAT_1 {
                r.rest()
            } else {
                let len = usize::try_from(r.u32()?).map_err(|_| DecodeError::Truncated)?;
                r.take(len)?
            };
            Self::Completed {
                fingerprint,
                response: StoredResponse {
                    status,
                    headers,
                    body,
                },
            }
        };
        // Format 2: the sections. Read the expiry; skip any other additional one, refuse a
        // critical one this release does not know.
        let mut expires_at = None;
        while r.remaining() > 0 {
            let tag = r.u16()?;
            let len = usize::try_from(r.u32()?).map_err(|_| DecodeError::Truncated)?;
            let value = r.take(len)?;
            if tag & SECTION_CRITICAL != 0 {
                return Err(DecodeError::UnsupportedSection(tag));
            }
            // An expiry of another length (a later release's extension of it) tells nothing
            // this release can use: the record is read without it.
            if let (SECTION_EXPIRES_AT, Ok(ms)) = (tag, <[u8; 8]>::try_from(&value[..])) {
                expires_at = Some(u64::from_be_bytes(ms));
            }
        }
        Ok((record, expires_at))
    }
}

/// The encoding of a pending record: also the exact bytes the owner compares against in the store.
#[cfg(test)]
pub(crate) fn encode_pending(fingerprint: &Fingerprint, token: &OwnerToken) -> Bytes {
    Bytes::copy_from_slice(pending_bytes(fingerprint, token).as_slice())
}

/// An encoded pending record, on the stack: a ticket keeps it inline, with no allocation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct PendingBytes {
    buf: [u8; PENDING_LEN_MAX],
    len: u8,
}

impl PendingBytes {
    /// The encoded record.
    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

/// The encoding of a pending record.
pub(crate) fn pending_bytes(fingerprint: &Fingerprint, token: &OwnerToken) -> PendingBytes {
    let mut buf = [0u8; PENDING_LEN_MAX];
    let header = write_header(&mut buf, KIND_PENDING, fingerprint);
    buf[header..header + 16].copy_from_slice(token.as_bytes());
    PendingBytes {
        buf,
        // At most PENDING_LEN_MAX (53).
        len: (header + 16) as u8,
    }
}

/// Writes the header of a record of `kind` into `out`; answers its length.
fn write_header(out: &mut [u8; PENDING_LEN_MAX], kind: u8, fingerprint: &Fingerprint) -> usize {
    write_header_in(out, format_for(fingerprint), kind, fingerprint)
}

/// Writes the header of a record of `kind` in `format` into `out`; answers its length.
fn write_header_in(
    out: &mut [u8; PENDING_LEN_MAX],
    format: u8,
    kind: u8,
    fingerprint: &Fingerprint,
) -> usize {
    out[..2].copy_from_slice(MAGIC);
    out[2] = format;
    out[3] = kind;
    let mut at = 4;
    if format == FORMAT_2 {
        out[4] = fingerprint.encoding().id();
        at = 5;
    }
    out[at..at + 32].copy_from_slice(fingerprint.as_bytes());
    at + 32
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
    encode_completed_in(format_for(fingerprint), fingerprint, response, None)
}

/// The encoding of a completed record that says when it expires (`expires_at`, milliseconds since
/// the Unix epoch), in its section: always format 2, which the previous release reads, skipping
/// the section.
///
/// # Errors
///
/// As [`Record::encode`].
pub(crate) fn encode_completed_expiring(
    fingerprint: &Fingerprint,
    response: &StoredResponse,
    expires_at: u64,
) -> Result<Bytes, EncodeError> {
    encode_completed_in(FORMAT_2, fingerprint, response, Some(expires_at))
}

fn encode_completed_in(
    format: u8,
    fingerprint: &Fingerprint,
    response: &StoredResponse,
    expires_at: Option<u64>,
) -> Result<Bytes, EncodeError> {
    let headers_len: usize = response
        .headers
        .iter()
        .map(|(n, v)| 6 + n.as_str().len() + v.len())
        .sum();
    let mut buf =
        BytesMut::with_capacity(HEADER_LEN_2 + 8 + headers_len + response.body.len() + 14);
    let mut header = [0u8; PENDING_LEN_MAX];
    let len = write_header_in(&mut header, format, KIND_COMPLETED, fingerprint);
    buf.put_slice(&header[..len]);
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
    if format == FORMAT_2 {
        let body_len = u32::try_from(response.body.len()).map_err(|_| EncodeError::BodyTooLong)?;
        buf.put_u32(body_len);
    }
    buf.put_slice(&response.body);
    if let Some(ms) = expires_at {
        buf.put_u16(SECTION_EXPIRES_AT);
        buf.put_u32(8);
        buf.put_u64(ms);
    }
    Ok(buf.freeze())
}

/// Puts the header of a record of `kind`; answers its format.
#[cfg(test)]
fn put_header(buf: &mut BytesMut, kind: u8, fingerprint: &Fingerprint) -> u8 {
    let mut header = [0u8; PENDING_LEN_MAX];
    let len = write_header(&mut header, kind, fingerprint);
    buf.put_slice(&header[..len]);
    header[2]
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
    /// A body of 4 GiB or more, in record format 2.
    #[error("the response body is too long to store")]
    BodyTooLong,
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
    /// A record format this release does not read (formats 1 and 2): written by a newer
    /// release.
    #[error(
        "the stored record has format {0}, which this release of idem does not read (it reads \
         formats 1 and 2): it was written by a newer release"
    )]
    UnsupportedVersion(u8),
    /// An unknown record kind byte: written by a newer release.
    #[error(
        "the stored record has kind {0:#04x}, which this release of idem does not know: it was \
         written by a newer release"
    )]
    UnknownKind(u8),
    /// A critical section this release does not know: written by a newer release.
    #[error(
        "the stored record has a section {0:#06x} that this release of idem must understand to \
         read it and does not know: it was written by a newer release"
    )]
    UnsupportedSection(u16),
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

impl DecodeError {
    /// Whether the record is well-formed as far as this release can tell, but written by a newer
    /// release in a format, a kind or with a critical section that this one does not read: it is
    /// refused (the request answers 503 and its handler does not run), never misread.
    pub(crate) fn is_newer(&self) -> bool {
        matches!(
            self,
            Self::UnsupportedVersion(_) | Self::UnknownKind(_) | Self::UnsupportedSection(_)
        )
    }
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
        assert_eq!(enc.len(), HEADER_LEN_1 + 16);
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
        assert!(DecodeError::UnsupportedVersion(9).is_newer());
        enc[2] = FORMAT_1;
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

    /// Records the previous release wrote (format 1, raw/v2), as its own code path wrote them into
    /// Redis for `POST /payments` (`{"amount":1000,"currency":"eur"}`, answered 201) and for one
    /// still running: pinned bytes, shared with the HTTP upgrade tests (`tests/upgrade.rs`).
    pub(crate) const FORMAT_1_COMPLETED: &str = "6964014345671f309ac0a35f2a3550e1cd36201ad1ec9f963cf94ebe5d2f96dfa56c6cd400c9000200086c6f636174696f6e000000152f7061796d656e74732f7061795f66697874757265000c636f6e74656e742d74797065000000106170706c69636174696f6e2f6a736f6e7b22616d6f756e74223a313030302c226964223a227061795f66697874757265227d";
    pub(crate) const FORMAT_1_PENDING: &str = "69640150509719dfb384885fbb736892a50db41928e0a28f0b42cbb0565ce2fb0c7db8156cb4c98a4632df7d0e74873879612100";

    fn hex(s: &str) -> Bytes {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn the_previous_releases_records_decode_and_are_written_again_byte_for_byte() {
        let completed = Record::decode(hex(FORMAT_1_COMPLETED)).expect("decodes");
        let Record::Completed {
            fingerprint,
            response,
        } = &completed
        else {
            panic!("a completed record: {completed:?}");
        };
        assert_eq!(fingerprint.encoding(), FingerprintEncoding::RAW_V2);
        assert_eq!(response.status, StatusCode::CREATED);
        assert_eq!(&response.body[..], br#"{"amount":1000,"id":"pay_fixture"}"#);
        // This release writes a raw/v2 record in format 1, exactly as the previous one did: the
        // previous release reads what this one writes while both share a store.
        assert_eq!(
            encode_completed(fingerprint, response).expect("encodes"),
            hex(FORMAT_1_COMPLETED)
        );
        let pending = Record::decode(hex(FORMAT_1_PENDING)).expect("decodes");
        let Record::Pending { fingerprint, token } = &pending else {
            panic!("a pending record: {pending:?}");
        };
        assert_eq!(fingerprint.encoding(), FingerprintEncoding::RAW_V2);
        assert_eq!(encode_pending(fingerprint, token), hex(FORMAT_1_PENDING));
    }

    fn other_encoding() -> Fingerprint {
        Fingerprint::new(FingerprintEncoding::from_id(200), *fp().as_bytes())
    }

    #[test]
    fn another_encoding_is_written_in_format_2_and_round_trips() {
        let pending = Record::Pending {
            fingerprint: other_encoding(),
            token: OwnerToken::random(),
        };
        let enc = pending.encode().expect("encodes");
        assert_eq!((enc[2], enc[3], enc[4]), (FORMAT_2, KIND_PENDING, 200));
        assert_eq!(enc.len(), PENDING_LEN_MAX);
        assert_eq!(Record::decode(enc).expect("decodes"), pending);
        let completed = Record::Completed {
            fingerprint: other_encoding(),
            response: response(),
        };
        let enc = completed.encode().expect("encodes");
        assert_eq!((enc[2], enc[3], enc[4]), (FORMAT_2, KIND_COMPLETED, 200));
        assert_eq!(Record::decode(enc.clone()).expect("decodes"), completed);
        // The body is length-prefixed: every prefix, also one cut inside the body, is an error.
        for cut in 0..enc.len() {
            assert!(Record::decode(enc.slice(..cut)).is_err(), "{cut}");
        }
        // A different digest or encoding is a different fingerprint.
        assert_ne!(other_encoding(), fp());
    }

    /// A section appended to a format 2 record, as a newer release adds one.
    fn with_section(record: &Bytes, tag: u16, data: &[u8]) -> Bytes {
        let mut out = BytesMut::from(&record[..]);
        out.put_u16(tag);
        out.put_u32(u32::try_from(data.len()).expect("short"));
        out.put_slice(data);
        out.freeze()
    }

    #[test]
    fn an_unknown_additional_section_is_skipped_and_a_critical_one_refused() {
        let completed = Record::Completed {
            fingerprint: other_encoding(),
            response: response(),
        };
        let pending = Record::Pending {
            fingerprint: other_encoding(),
            token: OwnerToken::random(),
        };
        for record in [completed, pending] {
            let enc = record.encode().expect("encodes");
            let one = with_section(&enc, 0x0001, b"a journal this release ignores");
            let two = with_section(&one, 0x7fff, b"");
            assert_eq!(Record::decode(one).expect("decodes"), record);
            assert_eq!(Record::decode(two.clone()).expect("decodes"), record);
            let critical = with_section(&two, SECTION_CRITICAL | 1, b"x");
            let refused = Record::decode(critical).expect_err("refused");
            assert_eq!(refused, DecodeError::UnsupportedSection(0x8001));
            assert!(refused.is_newer());
            // A section cut short is truncated, not skipped.
            assert_eq!(
                Record::decode(two.slice(..two.len() - 1)),
                Err(DecodeError::Truncated)
            );
        }
        // A raw/v2 record in format 2 (a newer release may write one, with sections) is read.
        let mut raw_v2 = BytesMut::new();
        raw_v2.put_slice(b"id\x02P\x02");
        raw_v2.put_slice(fp().as_bytes());
        raw_v2.put_slice(&[7; 16]);
        let raw_v2 = with_section(&raw_v2.freeze(), 0x0002, b"steps");
        assert_eq!(
            Record::decode(raw_v2).expect("decodes"),
            Record::Pending {
                fingerprint: fp(),
                token: OwnerToken::from_bytes([7; 16])
            }
        );
    }

    #[test]
    fn a_newer_format_or_kind_is_refused_as_newer_not_as_corrupt() {
        let mut enc = BytesMut::from(&encode_pending(&fp(), &OwnerToken::random())[..]);
        enc[2] = 3;
        let err = Record::decode(enc.clone().freeze()).expect_err("refused");
        assert_eq!(err, DecodeError::UnsupportedVersion(3));
        assert!(err.is_newer());
        assert!(err.to_string().contains("newer release"), "{err}");
        enc[2] = FORMAT_2;
        enc[3] = b'R';
        let err = Record::decode(enc.freeze()).expect_err("refused");
        assert_eq!(err, DecodeError::UnknownKind(b'R'));
        assert!(err.is_newer());
        assert!(!DecodeError::Truncated.is_newer());
        assert!(!DecodeError::NotARecord.is_newer());
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

    #[test]
    fn an_expiring_record_is_format_2_with_its_expiry_and_reads_as_the_same_record() {
        let response = StoredResponse {
            status: StatusCode::CREATED,
            headers: vec![(
                HeaderName::from_static("location"),
                HeaderValue::from_static("/payments/1"),
            )],
            body: Bytes::from_static(b"{}"),
        };
        let raw = encode_completed_expiring(&fp(), &response, 1_780_000_000_123).expect("encodes");
        assert_eq!(raw[2], FORMAT_2);
        let (record, expires_at) = Record::decode_with_expiry(raw.clone()).expect("decodes");
        assert_eq!(expires_at, Some(1_780_000_000_123));
        assert_eq!(
            record,
            Record::Completed {
                fingerprint: fp(),
                response: response.clone()
            }
        );
        // A record without the section has no expiry; the section is additional: a reader that
        // did not know it (the previous release) skips it, as `decode` does here.
        let plain = encode_completed(&fp(), &response).expect("encodes");
        assert_eq!(Record::decode_with_expiry(plain).expect("decodes").1, None);
        assert_eq!(Record::decode(raw).expect("decodes"), record);
    }
}
