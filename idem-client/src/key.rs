//! The key: made, written into its header, and read back from a header the caller set.

use std::sync::Arc;

use http::HeaderValue;

/// How the key is written into its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyFormat {
    /// `Idempotency-Key: 5f0c…` (Stripe's form, which most servers accept).
    #[default]
    Bare,
    /// `Idempotency-Key: "5f0c…"`, the IETF draft's structured-field string.
    Quoted,
}

/// Makes a fresh key for a request.
pub(crate) type Generator = Arc<dyn Fn() -> String + Send + Sync>;

/// The default generator: a random (v4) UUID, hyphenated.
pub(crate) fn uuid_v4() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The header value for `key`, or `None` if the key is not 1 to 255 visible ASCII characters (what
/// idem and most servers accept).
pub(crate) fn header_value(key: &str, format: KeyFormat) -> Option<HeaderValue> {
    let valid = (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic());
    if !valid {
        return None;
    }
    let value = match format {
        KeyFormat::Bare => HeaderValue::from_str(key),
        KeyFormat::Quoted => {
            let mut quoted = String::with_capacity(key.len() + 2);
            quoted.push('"');
            for c in key.chars() {
                if c == '"' || c == '\\' {
                    quoted.push('\\');
                }
                quoted.push(c);
            }
            quoted.push('"');
            HeaderValue::from_str(&quoted)
        }
    };
    value.ok()
}

/// The key in a header value the caller set, in either form: a well-formed quoted string is
/// unquoted, anything else is taken as it is (the server judges it).
pub(crate) fn read(value: &HeaderValue) -> String {
    let raw = String::from_utf8_lossy(value.as_bytes());
    let raw = raw.trim();
    if let Some(inner) = raw
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .filter(|_| raw.len() >= 2)
    {
        let mut key = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(escaped @ ('"' | '\\')) => key.push(escaped),
                    _ => return raw.to_owned(),
                },
                '"' => return raw.to_owned(),
                c => key.push(c),
            }
        }
        return key;
    }
    raw.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_valid_distinct_keys() {
        let a = uuid_v4();
        let b = uuid_v4();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert!(header_value(&a, KeyFormat::Bare).is_some());
    }

    #[test]
    fn both_forms() {
        let bare = header_value("abc", KeyFormat::Bare).expect("valid");
        assert_eq!(bare, "abc");
        let quoted = header_value("abc", KeyFormat::Quoted).expect("valid");
        assert_eq!(quoted, "\"abc\"");
        let escaped = header_value(r#"a"b\c"#, KeyFormat::Quoted).expect("valid");
        assert_eq!(escaped, r#""a\"b\\c""#);
        for v in [bare, quoted, escaped.clone()] {
            assert!(!read(&v).starts_with('"'));
        }
        assert_eq!(read(&escaped), r#"a"b\c"#);
    }

    #[test]
    fn invalid_keys_are_refused() {
        let long = "k".repeat(256);
        for key in ["", "a b", "é", "tab\t", long.as_str()] {
            assert!(header_value(key, KeyFormat::Bare).is_none(), "{key:?}");
            assert!(header_value(key, KeyFormat::Quoted).is_none(), "{key:?}");
        }
        assert!(header_value(&"k".repeat(255), KeyFormat::Bare).is_some());
    }

    #[test]
    fn reading_what_the_caller_set() {
        let read_str = |s: &str| read(&HeaderValue::from_str(s).expect("a header value"));
        assert_eq!(read_str("abc"), "abc");
        assert_eq!(read_str("\"abc\""), "abc");
        assert_eq!(read_str("\""), "\"");
        assert_eq!(read_str("\"a\"b\""), "\"a\"b\"");
        assert_eq!(read_str("\"a\\xb\""), "\"a\\xb\"");
    }
}
