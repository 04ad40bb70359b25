//! The request fingerprint: SHA-256 over what makes two requests with one key the same request.
//!
//! Hashed, in order: the method; the path as the router matched it (actix-web's re-quoted form:
//! percent-escapes of characters that need none are decoded, `%2F`, `%25` and `%2B` are kept, so
//! `/pay%6Dents` is `/payments`), with the hex digits of escapes upper-cased (`%2f` is `%2F`)
//! and built from the raw path without loss where decoding would not be valid UTF-8 (see
//! [`normal_path`]); the raw
//! query string; `Content-Type`, normalised (the media type and parameter names lower-cased,
//! whitespace around `;` and `=` and at the ends dropped, empty parameters dropped, parameter
//! values kept as sent); `Content-Encoding`, normalised (codings lower-cased, trimmed, several
//! lines joined by `,`); then the raw body bytes, as sent (before any decompression). A header
//! that is absent and one that is empty are the same.
//!
//! Every field but the body is length-prefixed, and the body's length closes the hash, so no two
//! distinct requests share an encoding: `("/a", "bc")` and `("/ab", "c")` hash differently.
//!
//! A handler chooses how its body counts ([`FingerprintMode`]): as raw bytes (the default), or
//! by its canonical JSON form (`fingerprint = "json"`, see [`json`] for the form), optionally
//! without the values that named JSON pointers reach. The two are distinct encodings
//! ([`FingerprintEncoding`]): each digest input starts with its own domain tag, so a raw digest
//! and a JSON digest never meet. In the JSON encoding, after the same head, one byte says which
//! form of the body follows: `c` for the canonical form, `r` for the raw bytes of a body that has
//! none (not JSON, ambiguous, too deep, or sent with a `Content-Encoding`): such a body meets
//! only its own bytes, exactly as in the raw encoding, and the handler's own parser answers it.

use std::{borrow::Cow, fmt};

use sha2::{Digest, Sha256};

use crate::encoding::FingerprintEncoding;

mod json;

/// The raw encoding's domain tag, [`FingerprintEncoding::RAW_V2`]: a change to what is hashed
/// changes it, so that no two encodings can agree by accident. A changed encoding gets a new
/// [`FingerprintEncoding`] id, and this release keeps computing the previous one, so that the
/// records it wrote are compared in it.
const DOMAIN: &[u8] = b"idem/fingerprint/v2\0";

/// The JSON encoding's domain tag, [`FingerprintEncoding::JSON_V1`]. Neither tag is a prefix of
/// the other.
const JSON_DOMAIN: &[u8] = b"idem/fingerprint/json/v1\0";

/// How a handler's request body enters its fingerprint: `fingerprint = "raw"` (the default) or
/// `fingerprint = "json"` on `#[idempotent]`. Built by the macro.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FingerprintMode {
    /// The raw body bytes, as sent.
    Raw,
    /// The body's canonical JSON form, without the values `ignore` names.
    Json {
        /// JSON pointers (RFC 6901), each as its unescaped reference tokens: `/trace/id` is
        /// `&["trace", "id"]`, `/a~1b` is `&["a/b"]`. The macro checks them.
        ignore: &'static [&'static [&'static str]],
    },
}

impl FingerprintMode {
    /// The encoding a fingerprint in this mode is written in.
    pub(crate) const fn encoding(&self) -> FingerprintEncoding {
        match self {
            Self::Raw => FingerprintEncoding::RAW_V2,
            Self::Json { .. } => FingerprintEncoding::JSON_V1,
        }
    }

    /// The domain tag the digest input starts with.
    const fn domain(&self) -> &'static [u8] {
        match self {
            Self::Raw => DOMAIN,
            Self::Json { .. } => JSON_DOMAIN,
        }
    }
}

/// A SHA-256 digest identifying one request's content, with the encoding that computed it.
///
/// Two fingerprints are equal when both their encoding and their digest are.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    encoding: FingerprintEncoding,
    digest: [u8; 32],
}

