//! What one benchmark run does: target, workload, connection handling, TLS, SLOs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use rustls_pki_types::CertificateDer;

/// bench_serving's `--backend` names. The name is what the JSON output reports; what is
/// sent depends only on the API ([`Backend::is_chat`], [`Backend::path`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// sglang's native POST /generate.
    Sglang,
    /// Same as `sglang`.
    SglangNative,
    /// POST /v1/completions
    SglangOai,
    /// POST /v1/chat/completions
    SglangOaiChat,
    /// POST /v1/completions
    Vllm,
    /// POST /v1/chat/completions
    VllmChat,
    /// POST /v1/completions
    Lmdeploy,
    /// POST /v1/chat/completions
    LmdeployChat,
    /// POST /v1/completions (eastwest's alias)
    Openai,
    /// POST /v1/chat/completions (eastwest's alias)
    OpenaiChat,
}

impl Backend {
    /// The name as given on the command line (bench_serving's spelling).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sglang => "sglang",
            Backend::SglangNative => "sglang-native",
            Backend::SglangOai => "sglang-oai",
            Backend::SglangOaiChat => "sglang-oai-chat",
            Backend::Vllm => "vllm",
            Backend::VllmChat => "vllm-chat",
            Backend::Lmdeploy => "lmdeploy",
            Backend::LmdeployChat => "lmdeploy-chat",
            Backend::Openai => "openai",
            Backend::OpenaiChat => "openai-chat",
        }
    }

    /// sglang's native API (`/generate`), rather than an OpenAI-compatible one.
    pub fn is_native(self) -> bool {
        matches!(self, Backend::Sglang | Backend::SglangNative)
    }

    /// Chat completions (messages) rather than completions (prompt).
    pub fn is_chat(self) -> bool {
        matches!(
            self,
            Backend::SglangOaiChat
                | Backend::VllmChat
                | Backend::LmdeployChat
                | Backend::OpenaiChat
        )
    }

    pub fn path(self) -> &'static str {
        if self.is_native() {
            "/generate"
        } else if self.is_chat() {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        }
    }
}

/// bench_serving's `--dataset-name` values that `run` can draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dataset {
    /// Lengths as bench_serving draws them; prompts of random words (bench_serving takes
    /// ShareGPT text).
    Random,
    /// Lengths, then one numpy offset per prompt into the tokenizer's vocabulary; prompt
    /// `i` is the decoded ids `(offset + i + j) % vocab_size` (needs a tokenizer).
    RandomIds,
}

impl Dataset {
    pub fn name(self) -> &'static str {
        match self {
            Dataset::Random => "random",
            Dataset::RandomIds => "random-ids",
        }
    }
}

/// How requests get their HTTP/1.1 connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConnectionMode {
    /// A new TCP (+TLS) connection per request, as sglang's aiohttp client effectively does
    /// (one session per request): every TTFT includes the handshakes.
    New,
    /// Idle connections are reused (a pool that grows to the concurrency).
    Keepalive,
}

impl ConnectionMode {
    pub fn name(self) -> &'static str {
        match self {
            ConnectionMode::New => "new",
            ConnectionMode::Keepalive => "keepalive",
        }
    }
}

/// Service-level objectives for goodput, in milliseconds (vLLM/sglang `--goodput KEY:MS`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Goodput {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
    pub e2el_ms: Option<f64>,
    /// The metrics in the order first given (bench_serving's dict keeps that order).
    pub order: Vec<&'static str>,
}

impl Goodput {
    pub fn is_set(&self) -> bool {
        self.ttft_ms.is_some() || self.tpot_ms.is_some() || self.e2el_ms.is_some()
    }

    /// The SLOs given, by bench_serving's names (`ttft`, `tpot`, `e2el`), in the order
    /// given (set directly without `order`: ttft, tpot, e2el).
    pub fn slos(&self) -> super::metrics::SloMap {
        let value = |k: &str| match k {
            "ttft" => self.ttft_ms,
            "tpot" => self.tpot_ms,
            _ => self.e2el_ms,
        };
        let mut names: Vec<&str> = self.order.clone();
        for k in ["ttft", "tpot", "e2el"] {
            if !names.contains(&k) {
                names.push(k);
            }
        }
        super::metrics::SloMap(
            names
                .into_iter()
                .filter_map(|k| Some((k.to_string(), value(k)?)))
                .collect(),
        )
    }

