//! The `Idempotency-Key` header: parsing and validation.
//!
//! The IETF draft (`draft-ietf-httpapi-idempotency-key-header`) makes the header a structured-field
//! string (`Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"`), while Stripe's clients send the
//! bare token (`Idempotency-Key: 8e03978e-40d5-43e8-bc93-6894a57f9324`). Both are accepted and mean the
//! same key. A key is 1 to [`MAX_KEY_LEN`] visible ASCII characters (`0x21..=0x7e`).

use std::{borrow::Cow, fmt};

use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};

/// The longest key accepted, in bytes.
pub(crate) const MAX_KEY_LEN: usize = 255;

/// A validated idempotency key, as the client meant it (quotes and escapes removed). It borrows
/// the header's bytes, unless a quoted key had escapes to remove.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct IdempotencyKey<'a>(Cow<'a, str>);

impl<'a> IdempotencyKey<'a> {
    /// The key as a string.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses one header value, in either the quoted or the bare form.
    ///
    /// # Errors
    ///
    /// Returns a [`KeyError`] naming what is wrong: empty, too long, a character outside visible
    /// ASCII, or a malformed quoted string.
    pub(crate) fn parse(raw: &'a [u8]) -> Result<Self, KeyError> {
        let raw = trim_ows(raw);
        let key = if raw.first() == Some(&b'"') {
            unquote(raw)?
        } else {
            Cow::Borrowed(raw)
        };
        if key.is_empty() {
            return Err(KeyError::Empty);
        }
        if key.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong { len: key.len() });
        }
        if let Some(pos) = key.iter().position(|b| !(0x21..=0x7e).contains(b)) {
            return Err(KeyError::InvalidCharacter { position: pos });
        }
        // Every byte is visible ASCII, so this cannot fail; map the impossible case to an error
        // rather than panicking on client input.
        let invalid = |_| KeyError::InvalidCharacter { position: 0 };
        Ok(Self(match key {
            Cow::Borrowed(bytes) => Cow::Borrowed(std::str::from_utf8(bytes).map_err(invalid)?),
            Cow::Owned(bytes) => Cow::Owned(
                String::from_utf8(bytes).map_err(|_| KeyError::InvalidCharacter { position: 0 })?,
            ),
        }))
    }

    /// Reads the key from `headers`: `Ok(None)` when the header is absent.
    ///
    /// # Errors
    ///
    /// [`KeyError::MultipleHeaders`] when the header appears more than once, or the error of
    /// [`IdempotencyKey::parse`] for its value.
    pub(crate) fn from_headers(
        headers: &'a HeaderMap,
        name: &HeaderName,
    ) -> Result<Option<Self>, KeyError> {
        let mut values = headers.get_all(name);
        let Some(first) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(KeyError::MultipleHeaders);
        }
        Self::from_header_value(first).map(Some)
    }

    /// Parses a single [`HeaderValue`].
    ///
    /// # Errors
    ///
    /// As [`IdempotencyKey::parse`].
    pub(crate) fn from_header_value(value: &'a HeaderValue) -> Result<Self, KeyError> {
        Self::parse(value.as_bytes())
    }
}

impl fmt::Debug for IdempotencyKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("IdempotencyKey").field(&self.0).finish()
    }
}

impl fmt::Display for IdempotencyKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why an `Idempotency-Key` header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum KeyError {
    /// The header appears on more than one line.
    #[error("the idempotency key header appears more than once")]
    MultipleHeaders,
    /// The header is present but the key is empty.
    #[error("the idempotency key is empty")]
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`] bytes.
    #[error("the idempotency key is {len} bytes long; at most {MAX_KEY_LEN} are allowed")]
    TooLong {
        /// The key's length in bytes.
        len: usize,
    },
    /// A byte outside visible ASCII (`0x21..=0x7e`).
    #[error("the idempotency key has a character outside visible ASCII at position {position}")]
    InvalidCharacter {
        /// Zero-based byte offset in the key.
        position: usize,
    },
    /// A quoted key with no closing quote, a bad escape, or text after the closing quote.
    #[error("the idempotency key is a malformed quoted string")]
    MalformedQuotedString,
}

fn trim_ows(raw: &[u8]) -> &[u8] {
    let start = raw.iter().position(|b| *b != b' ' && *b != b'\t');
    let Some(start) = start else {
        return &[];
    };
    let end = raw
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(start, |e| e + 1);
    &raw[start..end]
}

/// RFC 8941 §3.3.3 sString: `DQUOTE *( unescaped / "\" ( DQUOTE / "\" ) ) DQUOTE`. Borrows the
/// inside of the quotes when it holds no escape.
fn unquote(raw: &[u8]) -> Result<Cow<'_, [u8]>, KeyError> {
    if let [b'"', inner @ .., b'"'] = raw {
        if !inner.iter().any(|&b| b == b'\\' || b == b'"') {
            return Ok(Cow::Borrowed(inner));
        }
    }
    unescape(raw).map(Cow::Owned)
}

fn unescape(raw: &[u8]) -> Result<Vec<u8>, KeyError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut iter = raw.iter().enumerate().skip(1);
    while let Some((i, &b)) = iter.next() {
        match b {
            b'\\' => match iter.next() {
                Some((_, &esc @ (b'"' | b'\\'))) => out.push(esc),
                _ => return Err(KeyError::MalformedQuotedString),
            },
            b'"' => {
                return if i + 1 == raw.len() {
                    Ok(out)
                } else {
                    Err(KeyError::MalformedQuotedString)
                };
            }
            other => out.push(other),
        }
    }
    Err(KeyError::MalformedQuotedString)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> String {
        IdempotencyKey::parse(raw.as_bytes())
            .expect("valid key")
            .as_str()
            .to_owned()
    }