impl Fingerprint {
    /// The fingerprint of a request with no `Content-Type` or `Content-Encoding` whose body is
    /// already in memory.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn compute(method: &str, path: &str, query: &str, body: &[u8]) -> Self {
        let mut hasher =
            FingerprintHasher::new(FingerprintMode::Raw, method, path, query, &[], &[]);
        hasher.update(body);
        hasher.finish(body)
    }

    /// Wraps raw digest bytes computed in the raw encoding, v2 ([`FingerprintEncoding::RAW_V2`]):
    /// what a record of format 1, or a store that keeps no encoding id, holds.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self::new(FingerprintEncoding::RAW_V2, bytes)
    }

    /// Wraps digest bytes computed in `encoding` (as stored in a record with its encoding id).
    pub const fn new(encoding: FingerprintEncoding, digest: [u8; 32]) -> Self {
        Self { encoding, digest }
    }

    /// The digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.digest
    }

    /// The encoding that computed the digest: a custom store keeps its id
    /// ([`FingerprintEncoding::id`]) next to the digest.
    pub const fn encoding(&self) -> FingerprintEncoding {
        self.encoding
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({}, ", self.encoding.id())?;
        for b in &self.digest[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

/// Incremental fingerprinting, for a body that arrives in chunks.
#[derive(Clone)]
pub(crate) struct FingerprintHasher {
    hasher: Sha256,
    body_len: u64,
    mode: FingerprintMode,
    /// Whether the body came with a `Content-Encoding` (its bytes are not the JSON text).
    encoded: bool,
}

impl FingerprintHasher {
    /// Starts a fingerprint in `mode` with the request's head: method, path (as routed), query,
    /// and the raw values of its `Content-Type` and `Content-Encoding` header lines (normalised
    /// here).
    pub(crate) fn new(
        mode: FingerprintMode,
        method: &str,
        path: &str,
        query: &str,
        content_type: &[&[u8]],
        content_encoding: &[&[u8]],
    ) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(mode.domain());
        // The usual request (one `Content-Type: application/json`, no `Content-Encoding`) is
        // already in normal form: hashed as sent, with no copy.
        let content_type: Cow<'_, [u8]> = match content_type {
            [] => Cow::Borrowed(b""),
            [line] if is_normal_content_type(line) => Cow::Borrowed(line),
            lines => Cow::Owned(normalise_content_type(lines)),
        };
        let content_encoding: Cow<'_, [u8]> = match content_encoding {
            [] => Cow::Borrowed(b""),
            [line] if is_normal_content_encoding(line) => Cow::Borrowed(line),
            lines => Cow::Owned(normalise_content_encoding(lines)),
        };
        for field in [
            method.as_bytes(),
            path.as_bytes(),
            query.as_bytes(),
            &content_type,
            &content_encoding,
        ] {
            hasher.update((field.len() as u64).to_be_bytes());
            hasher.update(field);
        }
        let encoded = !content_encoding.is_empty();
        Self {
            hasher,
            body_len: 0,
            mode,
            encoded,
        }
    }

    /// Feeds the next chunk of the raw body, as it arrives (the raw encoding hashes it at once;
    /// the JSON encoding needs the whole body, which [`Self::finish`] gets).
    pub(crate) fn update(&mut self, chunk: &[u8]) {
        self.body_len += chunk.len() as u64;
        if self.mode == FingerprintMode::Raw {
            self.hasher.update(chunk);
        }
    }

    /// Finishes the digest; `body` is the whole body that [`Self::update`] was fed.
    pub(crate) fn finish(mut self, body: &[u8]) -> Fingerprint {
        debug_assert_eq!(self.body_len, body.len() as u64, "the body fed is the body");
        match self.mode {
            FingerprintMode::Raw => self.hasher.update(self.body_len.to_be_bytes()),
            FingerprintMode::Json { ignore } => {
                let mut canonical = Vec::with_capacity(body.len());
                let canonicalised = if self.encoded {
                    Err(None)
                } else {
                    json::canonicalise(body, ignore, &mut canonical).map_err(Some)
                };
                let (form, content): (&[u8], &[u8]) = match canonicalised {
                    Ok(()) => (b"c", &canonical),
                    Err(reason) => {
                        tracing::debug!(
                            ?reason,
                            "the body has no canonical JSON form: fingerprinted by its raw bytes"
                        );
                        (b"r", body)
                    }
                };
                self.hasher.update(form);
                self.hasher.update(content);
                self.hasher.update((content.len() as u64).to_be_bytes());
            }
        }
        Fingerprint::new(self.mode.encoding(), self.hasher.finalize().into())
    }
}

const fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = v {
        if !is_ows(*first) {
            break;
        }
        v = rest;
    }
    while let [rest @ .., last] = v {
        if !is_ows(*last) {
            break;
        }
        v = rest;
    }
    v
}

