//! Millisecond command-line values, shared by the subcommands that take them.

use std::time::Duration;

/// clap value parser for a `--*-ms` flag: a finite, non-negative number of milliseconds.
pub(crate) fn parse_ms(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s:?}: milliseconds must be a finite number >= 0"));
    }
    Ok(v)
}

/// A value [`parse_ms`] accepted, as a duration.
pub(crate) fn ms(v: f64) -> Duration {
    Duration::from_secs_f64(v / 1000.0)
}
