//! Istio's AUTO_PASSTHROUGH server names: `outbound_.<port>_.<subset>_.<fqdn>`.
//!
//! Sidecars set this SNI when they send mTLS to a service in another network; the subset is
//! empty (`outbound_.8000_._.sglang.demo.svc.cluster.local`) when no DestinationRule subset
//! applies.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IstioSni<'a> {
    pub port: u16,
    /// Empty for "any endpoint of the service".
    pub subset: &'a str,
    pub hostname: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IstioSniError {
    #[error("not an Istio outbound SNI (expected outbound_.<port>_.<subset>_.<fqdn>)")]
    NotOutbound,
    #[error("bad port in Istio SNI")]
    BadPort,
    #[error("empty service hostname in Istio SNI")]
    EmptyHostname,
}

pub fn parse(sni: &str) -> Result<IstioSni<'_>, IstioSniError> {
    let rest = strip_prefix_ignore_case(sni, "outbound_.").ok_or(IstioSniError::NotOutbound)?;
    let (port, rest) = rest.split_once("_.").ok_or(IstioSniError::NotOutbound)?;
    let (subset, hostname) = rest.split_once("_.").ok_or(IstioSniError::NotOutbound)?;
    // Istio writes the port in canonical decimal: u16 parsing would also take a leading '+'
    // or leading zeros (`08000`), names no sidecar sends and that would not round-trip.
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || port.starts_with('0') {
        return Err(IstioSniError::BadPort);
    }
    let port: u16 = port.parse().map_err(|_| IstioSniError::BadPort)?;
    if port == 0 {
        return Err(IstioSniError::BadPort);
    }
    if hostname.is_empty() {
        return Err(IstioSniError::EmptyHostname);
    }
    Ok(IstioSni {
        port,
        subset,
        hostname,
    })
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_names() {
        let s = parse("outbound_.8000_._.sglang.demo.svc.cluster.local").unwrap();
        assert_eq!(
            (s.port, s.subset, s.hostname),
            (8000, "", "sglang.demo.svc.cluster.local")
        );
        let s = parse("outbound_.5000_.v2_.helloworld.sample.svc.cluster.local").unwrap();
        assert_eq!(
            (s.port, s.subset, s.hostname),
            (5000, "v2", "helloworld.sample.svc.cluster.local")
        );
    }

    #[test]
    fn rejects_others() {
        assert_eq!(parse("example.com"), Err(IstioSniError::NotOutbound));
        assert_eq!(parse("inbound_.80_._.a.b"), Err(IstioSniError::NotOutbound));
        assert_eq!(parse("outbound_.80_.a.b"), Err(IstioSniError::NotOutbound));
        assert_eq!(parse("outbound_.x_._.a.b"), Err(IstioSniError::BadPort));
        assert_eq!(parse("outbound_.+80_._.a.b"), Err(IstioSniError::BadPort));
        assert_eq!(parse("outbound_.70000_._.a.b"), Err(IstioSniError::BadPort));
        assert_eq!(parse("outbound_.0_._.a.b"), Err(IstioSniError::BadPort));
        assert_eq!(parse("outbound_.08000_._.a.b"), Err(IstioSniError::BadPort));
        assert_eq!(parse("outbound_.00_._.a.b"), Err(IstioSniError::BadPort));
        // Found by the istio_sni fuzz target: it did not round-trip.
        assert_eq!(parse("outbound_.018858_._.x"), Err(IstioSniError::BadPort));
        assert_eq!(parse("outbound_.80_._."), Err(IstioSniError::EmptyHostname));
    }
}
