//! Reading certificates with x509-parser: what `eastwest-certs inspect` prints, and a
//! chain check against a root.

use std::fmt::Write as _;
use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::Serialize;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::{OID_EC_P256, OID_NIST_EC_P384};
use x509_parser::public_key::PublicKey;

use crate::CertError;

/// One certificate, as shown by `inspect`.
#[derive(Debug, Clone, Serialize)]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub sans: Vec<String>,
    pub spiffe_ids: Vec<String>,
    pub not_before: String,
    pub not_after: String,
    /// Seconds until `not_after`; negative once expired.
    pub seconds_left: i64,
    pub expired: bool,
    pub not_yet_valid: bool,
    pub key_type: String,
    pub is_ca: bool,
    pub path_len: Option<u32>,
    pub key_usage: Vec<String>,
    pub ext_key_usage: Vec<String>,
    pub self_signed: bool,
}

/// Everything found in one input file.
#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    pub file: String,
    pub certs: Vec<CertInfo>,
    /// Unreadable input; when set, `certs` is empty.
    pub error: Option<String>,
    /// With a root: `Ok` or why the chain does not verify.
    pub chain: Option<ChainResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChainResult {
    pub ok: bool,
    pub root: String,
    pub reason: Option<String>,
}

impl FileReport {
    /// Broken input, a broken chain or an expired / not-yet-valid certificate.
    pub fn failed(&self) -> bool {
        self.error.is_some()
            || self.chain.as_ref().is_some_and(|c| !c.ok)
            || self.certs.iter().any(|c| c.expired || c.not_yet_valid)
    }
}

/// Certificates from a PEM file (any number of CERTIFICATE blocks) or a single DER cert.
pub fn read_cert_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let data = std::fs::read(path).map_err(|e| CertError::io(path, e))?;
    if !data.windows(11).any(|w| w == b"-----BEGIN ") {
        // No PEM armour: accept one DER certificate, otherwise say what's wrong.
        return match x509_parser::parse_x509_certificate(&data) {
            Ok(_) => Ok(vec![CertificateDer::from(data)]),
            Err(_) => Err(CertError::file(
                path,
                "neither PEM (no -----BEGIN CERTIFICATE----- block) nor a DER certificate",
            )),
        };
    }
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::file(path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(CertError::file(path, "no PEM CERTIFICATE block found"));
    }
    for (i, c) in certs.iter().enumerate() {
        x509_parser::parse_x509_certificate(c).map_err(|e| {
            CertError::file(path, format!("certificate #{i} is not valid X.509: {e}"))
        })?;
    }
    Ok(certs)
}