    fn err(raw: &[u8]) -> KeyError {
        IdempotencyKey::parse(raw).expect_err("invalid key")
    }

    #[test]
    fn bare_and_quoted_forms_mean_the_same_key() {
        assert_eq!(ok("abc"), "abc");
        assert_eq!(ok("\"abc\""), "abc");
        assert_eq!(ok("  abc\t"), "abc");
        assert_eq!(ok(" \"abc\" "), "abc");
        assert_eq!(
            ok("8e03978e-40d5-43e8-bc93-6894a57f9324"),
            "8e03978e-40d5-43e8-bc93-6894a57f9324"
        );
    }

    #[test]
    fn quoted_escapes_are_decoded() {
        assert_eq!(ok(r#""a\"b""#), "a\"b");
        assert_eq!(ok(r#""a\\b""#), "a\\b");
    }

    #[test]
    fn length_bounds() {
        assert_eq!(ok(&"k".repeat(255)).len(), 255);
        assert_eq!(ok(&format!("\"{}\"", "k".repeat(255))).len(), 255);
        assert_eq!(
            err("k".repeat(256).as_bytes()),
            KeyError::TooLong { len: 256 }
        );
        assert_eq!(ok("k"), "k");
    }

    #[test]
    fn empty_forms() {
        assert_eq!(err(b""), KeyError::Empty);
        assert_eq!(err(b"   "), KeyError::Empty);
        assert_eq!(err(b"\"\""), KeyError::Empty);
    }

    #[test]
    fn invalid_characters() {
        assert_eq!(err(b"a b"), KeyError::InvalidCharacter { position: 1 });
        assert_eq!(err(b"\"a b\""), KeyError::InvalidCharacter { position: 1 });
        assert_eq!(err(b"ab\x7f"), KeyError::InvalidCharacter { position: 2 });
        assert_eq!(
            err("é".as_bytes()),
            KeyError::InvalidCharacter { position: 0 }
        );
        assert_eq!(err(b"a\x00"), KeyError::InvalidCharacter { position: 1 });
        assert_eq!(err(b"a\tb"), KeyError::InvalidCharacter { position: 1 });
    }

    #[test]
    fn malformed_quoted_strings() {
        assert_eq!(err(b"\"abc"), KeyError::MalformedQuotedString);
        assert_eq!(err(b"\"abc\"d"), KeyError::MalformedQuotedString);
        assert_eq!(err(b"\"a\\bc\""), KeyError::MalformedQuotedString);
        assert_eq!(err(b"\"abc\\"), KeyError::MalformedQuotedString);
        assert_eq!(err(b"\""), KeyError::MalformedQuotedString);
    }

    #[test]
    fn a_bare_key_may_contain_quotes_after_the_first_byte() {
        // Only a leading quote selects the structured-field form.
        assert_eq!(ok("ab\"c"), "ab\"c");
    }

    #[test]
    fn header_lines() {
        let name = HeaderName::from_static("idempotency-key");
        let mut headers = HeaderMap::new();
        assert_eq!(IdempotencyKey::from_headers(&headers, &name), Ok(None));
        headers.append(name.clone(), HeaderValue::from_static("one"));
        assert_eq!(
            IdempotencyKey::from_headers(&headers, &name)
                .expect("one line")
                .map(|k| k.to_string()),
            Some("one".to_owned())
        );
        headers.append(name.clone(), HeaderValue::from_static("two"));
        assert_eq!(
            IdempotencyKey::from_headers(&headers, &name),
            Err(KeyError::MultipleHeaders)
        );
    }

    #[test]
    fn opaque_header_bytes_are_refused_not_panicked_on() {
        let value = HeaderValue::from_bytes(b"\xff\xfe").expect("obs-text is a valid header value");
        assert_eq!(
            IdempotencyKey::from_header_value(&value),
            Err(KeyError::InvalidCharacter { position: 0 })
        );
    }
}
