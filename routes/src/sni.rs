//! SNI match patterns: exact names, `*.suffix` wildcards and the catch-all `*`.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How a listener rule matches a ClientHello's server name (case-insensitive, as DNS is).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SniPattern {
    /// `*`: every name, and hellos without SNI too.
    Any,
    /// `*.example.com`: one or more labels in front of `.example.com` (stored lowercase, with the dot).
    Suffix(String),
    /// `api.example.com` (stored lowercase).
    Exact(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniPatternError {
    #[error("empty SNI pattern")]
    Empty,
    #[error("'*' may only stand alone or as the whole first label ('*.example.com'): {0:?}")]
    MisplacedWildcard(String),
    #[error("not a valid DNS name: {0:?}")]
    BadName(String),
}

impl SniPattern {
    pub fn parse(s: &str) -> Result<SniPattern, SniPatternError> {
        if s.is_empty() {
            return Err(SniPatternError::Empty);
        }
        if s == "*" {
            return Ok(SniPattern::Any);
        }
        let (wild, name) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        if name.contains('*') {
            return Err(SniPatternError::MisplacedWildcard(s.to_string()));
        }
        if !is_dns_name(name) {
            return Err(SniPatternError::BadName(s.to_string()));
        }
        let name = name.to_ascii_lowercase();
        Ok(if wild {
            SniPattern::Suffix(format!(".{name}"))
        } else {
            SniPattern::Exact(name)
        })
    }

    /// Does this pattern match `sni` (`None` when the hello carried no server name)?
    pub fn matches(&self, sni: Option<&str>) -> bool {
        match (self, sni) {
            (SniPattern::Any, _) => true,
            (_, None) => false,
            (SniPattern::Exact(name), Some(sni)) => name.eq_ignore_ascii_case(sni),
            (SniPattern::Suffix(suffix), Some(sni)) => {
                sni.len() > suffix.len()
                    && sni.as_bytes()[sni.len() - suffix.len()..]
                        .eq_ignore_ascii_case(suffix.as_bytes())
            }
        }
    }

    /// Specificity for picking the best of several matching rules: exact beats the longest
    /// suffix, which beats `*`.
    pub fn specificity(&self) -> usize {
        match self {
            SniPattern::Any => 0,
            SniPattern::Suffix(s) => 1 + s.len(),
            SniPattern::Exact(_) => usize::MAX,
        }
    }
}

/// RFC 1123 host name: labels of letters, digits and '-', 1..=63 bytes each, 253 in all.
/// Underscores are allowed too because Istio's own SNI names (`outbound_.80_._.svc`) use them.
pub(crate) fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl fmt::Display for SniPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SniPattern::Any => f.write_str("*"),
            SniPattern::Suffix(s) => write!(f, "*{s}"),
            SniPattern::Exact(s) => f.write_str(s),
        }
    }
}

impl Serialize for SniPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SniPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SniPattern::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_wildcard_and_any() {
        let exact = SniPattern::parse("API.example.com").unwrap();
        assert!(exact.matches(Some("api.EXAMPLE.com")));
        assert!(!exact.matches(Some("x.api.example.com")));
        assert!(!exact.matches(None));

        let wild = SniPattern::parse("*.example.com").unwrap();
        assert!(wild.matches(Some("a.example.com")));
        assert!(wild.matches(Some("a.b.Example.com")));
        assert!(!wild.matches(Some("example.com")));
        assert!(!wild.matches(Some("aexample.com")));

        let any = SniPattern::parse("*").unwrap();
        assert!(any.matches(None) && any.matches(Some("x")));
        assert!(exact.specificity() > wild.specificity() && wild.specificity() > any.specificity());
    }

    #[test]
    fn rejects_bad_patterns() {
        for bad in ["", "a.*.com", "**.a", "*a.com", "a..b", "a b.com", "*."] {
            assert!(SniPattern::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