/// Splits `value` at every `sep` outside a quoted string (a `"` up to the next unescaped `"`).
fn split_unquoted(value: &[u8], sep: u8) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, &b) in value.iter().enumerate() {
        if escaped {
            escaped = false;
        } else if quoted && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            quoted = !quoted;
        } else if b == sep && !quoted {
            parts.push(&value[start..i]);
            start = i + 1;
        }
    }
    parts.push(&value[start..]);
    parts
}

/// `Content-Type` as hashed: per header line, the media type lower-cased, then each non-empty
/// parameter as `;name=value` with the name lower-cased and the value as sent, whitespace around
/// them dropped; several lines (not valid HTTP, but possible) are kept apart by `\n`, which no
/// header value holds.
fn normalise_content_type(lines: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        if n > 0 {
            out.push(b'\n');
        }
        let mut segments = split_unquoted(line, b';').into_iter();
        if let Some(media_type) = segments.next() {
            out.extend(trim_ows(media_type).iter().map(u8::to_ascii_lowercase));
        }
        for parameter in segments.map(trim_ows).filter(|p| !p.is_empty()) {
            out.push(b';');
            match parameter.iter().position(|&b| b == b'=') {
                Some(eq) => {
                    out.extend(
                        trim_ows(&parameter[..eq])
                            .iter()
                            .map(u8::to_ascii_lowercase),
                    );
                    out.push(b'=');
                    out.extend_from_slice(trim_ows(&parameter[eq + 1..]));
                }
                None => out.extend(parameter.iter().map(u8::to_ascii_lowercase)),
            }
        }
    }
    out
}

/// Whether one `Content-Type` line is its own normal form: no upper case, no whitespace, no quoted
/// string, no empty parameter. `normalise_content_type` leaves such a line as it is (a test checks
/// it), so it is hashed without a copy.
fn is_normal_content_type(line: &[u8]) -> bool {
    !line.is_empty()
        && line
            .iter()
            .all(|&b| !b.is_ascii_uppercase() && !is_ows(b) && b != b'"')
        && !line.starts_with(b";")
        && !line.ends_with(b";")
        && !line.windows(2).any(|w| w == b";;")
}

/// Whether one `Content-Encoding` line is its own normal form: lower-case codings, no whitespace,
/// no empty coding.
fn is_normal_content_encoding(line: &[u8]) -> bool {
    !line.is_empty()
        && line.iter().all(|&b| !b.is_ascii_uppercase() && !is_ows(b))
        && !line.starts_with(b",")
        && !line.ends_with(b",")
        && !line.windows(2).any(|w| w == b",,")
}

/// `Content-Encoding` as hashed: every coding of every line, lower-cased and trimmed, empty ones
/// dropped, joined by `,` (several lines of a list header mean the same as one joined by commas).
fn normalise_content_encoding(lines: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    let codings = lines
        .iter()
        .flat_map(|line| line.split(|&b| b == b','))
        .map(trim_ows)
        .filter(|c| !c.is_empty());
    for (n, coding) in codings.enumerate() {
        if n > 0 {
            out.push(b',');
        }
        out.extend(coding.iter().map(u8::to_ascii_lowercase));
    }
    out
}

/// The bytes whose escapes actix-web's router keeps encoded (`%25`, `%2F`, `%2B`): decoding them
/// would change what the path means (a `/` inside a segment is not a separator).
const KEPT_ESCAPED: &[u8] = b"%/+";

