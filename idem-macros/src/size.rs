//! Byte sizes written as strings: `"64KiB"`, `"1MB"`, `"512B"`.

/// The units a size accepts, with their length in bytes.
const UNITS: [(&str, u64); 5] = [
    ("B", 1),
    ("KB", 1_000),
    ("KiB", 1_024),
    ("MB", 1_000_000),
    ("MiB", 1_048_576),
];

/// The sentence every size error ends with.
pub(crate) const ACCEPTED: &str = "write a positive number of bytes, such as `max_body = 65536`, \
     or a string with a unit, `B`, `KB`, `KiB`, `MB` or `MiB`, such as `max_body = \"64KiB\"`";

/// Why a size was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SizeError {
    /// Not of the form `<integer><unit>`.
    Malformed,
    /// A unit that is not one of [`UNITS`].
    UnknownUnit(String),
    /// Zero bytes.
    Zero,
    /// More bytes than a `u64` holds.
    Overflow,
}

impl SizeError {
    /// The compile error for `max_body` written as `written`.
    pub(crate) fn message(&self, written: &str) -> String {
        let problem = match self {
            Self::Malformed => format!("\"{written}\" is not a size"),
            Self::UnknownUnit(unit) => format!("unknown unit `{unit}` in \"{written}\""),
            Self::Zero => "the limit must be larger than zero".to_owned(),
            Self::Overflow => format!("{written} is too large"),
        };
        format!("`max_body`: {problem}; {ACCEPTED}")
    }
}

/// Parses `"64KiB"` into bytes. The unit is required: a bare number belongs in an integer
/// literal, not a string.
pub(crate) fn parse_bytes(text: &str) -> Result<u64, SizeError> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    if digits == 0 || unit.is_empty() {
        return Err(SizeError::Malformed);
    }
    if !unit.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(SizeError::Malformed);
    }
    let Some((_, len)) = UNITS.iter().find(|(name, _)| *name == unit) else {
        return Err(SizeError::UnknownUnit(unit.to_owned()));
    };
    let bytes = number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(*len))
        .ok_or(SizeError::Overflow)?;
    nonzero(bytes)
}

/// Refuses zero.
pub(crate) fn nonzero(bytes: u64) -> Result<u64, SizeError> {
    if bytes == 0 {
        Err(SizeError::Zero)
    } else {
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_bytes("512B"), Ok(512));
        assert_eq!(parse_bytes("64KB"), Ok(64_000));
        assert_eq!(parse_bytes("64KiB"), Ok(65_536));
        assert_eq!(parse_bytes("2MB"), Ok(2_000_000));
        assert_eq!(parse_bytes("2MiB"), Ok(2_097_152));
    }

    #[test]
    fn malformed() {
        for text in [
            "", "KiB", "64", "64 KiB", "1.5MiB", "-1B", "64KiB ", "1KiB1B",
        ] {
            assert_eq!(parse_bytes(text), Err(SizeError::Malformed), "{text:?}");
        }
    }

    #[test]
    fn unknown_units() {
        assert_eq!(
            parse_bytes("64kb"),
            Err(SizeError::UnknownUnit("kb".into()))
        );
        assert_eq!(
            parse_bytes("1GiB"),
            Err(SizeError::UnknownUnit("GiB".into()))
        );
        assert_eq!(
            parse_bytes("1bytes"),
            Err(SizeError::UnknownUnit("bytes".into()))
        );
    }

    #[test]
    fn zero_and_overflow() {
        assert_eq!(parse_bytes("0KiB"), Err(SizeError::Zero));
        assert_eq!(nonzero(0), Err(SizeError::Zero));
        assert_eq!(
            parse_bytes("18446744073709551615MiB"),
            Err(SizeError::Overflow)
        );
        assert_eq!(
            parse_bytes("99999999999999999999B"),
            Err(SizeError::Overflow)
        );
    }
}
