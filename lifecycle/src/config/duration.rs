//! `google.protobuf.Duration` in its JSON mapping: seconds with an `s` suffix (`"1s"`, `"0.5s"`,
//! `"1.000340012s"`).

use std::time::Duration;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

/// A protobuf duration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ProtoDuration(pub(super) Duration);

impl<'de> Deserialize<'de> for ProtoDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse(&text).map(ProtoDuration).ok_or_else(|| {
            D::Error::custom(format!(
                "{text:?} is not a duration (seconds with an s suffix, e.g. \"1s\" or \"0.5s\"; \
                 at most 10,000 years)"
            ))
        })
    }
}

/// Parses a duration as `google.protobuf.Duration`'s JSON mapping writes it,
/// `<seconds>[.<fraction>]s` (`"1s"`, `"0.5s"`): non-negative, at most nanosecond precision.
pub fn parse(text: &str) -> Option<Duration> {
    let number = text.strip_suffix('s')?;
    let (whole, fraction) = match number.split_once('.') {
        Some((_, "")) => return None,
        Some(parts) => parts,
        None => (number, ""),
    };
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if fraction.len() > 9 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seconds: u64 = whole.parse().ok()?;
    if seconds > MAX_SECONDS {
        return None;
    }
    let nanos: u32 = format!("{fraction:0<9}").parse().ok()?;
    Some(Duration::new(seconds, nanos))
}

/// The longest `google.protobuf.Duration` (10,000 years): more would overflow the clock when a
/// timer is set.
const MAX_SECONDS: u64 = 315_576_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_with_a_fraction() {
        assert_eq!(parse("1s"), Some(Duration::from_secs(1)));
        assert_eq!(
            parse("315576000000s"),
            Some(Duration::from_secs(315_576_000_000))
        );
        assert_eq!(parse("0.5s"), Some(Duration::from_millis(500)));
        assert_eq!(parse("1.000000001s"), Some(Duration::new(1, 1)));
        for bad in [
            "1",
            "s",
            "-1s",
            "1.s2",
            "1.0000000001s",
            "1ms",
            " 1s",
            "1.s",
            // Past google.protobuf.Duration's range (10,000 years), and far past it.
            "315576000001s",
            "18446744073709551615s",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