    /// Parses `ttft:200 tpot:50 e2el:3000` items.
    pub fn parse(items: &[String]) -> anyhow::Result<Goodput> {
        let mut g = Goodput::default();
        for item in items {
            let (key, value) = item
                .split_once(':')
                .with_context(|| format!("--goodput {item:?}: expected KEY:MS, e.g. ttft:200"))?;
            let ms: f64 = value
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite() && *v >= 0.0)
                .with_context(|| {
                    format!("--goodput {item:?}: {value:?} is not a non-negative number of ms")
                })?;
            let name = match key {
                "ttft" => {
                    g.ttft_ms = Some(ms);
                    "ttft"
                }
                "tpot" => {
                    g.tpot_ms = Some(ms);
                    "tpot"
                }
                "e2el" => {
                    g.e2el_ms = Some(ms);
                    "e2el"
                }
                _ => bail!(
                    "--goodput {item:?}: unknown metric {key:?} (expected ttft, tpot or e2el)"
                ),
            };
            if !g.order.contains(&name) {
                g.order.push(name);
            }
        }
        Ok(g)
    }
}

/// Client TLS: a ready rustls config plus the server name to send.
#[derive(Clone)]
pub struct TlsClient {
    pub config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("alpn", &self.config.alpn_protocols)
            .finish_non_exhaustive()
    }
}

/// How to verify the server and what to present, from the command line's file flags.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles<'a> {
    pub cacert: Option<&'a Path>,
    pub cert: Option<&'a Path>,
    pub key: Option<&'a Path>,
    /// Verify the server's SPIFFE ID (exact match against any of these) instead of its name.
    pub spiffe_ids: &'a [String],
    /// Verify that the server's SPIFFE ID is in this trust domain instead of its name.
    pub spiffe_trust_domain: Option<&'a str>,
    /// Check the server's host name even when the client certificate is a mesh (SPIFFE) one.
    pub verify_hostname: bool,
}

/// The client TLS flags of `run` and `sidecar`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsFlags {
    // The TLS flags share one vocabulary with the other binaries (--tls-cert/--tls-key/
    // --tls-ca); the old names stay as hidden aliases.
    /// PEM CA bundle to verify the server (default: system roots); the mesh root for SPIFFE.
    #[arg(long = "tls-ca", alias = "cacert")]
    pub cacert: Option<PathBuf>,
    /// Client certificate chain (PEM) for mTLS.
    #[arg(long = "tls-cert", alias = "cert", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM) for mTLS.
    #[arg(long = "tls-key", alias = "key", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Verify the server's SPIFFE ID (repeatable) instead of its host name.
    #[arg(long)]
    pub spiffe_id: Vec<String>,
    /// Accept any server SPIFFE ID in this trust domain instead of checking its host name.
    #[arg(long, conflicts_with = "spiffe_id")]
    pub spiffe_trust_domain: Option<String>,
    /// Check the server's host name (WebPKI) even with a mesh (SPIFFE) client certificate;
    /// without it, mesh certs mean the server must be in the client's trust domain.
    #[arg(long, conflicts_with_all = ["spiffe_id", "spiffe_trust_domain"])]
    pub verify_hostname: bool,
}

impl TlsFlags {
    /// Whether any flag asks for TLS.
    pub fn any(&self) -> bool {
        self.cacert.is_some()
            || self.cert.is_some()
            || !self.spiffe_id.is_empty()
            || self.spiffe_trust_domain.is_some()
    }

    /// The client config these flags describe.
    pub fn client(&self) -> anyhow::Result<TlsClient> {
        TlsClient::from_files(&TlsFiles {
            cacert: self.cacert.as_deref(),
            cert: self.cert.as_deref(),
            key: self.key.as_deref(),
            spiffe_ids: &self.spiffe_id,
            spiffe_trust_domain: self.spiffe_trust_domain.as_deref(),
            verify_hostname: self.verify_hostname,
        })
    }
}