/// Inspects `path`; with `root` (and its file name for messages) also checks the chain.
pub fn inspect_file(path: &Path, root: Option<(&CertificateDer<'_>, &Path)>) -> FileReport {
    let file = path.display().to_string();
    let certs = match read_cert_file(path) {
        Ok(c) => c,
        Err(e) => {
            return FileReport {
                file,
                certs: Vec::new(),
                error: Some(e.to_string()),
                chain: None,
            }
        }
    };
    let now = OffsetDateTime::now_utc();
    let parsed: Vec<X509Certificate<'_>> = certs
        .iter()
        .filter_map(|c| x509_parser::parse_x509_certificate(c).ok().map(|(_, x)| x))
        .collect();
    let infos = parsed.iter().map(|c| describe(c, now)).collect();
    let chain = root.map(|(root_der, root_path)| {
        let reason = check_chain(&certs, &parsed, root_der, now).err();
        ChainResult {
            ok: reason.is_none(),
            root: root_path.display().to_string(),
            reason,
        }
    });
    FileReport {
        file,
        certs: infos,
        error: None,
        chain,
    }
}

/// Describes one parsed certificate at time `now`.
pub fn describe(c: &X509Certificate<'_>, now: OffsetDateTime) -> CertInfo {
    let mut sans = Vec::new();
    let mut spiffe_ids = Vec::new();
    if let Ok(Some(san)) = c.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::URI(u) => {
                    if u.starts_with("spiffe://") {
                        spiffe_ids.push(u.to_string());
                    }
                    sans.push(format!("URI:{u}"));
                }
                GeneralName::DNSName(d) => sans.push(format!("DNS:{d}")),
                GeneralName::IPAddress(ip) => sans.push(format!("IP:{}", ip_string(ip))),
                GeneralName::RFC822Name(e) => sans.push(format!("email:{e}")),
                other => sans.push(format!("{other:?}")),
            }
        }
    }
    let (is_ca, path_len) = match c.basic_constraints() {
        Ok(Some(bc)) => (bc.value.ca, bc.value.path_len_constraint),
        _ => (false, None),
    };
    let key_usage = match c.key_usage() {
        Ok(Some(ku)) => ku
            .value
            .to_string()
            .split(", ")
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        _ => Vec::new(),
    };
    let ext_key_usage = match c.extended_key_usage() {
        Ok(Some(eku)) => {
            let e = eku.value;
            let mut v = Vec::new();
            for (on, name) in [
                (e.server_auth, "serverAuth"),
                (e.client_auth, "clientAuth"),
                (e.code_signing, "codeSigning"),
                (e.email_protection, "emailProtection"),
                (e.time_stamping, "timeStamping"),
                (e.ocsp_signing, "OCSPSigning"),
                (e.any, "anyExtendedKeyUsage"),
            ] {
                if on {
                    v.push(name.to_string());
                }
            }
            v.extend(e.other.iter().map(|o| o.to_id_string()));
            v
        }
        _ => Vec::new(),
    };
    let not_before = c.validity().not_before.to_datetime();
    let not_after = c.validity().not_after.to_datetime();
    CertInfo {
        subject: c.subject().to_string(),
        issuer: c.issuer().to_string(),
        serial: c.raw_serial_as_string(),
        sans,
        spiffe_ids,
        not_before: fmt_time(not_before),
        not_after: fmt_time(not_after),
        seconds_left: (not_after - now).whole_seconds(),
        expired: now > not_after,
        not_yet_valid: now < not_before,
        key_type: key_type(c),
        is_ca,
        path_len,
        key_usage,
        ext_key_usage,
        self_signed: c.subject() == c.issuer() && c.verify_signature(None).is_ok(),
    }
}

/// Verifies `certs[0]` → `certs[1]` → … → `root`: names, signatures, CA flags, path
/// lengths and validity at `now`. Returns why not.
pub fn check_chain(
    certs: &[CertificateDer<'_>],
    parsed: &[X509Certificate<'_>],
    root: &CertificateDer<'_>,
    now: OffsetDateTime,
) -> Result<(), String> {
    let (_, root_x) = x509_parser::parse_x509_certificate(root)
        .map_err(|e| format!("root is not valid X.509: {e}"))?;
    if parsed.is_empty() {
        return Err("no certificates".into());
    }
    // Drop a trailing copy of the root (Istio's cert-chain.pem ends with it).
    let n = if certs.last().map(|c| c.as_ref()) == Some(root.as_ref()) {
        certs.len() - 1
    } else {
        certs.len()
    };
    if n == 0 {
        return check_validity("the root", &root_x, now);
    }
    let name = |i: usize| format!("certificate #{i} ({})", parsed[i].subject());
    for (i, c) in parsed.iter().enumerate().take(n) {
        check_validity(&name(i), c, now)?;
    }
    check_validity(&format!("root ({})", root_x.subject()), &root_x, now)?;
    for i in 0..n {
        let (issuer, issuer_name) = if i + 1 < n {
            (&parsed[i + 1], name(i + 1))
        } else {
            (&root_x, format!("the root ({})", root_x.subject()))
        };
        let c = &parsed[i];
        if c.issuer() != issuer.subject() {
            return Err(format!(
                "unknown issuer: {} is issued by {}, but the next certificate is {issuer_name}",
                name(i),
                c.issuer()
            ));
        }
        if c.verify_signature(Some(issuer.public_key())).is_err() {
            return Err(format!(
                "{}: signature does not verify with the key of {issuer_name} (same name, different CA: unknown issuer)",
                name(i)
            ));
        }
        match issuer.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {
                // Intermediates between `issuer` and the end of the chain.
                let below = i as u32;
                if let Some(max) = bc.value.path_len_constraint {
                    if below > max {
                        return Err(format!(
                            "{issuer_name} has pathlen:{max} but {below} CA certificate(s) below it"
                        ));
                    }
                }
            }
            _ => {
                return Err(format!(
                    "{issuer_name} is not a CA (basicConstraints CA:TRUE missing)"
                ))
            }
        }
    }
    Ok(())
}

fn check_validity(name: &str, c: &X509Certificate<'_>, now: OffsetDateTime) -> Result<(), String> {
    let nb = c.validity().not_before.to_datetime();
    let na = c.validity().not_after.to_datetime();
    if now > na {
        return Err(format!(
            "{name} expired at {} ({} ago)",
            fmt_time(na),
            fmt_span((now - na).whole_seconds())
        ));
    }
    if now < nb {
        return Err(format!("{name} is not valid before {}", fmt_time(nb)));
    }
    Ok(())
}

fn key_type(c: &X509Certificate<'_>) -> String {
    let spki = c.public_key();
    match spki.parsed() {
        Ok(PublicKey::RSA(r)) => format!("RSA {}", r.key_size()),
        Ok(PublicKey::EC(_)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            match curve {
                Some(o) if o == OID_EC_P256 => "ECDSA P-256".into(),
                Some(o) if o == OID_NIST_EC_P384 => "ECDSA P-384".into(),
                Some(o) => format!("EC {}", o.to_id_string()),
                None => "EC".into(),
            }
        }
        _ => spki.algorithm.algorithm.to_id_string(),
    }
}

fn ip_string(b: &[u8]) -> String {
    match b.len() {
        4 => std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string(),
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            std::net::Ipv6Addr::from(a).to_string()
        }
        _ => format!("{b:02x?}"),
    }
}

