//! The `:authority` of an HBONE CONNECT through the gateway: `<service hostname>:<port>`, as
//! ztunnel sends it for double HBONE (`build_request_through_gateway`). Anything else —
//! IP literals, missing or zero ports, bytes no DNS name has — is refused before any lookup,
//! so the gateway is never an open relay.

use std::net::IpAddr;

/// A parsed CONNECT authority: a service hostname and a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authority<'a> {
    pub hostname: &'a str,
    pub port: u16,
}

/// Why an authority is refused (answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    #[error("no port (expected <service hostname>:<port>)")]
    NoPort,
    #[error("bad port {0:?}")]
    BadPort(String),
    #[error("an IP address is not a service (only hostnames in the route table route)")]
    IpAddress,
    #[error("bad hostname: {0}")]
    BadHostname(&'static str),
}

/// The longest DNS name (RFC 1035), without a trailing dot.
const MAX_HOSTNAME: usize = 253;
const MAX_LABEL: usize = 63;

/// Parses `host:port`. The hostname keeps its case (the route table lookup folds it).
pub fn parse(authority: &str) -> Result<Authority<'_>, AuthorityError> {
    let (hostname, port) = authority.rsplit_once(':').ok_or(AuthorityError::NoPort)?;
    if hostname.starts_with('[') || hostname.contains(':') {
        return Err(AuthorityError::IpAddress);
    }
    // Digits only (u16's parser also takes a leading '+'), and no leading zero: one spelling
    // per port, so what is logged is what was routed (found by the fuzz target).
    if port.is_empty()
        || port.len() > 5
        || port.starts_with('0')
        || !port.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(AuthorityError::BadPort(port.to_string()));
    }
    let port: u16 = match port.parse() {
        Ok(0) | Err(_) => return Err(AuthorityError::BadPort(port.to_string())),
        Ok(p) => p,
    };
    if hostname.parse::<IpAddr>().is_ok() {
        return Err(AuthorityError::IpAddress);
    }
    check_hostname(hostname)?;
    Ok(Authority { hostname, port })
}

fn check_hostname(hostname: &str) -> Result<(), AuthorityError> {
    if hostname.is_empty() {
        return Err(AuthorityError::BadHostname("empty"));
    }
    if hostname.len() > MAX_HOSTNAME {
        return Err(AuthorityError::BadHostname("longer than 253 bytes"));
    }
    for label in hostname.split('.') {
        if label.is_empty() {
            return Err(AuthorityError::BadHostname("empty label"));
        }
        if label.len() > MAX_LABEL {
            return Err(AuthorityError::BadHostname("label longer than 63 bytes"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(AuthorityError::BadHostname(
                "only letters, digits, '-' and '_'",
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(AuthorityError::BadHostname("label starts or ends with '-'"));
        }
    }
    // All-numeric dotted names (`10.1`, `127.1`) are IPv4 to many resolvers.
    if hostname.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(AuthorityError::IpAddress);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{parse, Authority, AuthorityError};

    #[test]
    fn service_hostnames_with_ports_parse() {
        assert_eq!(
            parse("reviews.bookinfo.svc.cluster.local:9080"),
            Ok(Authority {
                hostname: "reviews.bookinfo.svc.cluster.local",
                port: 9080
            })
        );
        assert_eq!(parse("A-b_c:65535").map(|a| a.port), Ok(65535));
    }

    #[test]
    fn ip_literals_and_malformed_authorities_are_refused() {
        let ip = Err(AuthorityError::IpAddress);
        for a in [
            "10.0.0.1:8080",
            "[::1]:8080",
            "::1:80",
            "127.1:80",
            "0x7f.1:80x",
        ] {
            assert!(parse(a).is_err(), "{a}");
        }
        assert_eq!(parse("10.0.0.1:8080"), ip);
        assert_eq!(parse("[fe80::1]:15008"), ip);
        assert_eq!(parse("svc"), Err(AuthorityError::NoPort));
        for bad in [
            "svc:",
            "svc:0",
            "svc:65536",
            "svc:+80",
            "svc:80a",
            "svc:123456",
        ] {
            assert!(
                matches!(parse(bad), Err(AuthorityError::BadPort(_))),
                "{bad}"
            );
        }
        for bad in [
            ":80", "a..b:80", ".a:80", "a.:80", "-a:80", "a b:80", "a/b:80", "a@b:80", "é:80",
        ] {
            assert!(
                matches!(parse(bad), Err(AuthorityError::BadHostname(_))),
                "{bad}"
            );
        }
        let long = format!("{}:80", "a.".repeat(127) + "a");
        assert!(parse(&long).is_err());
        let label = format!("{}.svc:80", "a".repeat(64));
        assert!(parse(&label).is_err());
    }
}