impl TlsClient {
    /// Builds the client config: SPIFFE verification (eastwest-certs) when a SPIFFE policy is
    /// given, or when the client certificate is a mesh one (its SPIFFE ID's trust domain is
    /// then required of the server, as mesh certificates carry no DNS names); else WebPKI
    /// hostname verification against `--tls-ca` or the system roots.
    pub fn from_files(files: &TlsFiles<'_>) -> anyhow::Result<TlsClient> {
        let spiffe = !files.spiffe_ids.is_empty() || files.spiffe_trust_domain.is_some();
        let mut config = if spiffe {
            spiffe_config(files)?
        } else if let Some(config) = mesh_config(files)? {
            config
        } else {
            webpki_config(files)?
        };
        // The client only speaks HTTP/1.1 (as bench_serving's aiohttp does).
        Arc::make_mut(&mut config).alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsClient { config })
    }
}

fn spiffe_config(files: &TlsFiles<'_>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let (Some(cert), Some(key), Some(ca)) = (files.cert, files.key, files.cacert) else {
        bail!("SPIFFE verification (--spiffe-id/--spiffe-trust-domain) needs --tls-cert, --tls-key and --tls-ca (the mesh root)");
    };
    let identity =
        eastwest_certs::Identity::load(cert, key, ca).context("loading mTLS identity")?;
    let policy = match files.spiffe_trust_domain {
        Some(td) => eastwest_certs::PeerPolicy::TrustDomain(td.to_string()),
        None => eastwest_certs::PeerPolicy::Exact(
            files
                .spiffe_ids
                .iter()
                .map(|id| id.parse().with_context(|| format!("--spiffe-id {id:?}")))
                .collect::<anyhow::Result<Vec<_>>>()?,
        ),
    };
    identity
        .client_config(policy)
        .context("building the SPIFFE client config")
}

/// SPIFFE verification within the client's own trust domain, if the client certificate is
/// a mesh one and host-name checks were not asked for.
fn mesh_config(files: &TlsFiles<'_>) -> anyhow::Result<Option<Arc<rustls::ClientConfig>>> {
    let (Some(cert), Some(key), Some(ca)) = (files.cert, files.key, files.cacert) else {
        return Ok(None);
    };
    if files.verify_hostname {
        return Ok(None);
    }
    // Not a mesh identity (no SPIFFE ID, or a CA bundle of several roots): plain WebPKI.
    let Ok(identity) = eastwest_certs::Identity::load(cert, key, ca) else {
        return Ok(None);
    };
    let td = identity.spiffe_id().trust_domain.clone();
    tracing::info!(
        "client certificate is {}: verifying the server's SPIFFE ID is in trust domain {td} \
         (not its host name; --verify-hostname to change)",
        identity.spiffe_id()
    );
    let config = identity
        .client_config(eastwest_certs::PeerPolicy::TrustDomain(td))
        .context("building the SPIFFE client config")?;
    Ok(Some(config))
}

