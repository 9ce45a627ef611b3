//! istio/api `security/v1alpha1/ca.proto`, package `istio.v1.auth`, written out by hand: two
//! messages are less to keep than a build script that needs `protoc` on every machine. Field
//! numbers and types are the proto's; a test server in the tests speaks them too.

/// `IstioCertificateRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded certificate signing request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested certificate lifetime, in seconds.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// Optional, e.g. `ImpersonatedIdentity` (not used by the gateway).
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

/// `IstioCertificateResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// PEM-encoded certificate chain: the leaf first, the root last.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// The one method, as a gRPC path.
pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
