//! Durations on command lines, written the way the config files write them (humantime:
//! `100ms`, `30s`, `1h30m`, `90d`).

use std::time::Duration;

/// clap value parser: a humantime duration.
pub fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|err| format!("expected a duration such as 30s or 100ms ({err})"))
}

/// Like [`duration`], and a bare number is milliseconds: flags that used to be `--*-ms` keep
/// their old spelling as an alias, and old scripts pass plain numbers to it.
pub fn duration_or_millis(s: &str) -> Result<Duration, String> {
    bare_number(s, 1e-3).unwrap_or_else(|| duration(s))
}

/// Like [`duration`], and a bare number is seconds (sglang's `--request-timeout 600`).
pub fn duration_or_secs(s: &str) -> Result<Duration, String> {
    bare_number(s, 1.0).unwrap_or_else(|| duration(s))
}

fn bare_number(s: &str, unit_secs: f64) -> Option<Result<Duration, String>> {
    let n: f64 = s.trim().parse().ok()?;
    Some(
        Duration::try_from_secs_f64(n * unit_secs)
            .map_err(|_| format!("expected a duration such as 30s or 100ms, not {s:?}")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humantime_and_bare_numbers() {
        assert_eq!(duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(duration("1m30s"), Ok(Duration::from_secs(90)));
        assert!(duration("30")
            .unwrap_err()
            .contains("expected a duration such as 30s"));
        assert_eq!(duration_or_millis("90"), Ok(Duration::from_millis(90)));
        assert_eq!(duration_or_millis("2.5"), Ok(Duration::from_micros(2500)));
        assert_eq!(duration_or_millis("1s"), Ok(Duration::from_secs(1)));
        assert!(duration_or_millis("-1").is_err());
        assert!(duration_or_millis("NaN").is_err());
        assert_eq!(duration_or_secs("600"), Ok(Duration::from_secs(600)));
        assert_eq!(duration_or_secs("2m"), Ok(Duration::from_secs(120)));
    }
}