fn webpki_config(files: &TlsFiles<'_>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::PrivateKeyDer;

    let mut roots = rustls::RootCertStore::empty();
    match files.cacert {
        Some(path) => {
            for c in read_certs("--tls-ca", path)? {
                roots.add(c).with_context(|| {
                    format!("--tls-ca {}: unusable certificate", path.display())
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                // A broken system certificate only loses that one root.
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                bail!("no system root certificates found; pass --tls-ca FILE");
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    let config = match (files.cert, files.key) {
        (Some(cert), Some(key)) => {
            let chain = read_certs("--tls-cert", cert)?;
            let key_der = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("--tls-key {}: no PEM private key", key.display()))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .with_context(|| {
                    format!(
                        "--tls-cert {} / --tls-key {}",
                        cert.display(),
                        key.display()
                    )
                })?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => bail!("--tls-cert and --tls-key must be given together"),
    };
    Ok(Arc::new(config))
}

/// The certificates in the PEM file given as `flag`; at least one.
fn read_certs(flag: &str, path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    use rustls_pki_types::pem::PemObject;

    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("{flag} {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{flag} {}: bad PEM", path.display()))?;
    if certs.is_empty() {
        bail!("{flag} {}: no CERTIFICATE found", path.display());
    }
    Ok(certs)
}

/// One benchmark run. Build it from the CLI ([`super::Args`]) or directly (the demo).
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// `http://host:port` or `https://host:port` (a path prefix is kept).
    pub base_url: String,
    pub backend: Backend,
    /// Model name; `None` asks the server's /v1/models (like bench_serving).
    pub model: Option<String>,
    pub num_prompts: usize,
    pub dataset: Dataset,
    /// `--tokenizer`: sizes and makes prompts, and retokenizes the output, as bench_serving.
    pub tokenizer: Option<Arc<super::tokenizer::Tokenizer>>,
    /// Requests per second (Poisson arrivals); `f64::INFINITY` sends all at once.
    pub request_rate: f64,
    pub max_concurrency: Option<usize>,
    pub random_input_len: usize,
    pub random_output_len: usize,
    pub random_range_ratio: f64,
    pub warmup_requests: usize,
    pub seed: u64,
    pub connection: ConnectionMode,
    /// TLS even for `http://` URLs (`https://` implies it).
    pub tls: Option<TlsClient>,
    /// TLS server name to send instead of the URL's host.
    pub sni: Option<String>,
    /// Dial this `host:port` instead of the URL's; Host header and SNI stay as they are.
    pub connect_to: Option<String>,
    pub goodput: Goodput,
    /// Upper bound for one request, start to end of stream.
    pub request_timeout: Duration,
    /// Merged into every request body last, overriding the defaults
    /// (`--extra-request-body`).
    pub extra_request_body: serde_json::Map<String, serde_json::Value>,
    /// Native backend only: `sampling_params.temperature` (`--temperature`).
    pub temperature: f64,
    /// Native backend only: `sampling_params.top_p`, sent when below 1 (`--top-p`).
    pub top_p: f64,
    /// Send `"ignore_eos": false` instead of true (`--disable-ignore-eos`).
    pub disable_ignore_eos: bool,
    /// Written as `tag` into the JSON output (`--tag`).
    pub tag: Option<String>,
    /// Extra request headers (`--header KEY=VALUE`).
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Wait this long for GET /v1/models to answer 200 before starting (zero: no check;
    /// the CLI's default is 60 s, as bench_serving's).
    pub ready_check_timeout: Duration,
    /// Print bench_serving's progress lines on stdout (`#Input tokens`, warmup, ready
    /// check), as the CLI does; the library is quiet by default.
    pub console: bool,
}

impl RunConfig {
    /// Defaults like bench_serving's, aimed at `base_url`.
    pub fn new(base_url: impl Into<String>) -> RunConfig {
        RunConfig {
            base_url: base_url.into(),
            backend: Backend::SglangOaiChat,
            model: None,
            num_prompts: 1000,
            dataset: Dataset::Random,
            tokenizer: None,
            request_rate: f64::INFINITY,
            max_concurrency: None,
            random_input_len: 1024,
            random_output_len: 1024,
            random_range_ratio: 0.0,
            warmup_requests: 1,
            seed: 42,
            connection: ConnectionMode::New,
            tls: None,
            sni: None,
            connect_to: None,
            goodput: Goodput::default(),
            request_timeout: Duration::from_secs(600),
            ready_check_timeout: Duration::ZERO,
            console: false,
            extra_request_body: serde_json::Map::new(),
            disable_ignore_eos: false,
            temperature: 0.0,
            top_p: 1.0,
            headers: Vec::new(),
            tag: None,
        }
    }

    /// The seed as numpy's `np.random.seed` takes it.
    pub fn numpy_seed(&self) -> anyhow::Result<u32> {
        u32::try_from(self.seed)
            .map_err(|_| anyhow::anyhow!("--seed must be between 0 and 2**32 - 1 (numpy's range)"))
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.num_prompts == 0 {
            bail!("--num-prompts must be at least 1");
        }
        if self.request_rate.is_nan() || self.request_rate <= 0.0 {
            bail!("--request-rate must be > 0 (or inf)");
        }
        if self.max_concurrency == Some(0) {
            bail!("--max-concurrency must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.random_range_ratio) {
            bail!("--random-range-ratio must be within 0..=1");
        }
        self.numpy_seed()?;
        if self.dataset == Dataset::RandomIds && self.tokenizer.is_none() {
            bail!(
                "--dataset-name random-ids needs --tokenizer (a tokenizer.json or a model directory holding one): \
                 its prompts are token ids of the tokenizer's vocabulary"
            );
        }
        if self.random_output_len == 0 {
            bail!("--random-output-len must be at least 1");
        }
        Ok(())
    }
}
