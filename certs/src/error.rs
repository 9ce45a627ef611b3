//! The crate's error type: every variant says what failed and, for files, which file.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("invalid SPIFFE ID {id:?}: {reason}")]
    InvalidSpiffeId { id: String, reason: String },
    #[error("cannot parse certificate: {0}")]
    Parse(String),
    #[error("cannot generate {what}: {reason}")]
    Generate { what: String, reason: String },
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    /// The io::Error is in the message and deliberately not `source()`: reports that print
    /// the chain (`{:#}`) would show it twice.
    #[error("{}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("unknown cluster {cluster:?} (mesh has: {known})")]
    UnknownCluster { cluster: String, known: String },
    #[error("invalid options: {0}")]
    Options(String),
    #[error("cannot build TLS config: {0}")]
    Tls(String),
}

impl CertError {
    pub(crate) fn file(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> CertError {
        CertError::File {
            path: path.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> CertError {
        CertError::Io {
            path: path.into(),
            cause,
        }
    }

    pub(crate) fn generate(what: impl Into<String>, reason: impl std::fmt::Display) -> CertError {
        CertError::Generate {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}