/// `2026-11-25T07:31:00Z`.
pub fn fmt_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// `3d 4h`, `5h 2m`, `40s` (absolute value).
pub fn fmt_span(secs: i64) -> String {
    let s = secs.unsigned_abs();
    let (d, h, m) = (s / 86400, (s % 86400) / 3600, (s % 3600) / 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {}s", s % 60)
    } else {
        format!("{s}s")
    }
}

/// Human-readable report.
pub fn render_human(reports: &[FileReport]) -> String {
    let mut o = String::new();
    for r in reports {
        let _ = writeln!(o, "{}", r.file);
        if let Some(e) = &r.error {
            let _ = writeln!(o, "  ERROR: {e}");
            continue;
        }
        for (i, c) in r.certs.iter().enumerate() {
            let _ = writeln!(o, "  [{i}] subject:   {}", or_empty(&c.subject));
            let _ = writeln!(o, "      issuer:    {}", or_empty(&c.issuer));
            let _ = writeln!(o, "      serial:    {}", c.serial);
            for id in &c.spiffe_ids {
                let _ = writeln!(o, "      SPIFFE ID: {id}");
            }
            if !c.sans.is_empty() {
                let _ = writeln!(o, "      SANs:      {}", c.sans.join(", "));
            }
            let left = if c.expired {
                format!("EXPIRED {} ago", fmt_span(c.seconds_left))
            } else if c.not_yet_valid {
                "NOT YET VALID".to_string()
            } else {
                format!("{} left", fmt_span(c.seconds_left))
            };
            let _ = writeln!(
                o,
                "      validity:  {} .. {} ({left})",
                c.not_before, c.not_after
            );
            let _ = writeln!(o, "      key:       {}", c.key_type);
            let ca = match (c.is_ca, c.path_len) {
                (true, Some(n)) => format!("CA:TRUE, pathlen:{n}"),
                (true, None) => "CA:TRUE".to_string(),
                (false, _) => "CA:FALSE".to_string(),
            };
            let ss = if c.self_signed { " (self-signed)" } else { "" };
            let _ = writeln!(o, "      basic:     {ca}{ss}");
            if !c.key_usage.is_empty() {
                let _ = writeln!(o, "      key usage: {}", c.key_usage.join(", "));
            }
            if !c.ext_key_usage.is_empty() {
                let _ = writeln!(o, "      ext usage: {}", c.ext_key_usage.join(", "));
            }
        }
        if let Some(ch) = &r.chain {
            match &ch.reason {
                None => {
                    let _ = writeln!(o, "  chain: OK (verified to root {})", ch.root);
                }
                Some(why) => {
                    let _ = writeln!(o, "  chain: BROKEN: {why}");
                }
            }
        }
    }
    o
}

fn or_empty(s: &str) -> &str {
    if s.is_empty() {
        "(empty)"
    } else {
        s
    }
}
