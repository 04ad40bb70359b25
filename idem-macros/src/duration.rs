//! Durations written as strings: `"30s"`, `"24h"`, `"1h30m"`.

/// The units a duration accepts, largest first, with their length in milliseconds.
const UNITS: [(&str, u64); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

/// The sentence every duration error ends with.
pub(crate) const ACCEPTED: &str = "write a positive integer followed by a unit, `ms`, `s`, `m`, \
     `h` or `d`, such as \"30s\" or \"24h\", or several of them, largest first, such as \"1h30m\"";

/// Why a duration string was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum DurationError {
    /// Not of the form `<integer><unit>...`.
    Malformed,
    /// A unit that is not one of [`UNITS`].
    UnknownUnit(String),
    /// A unit that repeats, or follows a smaller one (`"30m1h"`).
    UnitOrder,
    /// Zero in total.
    Zero,
    /// More milliseconds than a `u64` holds.
    Overflow,
}

impl DurationError {
    /// The compile error for argument `name` written as `written`.
    pub(crate) fn message(&self, name: &str, written: &str) -> String {
        let problem = match self {
            Self::Malformed => format!("\"{written}\" is not a duration"),
            Self::UnknownUnit(unit) => format!("unknown unit `{unit}` in \"{written}\""),
            Self::UnitOrder => {
                format!("the units in \"{written}\" must each appear once, largest first")
            }
            Self::Zero => "the duration must be longer than zero".to_owned(),
            Self::Overflow => format!("\"{written}\" is too long"),
        };
        format!("`{name}`: {problem}; {ACCEPTED}")
    }
}

/// Parses `"24h"`, `"1h30m"`, `"250ms"` into milliseconds.
pub(crate) fn parse_millis(text: &str) -> Result<u64, DurationError> {
    let mut rest = text;
    let mut total: u64 = 0;
    // Index into UNITS of the previous unit: each unit must be strictly smaller than the last.
    let mut previous: Option<usize> = None;
    if rest.is_empty() {
        return Err(DurationError::Malformed);
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(DurationError::Malformed);
        }
        let (number, tail) = rest.split_at(digits);
        let letters = tail.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, tail) = tail.split_at(letters);
        if unit.is_empty() {
            return Err(DurationError::Malformed);
        }
        let Some(index) = UNITS.iter().position(|(name, _)| *name == unit) else {
            return Err(DurationError::UnknownUnit(unit.to_owned()));
        };
        if previous.is_some_and(|p| p >= index) {
            return Err(DurationError::UnitOrder);
        }
        previous = Some(index);
        let number: u64 = number.parse().map_err(|_| DurationError::Overflow)?;
        total = number
            .checked_mul(UNITS[index].1)
            .and_then(|ms| total.checked_add(ms))
            .ok_or(DurationError::Overflow)?;
        rest = tail;
    }
    if total == 0 {
        return Err(DurationError::Zero);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_units() {
        assert_eq!(parse_millis("250ms"), Ok(250));
        assert_eq!(parse_millis("30s"), Ok(30_000));
        assert_eq!(parse_millis("5m"), Ok(300_000));
        assert_eq!(parse_millis("24h"), Ok(86_400_000));
        assert_eq!(parse_millis("7d"), Ok(604_800_000));
    }

    #[test]
    fn compound() {
        assert_eq!(parse_millis("1h30m"), Ok(5_400_000));
        assert_eq!(parse_millis("1d2h3m4s5ms"), Ok(93_784_005));
        assert_eq!(parse_millis("1s500ms"), Ok(1_500));
    }

    #[test]
    fn malformed() {
        for text in [
            "", "h", "24", "24 h", " 24h", "24h ", "1.5h", "-1s", "+1s", "1h-", "s1",
        ] {
            assert_eq!(
                parse_millis(text),
                Err(DurationError::Malformed),
                "{text:?}"
            );
        }
    }

    #[test]
    fn unknown_units() {
        assert_eq!(
            parse_millis("24hours"),
            Err(DurationError::UnknownUnit("hours".into()))
        );
        assert_eq!(
            parse_millis("3w"),
            Err(DurationError::UnknownUnit("w".into()))
        );
        assert_eq!(
            parse_millis("1H"),
            Err(DurationError::UnknownUnit("H".into()))
        );
    }

    #[test]
    fn unit_order() {
        assert_eq!(parse_millis("30m1h"), Err(DurationError::UnitOrder));
        assert_eq!(parse_millis("1m1m"), Err(DurationError::UnitOrder));
        assert_eq!(parse_millis("500ms1s"), Err(DurationError::UnitOrder));
    }

    #[test]
    fn zero() {
        assert_eq!(parse_millis("0s"), Err(DurationError::Zero));
        assert_eq!(parse_millis("0h0m"), Err(DurationError::Zero));
        assert_eq!(parse_millis("0h1m"), Ok(60_000));
    }

    #[test]
    fn overflow() {
        assert_eq!(
            parse_millis("99999999999999999999ms"),
            Err(DurationError::Overflow)
        );
        assert_eq!(
            parse_millis("18446744073709551615d"),
            Err(DurationError::Overflow)
        );
        assert_eq!(parse_millis("18446744073709551615ms"), Ok(u64::MAX));
        assert_eq!(
            parse_millis("18446744073709551615ms1ms"),
            Err(DurationError::UnitOrder)
        );
    }
}