/// The path as hashed, from the path as the router matched it (`routed`: actix-web's re-quoted
/// form, escapes of characters that need none decoded) and the path as sent (`raw`). Two paths
/// that are the same request give the same string, two that are not give different ones:
///
/// - The usual path: `routed`, with the hex digits of its escapes (only `%25`, `%2F` and `%2B`
///   are left) upper-cased, as RFC 3986 (2.1) makes them case-insensitive: `/a%2fb` is `/a%2Fb`,
///   `/pay%6Dents` is `/payments`, `/a%2Fb` is not `/a/b`.
/// - When decoding is not valid UTF-8 (`%FF`), actix-web's `routed` holds a replacement character
///   that several paths share, so the same form is built from `raw` without the loss: escapes of
///   ASCII characters that need none decoded (`%78` is `x`), the others (`%2F`, `%FF`) kept with
///   upper-case hex digits.
/// - A path with a `%` that starts no escape (`/100%`, `/%%46F`) is not a valid URI (RFC 3986,
///   2.1): it is `raw`, only its escapes' hex digits upper-cased, so that it never meets a path
///   whose escape decodes to the same characters (`/%%46F` is not `/%FF`).
///
/// A path already in its form (no lower-case hex digit, no needless escape: every path a client
/// library sends) is hashed as it is, with no copy, so its digest is the one earlier versions
/// computed and a record stored before meets its retries. Only a request stored before with a
/// path outside this form (`%2f`; `%78` beside `%FF`; a stray `%` beside a needless escape)
/// answers 422 to its retries after an upgrade, until its ttl ends: it had been told apart from
/// its equivalents, and now meets them.
pub(crate) fn normal_path<'a>(routed: &'a str, raw: &'a str) -> Cow<'a, str> {
    if has_stray_percent(raw.as_bytes()) {
        upper_case_escapes(raw)
    } else if routed.contains(char::REPLACEMENT_CHARACTER) {
        requote(raw)
    } else {
        upper_case_escapes(routed)
    }
}

/// The byte of the escape `%HH` at `at`, if one starts there.
fn escape_at(bytes: &[u8], at: usize) -> Option<u8> {
    let hex = |b: u8| char::from(b).to_digit(16);
    match bytes.get(at..at + 3)? {
        [b'%', high, low] => u8::try_from(hex(*high)? << 4 | hex(*low)?).ok(),
        _ => None,
    }
}

/// Whether a `%` of `bytes` starts no escape.
fn has_stray_percent(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .enumerate()
        .any(|(at, &b)| b == b'%' && escape_at(bytes, at).is_none())
}

/// `path` with the hex digits of its escapes upper-cased (borrowed when none is lower-case). Two
/// escapes never overlap: an escape's digits are not `%`.
fn upper_case_escapes(path: &str) -> Cow<'_, str> {
    let bytes = path.as_bytes();
    let lower: Vec<usize> = (0..bytes.len())
        .filter(|&at| {
            escape_at(bytes, at).is_some()
                && (bytes[at + 1].is_ascii_lowercase() || bytes[at + 2].is_ascii_lowercase())
        })
        .collect();
    if lower.is_empty() {
        return Cow::Borrowed(path);
    }
    let mut upper = path.to_owned();
    for at in lower {
        // Two ASCII hex digits: on character boundaries.
        upper[at + 1..at + 3].make_ascii_uppercase();
    }
    Cow::Owned(upper)
}

/// The router's re-quoting of `raw`, without its lossy step: escapes of ASCII bytes outside
/// [`KEPT_ESCAPED`] decoded, every other byte that is not plain ASCII (an escape that is kept, or
/// decodes past ASCII) written as an escape with upper-case hex digits. Called only on a path
/// where every `%` starts an escape; borrowed when `raw` is already in this form.
fn requote(raw: &str) -> Cow<'_, str> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut at = 0;
    while at < bytes.len() {
        let (byte, len) = match escape_at(bytes, at) {
            Some(b) => (b, 3),
            None => (bytes[at], 1),
        };
        if byte.is_ascii() && (len == 1 || !KEPT_ESCAPED.contains(&byte)) {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        at += len;
    }
    if out == raw {
        Cow::Borrowed(raw)
    } else {
        Cow::Owned(out)
    }
}

