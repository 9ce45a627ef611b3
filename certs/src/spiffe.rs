//! SPIFFE IDs: parsing per the SPIFFE ID spec and extraction from X.509 URI SANs.

use std::fmt;
use std::str::FromStr;

use x509_parser::extensions::GeneralName;

use crate::CertError;

/// A SPIFFE ID, `spiffe://<trust_domain>/<path>`.
///
/// `path` is everything after `spiffe://<trust_domain>/`, without the leading slash
/// (e.g. `ns/default/sa/app`); it is empty for a trust-domain-only ID.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub path: String,
}

impl SpiffeId {
    /// Istio's workload identity: `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn workload(td: &str, ns: &str, sa: &str) -> SpiffeId {
        SpiffeId {
            trust_domain: td.to_string(),
            path: format!("ns/{ns}/sa/{sa}"),
        }
    }

    /// The namespace of an Istio-style `ns/<ns>/sa/<sa>` path.
    pub fn namespace(&self) -> Option<&str> {
        self.istio_parts().map(|(ns, _)| ns)
    }

    /// The service account of an Istio-style `ns/<ns>/sa/<sa>` path.
    pub fn service_account(&self) -> Option<&str> {
        self.istio_parts().map(|(_, sa)| sa)
    }

    fn istio_parts(&self) -> Option<(&str, &str)> {
        let mut it = self.path.split('/');
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.trim_start_matches('/');
        if path.is_empty() {
            write!(f, "spiffe://{}", self.trust_domain)
        } else {
            write!(f, "spiffe://{}/{}", self.trust_domain, path)
        }
    }
}

impl FromStr for SpiffeId {
    type Err = CertError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| CertError::InvalidSpiffeId {
            id: s.to_string(),
            reason: why.to_string(),
        };
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("must start with spiffe://"))?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        if td.is_empty() {
            return Err(bad("trust domain is empty"));
        }
        if let Some(c) = td.chars().find(|c| {
            !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
        }) {
            return Err(bad(&format!(
                "trust domain may only contain a-z 0-9 . - _ (found {c:?})"
            )));
        }
        if rest.len() > td.len() {
            // There was a slash after the trust domain: the path must be well formed.
            if path.is_empty() || path.ends_with('/') {
                return Err(bad("path must not end with /"));
            }
            for seg in path.split('/') {
                if seg.is_empty() {
                    return Err(bad("path has an empty segment (//)"));
                }
                if seg == "." || seg == ".." {
                    return Err(bad("path segments . and .. are not allowed"));
                }
                if let Some(c) = seg
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
                {
                    return Err(bad(&format!(
                        "path may only contain a-z A-Z 0-9 . - _ and / (found {c:?})"
                    )));
                }
            }
        }
        Ok(SpiffeId {
            trust_domain: td.to_string(),
            path: path.to_string(),
        })
    }
}

/// The SPIFFE ID in a certificate's URI SAN, if any.
///
/// Errors if the certificate can't be parsed, or carries more than one `spiffe://`
/// URI (the X.509-SVID spec allows exactly one) or a malformed one.
pub fn spiffe_id_of(cert_der: &[u8]) -> Result<Option<SpiffeId>, CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| CertError::Parse(format!("certificate is not valid DER X.509: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertError::Parse(format!("bad subjectAltName extension: {e}")))?;
    let Some(san) = san else { return Ok(None) };
    let mut found: Option<SpiffeId> = None;
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name {
            if uri.len() >= 9 && uri[..9].eq_ignore_ascii_case("spiffe://") {
                if let Some(prev) = &found {
                    return Err(CertError::Parse(format!(
                        "certificate has more than one SPIFFE ID ({prev} and {uri})"
                    )));
                }
                found = Some(uri.parse()?);
            }
        }
    }
    Ok(found)
}

/// When a certificate stops being valid.
pub fn not_after(cert_der: &[u8]) -> Result<std::time::SystemTime, CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| CertError::Parse(format!("certificate is not valid DER X.509: {e}")))?;
    let secs = cert.validity().not_after.timestamp();
    // Certificates from before 1970 are not a case worth a clock type of their own.
    let secs = u64::try_from(secs).unwrap_or(0);
    Ok(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/app".parse().unwrap();
        assert_eq!(id.trust_domain, "cluster.local");
        assert_eq!(id.path, "ns/default/sa/app");
        assert_eq!(id.namespace(), Some("default"));
        assert_eq!(id.service_account(), Some("app"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/app");
        assert_eq!(id, SpiffeId::workload("cluster.local", "default", "app"));
        let td_only: SpiffeId = "spiffe://example.org".parse().unwrap();
        assert_eq!(td_only.path, "");
        assert_eq!(td_only.to_string(), "spiffe://example.org");
    }

    #[test]
    fn rejects_invalid_ids() {
        for (bad, why) in [
            ("http://cluster.local/ns/a", "spiffe://"),
            ("spiffe://", "trust domain is empty"),
            ("spiffe:///ns/a", "trust domain is empty"),
            ("spiffe://Cluster.local/ns/a", "trust domain may only"),
            ("spiffe://td:8080/ns/a", "trust domain may only"),
            ("spiffe://user@td/ns/a", "trust domain may only"),
            ("spiffe://td/", "must not end with /"),
            ("spiffe://td/ns//a", "empty segment"),
            ("spiffe://td/ns/../a", ". and .."),
            ("spiffe://td/ns/a?x=1", "path may only"),
            ("spiffe://td/ns/a#frag", "path may only"),
        ] {
            let err = bad.parse::<SpiffeId>().unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
            assert!(err.contains(bad), "error should name the input: {err}");
        }
    }
}