impl fmt::Debug for FingerprintHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FingerprintHasher")
            .field("body_len", &self.body_len)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_boundaries_are_unambiguous() {
        let a = Fingerprint::compute("POST", "/a", "bc", b"");
        let b = Fingerprint::compute("POST", "/ab", "c", b"");
        assert_ne!(a, b);
        let c = Fingerprint::compute("POST", "/p", "q", b"x");
        let d = Fingerprint::compute("POST", "/p", "qx", b"");
        assert_ne!(c, d);
        let e = Fingerprint::compute("POS", "T/p", "", b"");
        let f = Fingerprint::compute("POST", "/p", "", b"");
        assert_ne!(e, f);
    }

    #[test]
    fn every_field_counts() {
        let base = Fingerprint::compute("POST", "/payments", "a=1", b"{}");
        assert_eq!(
            base,
            Fingerprint::compute("POST", "/payments", "a=1", b"{}")
        );
        assert_ne!(base, Fingerprint::compute("PUT", "/payments", "a=1", b"{}"));
        assert_ne!(base, Fingerprint::compute("POST", "/payment", "a=1", b"{}"));
        assert_ne!(
            base,
            Fingerprint::compute("POST", "/payments", "a=2", b"{}")
        );
        assert_ne!(
            base,
            Fingerprint::compute("POST", "/payments", "a=1", b"{ }")
        );
    }

    #[test]
    fn chunking_does_not_change_the_digest() {
        let whole = Fingerprint::compute("POST", "/x", "", b"hello world");
        let mut h = FingerprintHasher::new(FingerprintMode::Raw, "POST", "/x", "", &[], &[]);
        h.update(b"hello");
        h.update(b"");
        h.update(b" world");
        assert_eq!(whole, h.finish(b"hello world"));
    }

    fn hex(fp: Fingerprint) -> String {
        fp.as_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }

    fn head(content_type: &[&str], content_encoding: &[&str]) -> Fingerprint {
        let ct: Vec<&[u8]> = content_type.iter().map(|v| v.as_bytes()).collect();
        let ce: Vec<&[u8]> = content_encoding.iter().map(|v| v.as_bytes()).collect();
        FingerprintHasher::new(FingerprintMode::Raw, "POST", "/p", "", &ct, &ce).finish(b"")
    }

    #[test]
    fn content_type_is_compared_normalised() {
        let json = head(&["application/json;charset=utf-8"], &[]);
        for same in [
            "Application/JSON;charset=utf-8",
            " application/json ; charset = utf-8 ",
            "application/json;\tCharset=utf-8",
            "application/json;charset=utf-8;",
        ] {
            assert_eq!(head(&[same], &[]), json, "{same}");
        }
        for other in [
            "application/json",
            "text/plain;charset=utf-8",
            "application/json;charset=UTF-8",
            "application/json;charset=\"utf-8\"",
            "application/json;charset=utf-8;x=1",
        ] {
            assert_ne!(head(&[other], &[]), json, "{other}");
        }
        // A `;` inside a quoted value is not a separator, and its spaces are kept.
        assert_ne!(
            head(&["a/b; x=\"1 ; 2\""], &[]),
            head(&["a/b; x=\"1;2\""], &[])
        );
        assert_eq!(
            head(&["a/b; x=\"1 ; 2\""], &[]),
            head(&["a/b;x=\"1 ; 2\""], &[])
        );
        // Absent and empty are the same; two lines are not one line.
        assert_eq!(head(&[], &[]), head(&[""], &[]));
        assert_ne!(head(&["a/b", "c/d"], &[]), head(&["a/b;c/d"], &[]));
    }

    #[test]
    fn content_encoding_is_compared_normalised() {
        let gzip = head(&[], &["gzip"]);
        assert_eq!(head(&[], &["GZip "]), gzip);
        assert_ne!(head(&[], &[]), gzip);
        assert_ne!(head(&[], &["br"]), gzip);
        let both = head(&[], &["gzip, br"]);
        assert_eq!(head(&[], &["gzip", "br"]), both);
        assert_eq!(head(&[], &["gzip,br,"]), both);
        assert_ne!(head(&[], &["br, gzip"]), both);
        // The fields are apart: a media type is not a coding.
        assert_ne!(head(&["gzip"], &[]), gzip);
    }

    #[test]
    fn known_vectors_are_pinned() {
        // Computed independently (Python's hashlib: SHA-256 of "idem/fingerprint/v2\0", then
        // method, path, query, normalised Content-Type and normalised Content-Encoding each as a
        // big-endian u64 length and its bytes, then the body and its length): changing the
        // encoding turns every retry of a stored request into a 422.
        for (method, path, query, content_type, content_encoding, body, digest) in [
            (
                "POST",
                "/payments",
                "",
                &[][..],
                &[][..],
                &b"{\"amount\":100}"[..],
                "ed12600ce1a2d7c62aa9ddb07b19c651025d45960976d08b54a997339c2d6af2",
            ),
            (
                "POST",
                "/p",
                "",
                &[],
                &[],
                b"",
                "2dc3f124ee7fea550b597fb7913587ea9f0c0ad22ee833c419d9023c16ad52d4",
            ),
            (
                "PATCH",
                "/orders/7",
                "a=1&b=2",
                // Hashed as "application/json;charset=UTF-8" and "gzip,br".
                &[&b"Application/JSON ; Charset = UTF-8"[..]],
                &[&b"GZIP"[..], b" br"],
                b"xxx",
                "9daec87dc07a30c1af8253c66f7ba4f2e4be736116f0c14cdc51564e82901ebe",
            ),
        ] {
            let mut hasher = FingerprintHasher::new(
                FingerprintMode::Raw,
                method,
                path,
                query,
                content_type,
                content_encoding,
            );
            hasher.update(body);
            assert_eq!(hex(hasher.finish(body)), digest);
        }
        assert_eq!(
            hex(Fingerprint::compute("POST", "/p", "", b"")),
            "2dc3f124ee7fea550b597fb7913587ea9f0c0ad22ee833c419d9023c16ad52d4"
        );
    }

    const JSON: FingerprintMode = FingerprintMode::Json { ignore: &[] };

    fn body(mode: FingerprintMode, content_encoding: &[&str], body: &str) -> Fingerprint {
        let ce: Vec<&[u8]> = content_encoding.iter().map(|v| v.as_bytes()).collect();
        let json: &[&[u8]] = &[b"application/json"];
        let mut hasher = FingerprintHasher::new(mode, "POST", "/payments", "", json, &ce);
        hasher.update(body.as_bytes());
        hasher.finish(body.as_bytes())
    }

    #[test]
    fn the_json_fingerprint_compares_what_the_body_means() {
        let first = body(JSON, &[], r#"{"amount":100,"currency":"EUR"}"#);
        for same in [
            r#"{ "currency" : "EUR", "amount" : 100 }"#,
            "{\n  \"amount\": 100,\n  \"currency\": \"\\u0045UR\"\n}\n",
        ] {
            assert_eq!(body(JSON, &[], same), first, "{same}");
            assert_ne!(
                body(FingerprintMode::Raw, &[], same),
                body(
                    FingerprintMode::Raw,
                    &[],
                    r#"{"amount":100,"currency":"EUR"}"#
                )
            );
        }
        for other in [
            r#"{"amount":101,"currency":"EUR"}"#,
            r#"{"amount":100.0,"currency":"EUR"}"#,
            r#"{"amount":100,"currency":"EUR","x":null}"#,
            r#"[{"amount":100,"currency":"EUR"}]"#,
        ] {
            assert_ne!(body(JSON, &[], other), first, "{other}");
        }
        // Left out: present, absent or changed, the rest decides.
        const TS: FingerprintMode = FingerprintMode::Json {
            ignore: &[&["client_ts"]],
        };
        assert_eq!(
            body(TS, &[], r#"{"amount":100,"client_ts":1}"#),
            body(TS, &[], r#"{"client_ts":2,"amount":100}"#)
        );
        assert_eq!(
            body(TS, &[], r#"{"amount":100,"client_ts":1}"#),
            body(TS, &[], r#"{"amount":100}"#)
        );
        assert_ne!(
            body(TS, &[], r#"{"amount":100,"client_ts":1}"#),
            body(TS, &[], r#"{"amount":200,"client_ts":1}"#)
        );
    }

    #[test]
    fn the_json_encoding_never_meets_the_raw_one() {
        // The canonical bytes under the raw encoding are another digest: the domains differ.
        let canonical = r#"{"amount":100}"#;
        assert_ne!(
            body(JSON, &[], canonical),
            body(FingerprintMode::Raw, &[], canonical)
        );
        assert_ne!(DOMAIN, JSON_DOMAIN);
        assert!(!JSON_DOMAIN.starts_with(DOMAIN) && !DOMAIN.starts_with(JSON_DOMAIN));
        assert_eq!(FingerprintMode::Raw.encoding(), FingerprintEncoding::RAW_V2);
        assert_eq!(JSON.encoding(), FingerprintEncoding::JSON_V1);
    }

    #[test]
    fn a_body_with_no_canonical_form_is_compared_by_its_bytes() {
        for bytes in ["", "not json", r#"{"amount":1,"amount":2}"#, "{\"a\":1"] {
            assert_eq!(body(JSON, &[], bytes), body(JSON, &[], bytes), "{bytes}");
        }
        // Ambiguous: it meets only its own bytes, never a reading of it.
        let duplicate = body(JSON, &[], r#"{"amount":1,"amount":2}"#);
        assert_ne!(duplicate, body(JSON, &[], r#"{"amount":2}"#));
        assert_ne!(duplicate, body(JSON, &[], r#"{"amount":1}"#));
        assert_ne!(duplicate, body(JSON, &[], r#"{ "amount":1,"amount":2}"#));
        // Invalid bytes never meet a canonical form that happens to be the same bytes.
        assert_ne!(body(JSON, &[], "[1,]"), body(JSON, &[], "[1]"));
        // With a Content-Encoding the bytes are not the JSON text: compared as sent.
        assert_ne!(
            body(JSON, &["gzip"], r#"{"a":1}"#),
            body(JSON, &["gzip"], r#"{ "a":1}"#)
        );
        assert_eq!(
            body(JSON, &["gzip"], r#"{"a":1}"#),
            body(JSON, &["gzip"], r#"{"a":1}"#)
        );
    }

    #[test]
    fn json_vectors_are_pinned() {
        // Computed independently (Python's hashlib): SHA-256 of "idem/fingerprint/json/v1\0",
        // the head as in the raw encoding, then `c` and the canonical form (or `r` and the raw
        // bytes) and its big-endian u64 length.
        assert_eq!(
            hex(body(JSON, &[], r#"{ "currency": "EUR", "amount": 100 }"#)),
            "2a9a41a80e15632516d2627d09f3d449d6a453b5b9c35535b2e21234e7c2803a"
        );
        assert_eq!(
            hex(body(JSON, &[], r#"{"amount":1,"amount":2}"#)),
            "f1790329a87d4c15b6b61dea8e1634f19bd4ab450da6e550f673e69523e87ed7"
        );
    }

    /// The path as hashed for a request sent with `raw`: what `normal_path` gets from the router
    /// (actix-web's re-quoting) and from the request line.
    fn path_form(raw: &str) -> Cow<'static, str> {
        let uri: actix_web::http::Uri = raw.parse().expect("a path");
        let url = actix_web::dev::Url::new(uri);
        Cow::Owned(normal_path(url.path(), raw).into_owned())
    }

    #[test]
    fn equivalent_paths_have_one_form_and_different_paths_do_not() {
        for same in [
            &["/acct/a%2Fb/pay", "/acct/a%2fb/pay", "/acct/%61%2fb/pay"][..],
            &["/payments", "/pay%6Dents", "/pay%6dents", "/%70ayments"],
            &["/a%2B", "/a%2b"],
            &["/a%25", "/a%25"],
            // Not UTF-8 once decoded: the raw path, up to needless escapes and hex case.
            &[
                "/acct/%FF%78/pay",
                "/acct/%FFx/pay",
                "/acct/%ff%78/pay",
                "/acct/%fFx/pay",
            ],
            &["/files/%FF%2Fb", "/files/%ff%2fb", "/files/%FF%2F%62"],
            &["/%EF%BF%BD", "/%ef%bf%bd"],
            // A stray `%`: as sent, up to the hex case of its escapes.
            &["/100%/%2f", "/100%/%2F"],
        ] {
            let form = path_form(same[0]);
            for path in &same[1..] {
                assert_eq!(path_form(path), form, "{path} and {}", same[0]);
            }
        }
        for (a, b) in [
            ("/acct/a%2Fb/pay", "/acct/a/b/pay"),
            ("/a%2Bb", "/a+b"),
            ("/a%25", "/a%"),
            ("/acct/%FF%78/pay", "/acct/%FFy/pay"),
            ("/files/%FF%2Fb", "/files/%FF/b"),
            ("/%FF", "/%FE"),
            ("/%FF", "/%%46F"),
            ("/%EF%BF%BD", "/%FF"),
            ("/100%/x", "/100%/%78"),
            ("/%2F", "/%%32F"),
        ] {
            assert_ne!(path_form(a), path_form(b), "{a} and {b}");
        }
    }

    #[test]
    fn a_path_in_its_form_is_hashed_as_it_is() {
        for path in [
            "/payments",
            "/orders/7",
            "/acct/a%2Fb/pay",
            "/a%2B%25",
            "/acct/%FF/pay",
            "/files/%FF%2Fb",
            "/100%",
            "/%%2F",
            "/",
        ] {
            let uri: actix_web::http::Uri = path.parse().expect("a path");
            let url = actix_web::dev::Url::new(uri);
            assert!(
                matches!(normal_path(url.path(), path), Cow::Borrowed(p) if p == path),
                "{path}"
            );
        }
    }

    /// Whether a path is malformed, and its parts: (escaped, byte).
    type Meaning = (bool, Vec<(bool, u8)>);

    /// What a path means, computed apart from the implementation: the sequence of its parts, an
    /// escape of an ASCII character that needs none being that character. Malformed paths (a
    /// stray `%`) mean themselves, up to the case of their escapes.
    fn meaning(raw: &str) -> Meaning {
        let bytes = raw.as_bytes();
        let escape = |at: usize| -> Option<u8> {
            let (h, l) = (*bytes.get(at + 1)?, *bytes.get(at + 2)?);
            let digits = std::str::from_utf8(&[h, l]).ok()?.to_owned();
            (bytes[at] == b'%' && h.is_ascii_hexdigit() && l.is_ascii_hexdigit())
                .then(|| u8::from_str_radix(&digits, 16).ok())
                .flatten()
        };
        let stray = (0..bytes.len()).any(|at| bytes[at] == b'%' && escape(at).is_none());
        let mut parts = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            match escape(at) {
                Some(b) if !stray && b.is_ascii() && !b"%/+".contains(&b) => {
                    parts.push((false, b));
                    at += 3;
                }
                Some(b) => {
                    parts.push((true, b));
                    at += 3;
                }
                None => {
                    parts.push((false, bytes[at]));
                    at += 1;
                }
            }
        }
        (stray, parts)
    }

    /// Every path of up to five characters over an alphabet that makes escapes, stray `%`,
    /// kept escapes, needless ones and bytes past ASCII: two paths have one form exactly when
    /// they mean the same.
    #[test]
    fn forms_and_meanings_partition_paths_alike() {
        use std::collections::HashMap;
        let alphabet = ['%', '2', 'F', 'f', '7', '8', 'x', '/', '5'];
        let mut paths = vec![String::new()];
        let mut all = Vec::new();
        for _ in 0..5 {
            paths = paths
                .iter()
                .flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}")))
                .collect();
            all.extend(paths.iter().cloned());
        }
        let mut by_form: HashMap<Cow<'static, str>, Meaning> = HashMap::new();
        let mut by_meaning: HashMap<Meaning, Cow<'static, str>> = HashMap::new();
        for tail in all {
            let raw = format!("/{tail}");
            let (form, meaning) = (path_form(&raw), meaning(&raw));
            if let Some(seen) = by_form.insert(form.clone(), meaning.clone()) {
                assert_eq!(seen, meaning, "two meanings share the form {form} ({raw})");
            }
            if let Some(seen) = by_meaning.insert(meaning, form.clone()) {
                assert_eq!(seen, form, "one meaning has two forms ({raw})");
            }
        }
    }

    #[test]
    fn a_line_in_normal_form_is_what_normalising_it_gives() {
        for line in [
            &b"application/json"[..],
            b"application/json;charset=utf-8",
            b"text/plain;format=flowed;delsp=yes",
            b"multipart/form-data;boundary=abc",
            b"a",
        ] {
            assert!(is_normal_content_type(line), "{line:?}");
            assert_eq!(normalise_content_type(&[line]), line, "{line:?}");
        }
        for line in [
            &b"Application/JSON"[..],
            b"application/json; charset=utf-8",
            b"application/json;charset=\"utf-8\"",
            b"application/json;",
            b";a",
            b"a;;b",
            b"",
        ] {
            assert!(!is_normal_content_type(line), "{line:?}");
        }
        for line in [&b"gzip"[..], b"gzip,br", b"deflate"] {
            assert!(is_normal_content_encoding(line), "{line:?}");
            assert_eq!(normalise_content_encoding(&[line]), line, "{line:?}");
        }
        for line in [&b"GZIP"[..], b"gzip, br", b"gzip,", b",gzip", b"a,,b", b""] {
            assert!(!is_normal_content_encoding(line), "{line:?}");
        }
        // Every printable line of up to three characters over the bytes that matter: the fast
        // path never disagrees with the normalisation.
        let alphabet = b"aA;=, \"b";
        for a in alphabet {
            for b in alphabet {
                for c in alphabet {
                    let line = [*a, *b, *c];
                    if is_normal_content_type(&line) {
                        assert_eq!(normalise_content_type(&[&line]), line, "{line:?}");
                    }
                    if is_normal_content_encoding(&line) {
                        assert_eq!(normalise_content_encoding(&[&line]), line, "{line:?}");
                    }
                }
            }
        }
    }
}
