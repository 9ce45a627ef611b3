//! `eastwest-certs`: mesh PKI for operators (Istio plug-in CA `cacerts`, SPIFFE leaves,
//! inspection). Thin CLI over the `eastwest_certs` library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use eastwest_certs::files::{cacerts_files, identity_files, write_all};
use eastwest_certs::inspect::{inspect_file, read_cert_file, render_human};
use eastwest_certs::{ClusterCa, KeyType, LeafOptions, Mesh, MeshOptions, SpiffeId};

#[derive(Parser)]
#[command(
    name = "eastwest-certs",
    version,
    about = "Mesh PKI for eastwest / Istio multi-cluster"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A root CA and one intermediate per cluster in Istio's `cacerts` layout, plus a
    /// `cacerts` Secret manifest per cluster.
    Mesh {
        /// Output directory (DIR/<cluster>/{ca-cert,ca-key,root-cert,cert-chain}.pem).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Comma-separated cluster names, e.g. fra,ash.
        #[arg(long, value_delimiter = ',', required = true)]
        clusters: Vec<String>,
        /// ecdsa-p256 (default), rsa2048 or rsa4096.
        #[arg(long, default_value = "ecdsa-p256")]
        key_type: KeyType,
        /// Root validity, e.g. 10y, 3650d.
        #[arg(long, default_value = "10y", value_parser = parse_duration)]
        root_validity: Duration,
        /// Intermediate validity, e.g. 5y.
        #[arg(long, default_value = "5y", value_parser = parse_duration)]
        intermediate_validity: Duration,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// A short-lived workload leaf whose URI SAN is the SPIFFE ID, with its chain.
    Workload {
        #[command(flatten)]
        leaf: LeafArgs,
        /// spiffe://<td>/ns/<ns>/sa/<sa>
        #[arg(long)]
        spiffe: SpiffeId,
    },
    /// Like `workload`, for a gateway identity (default: the east-west gateway's service
    /// account spiffe://<td>/ns/istio-system/sa/istio-eastwestgateway).
    Gateway {
        #[command(flatten)]
        leaf: LeafArgs,
        /// Full SPIFFE ID; overrides --trust-domain/--namespace/--service-account.
        #[arg(long)]
        spiffe: Option<SpiffeId>,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        #[arg(long, default_value = "istio-system")]
        namespace: String,
        #[arg(long, default_value = "istio-eastwestgateway")]
        service_account: String,
    },
    /// Show subject, issuer, SANs, validity, key type and CA flags of PEM/DER certs;
    /// with --root verify each file's chain. Exits 1 on a broken chain, an expired
    /// certificate or unreadable input.
    Inspect {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Root certificate to verify each file's chain against.
        #[arg(long)]
        root: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct LeafArgs {
    /// A cluster's cacerts directory (ca-cert.pem, ca-key.pem, root-cert.pem).
    #[arg(long)]
    ca: PathBuf,
    /// Extra DNS SAN (repeatable).
    #[arg(long = "dns")]
    dns: Vec<String>,
    /// PREFIX-cert-chain.pem, PREFIX-key.pem, PREFIX-root-cert.pem (or, for a directory,
    /// DIR/cert-chain.pem, DIR/key.pem, DIR/root-cert.pem).
    #[arg(long)]
    out: PathBuf,
    /// Validity, e.g. 24h, 90d.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    validity: Duration,
    #[arg(long, default_value = "ecdsa-p256")]
    key_type: KeyType,
    #[arg(long)]
    force: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Mesh {
            out,
            trust_domain,
            clusters,
            key_type,
            root_validity,
            intermediate_validity,
            force,
        } => {
            if intermediate_validity > root_validity {
                bail!("--intermediate-validity must not exceed --root-validity");
            }
            let mesh = Mesh::generate_with(&MeshOptions {
                trust_domain,
                clusters,
                key_type,
                root_validity,
                intermediate_validity,
            })?;
            let files = cacerts_files(&mesh, &out);
            write_all(&files, force)?;
            for f in &files {
                println!("wrote {}", f.path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Workload { leaf, spiffe } => issue(&leaf, &spiffe),
        Cmd::Gateway {
            leaf,
            spiffe,
            trust_domain,
            namespace,
            service_account,
        } => {
            let id = match spiffe {
                Some(id) => id,
                None => format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
                    .parse()?,
            };
            issue(&leaf, &id)
        }
        Cmd::Inspect { files, root, json } => inspect(&files, root.as_deref(), json),
    }
}

fn issue(leaf: &LeafArgs, id: &SpiffeId) -> Result<ExitCode> {
    let ca = ClusterCa::load(&leaf.ca)
        .with_context(|| format!("loading CA from {}", leaf.ca.display()))?;
    let identity = ca.issue(
        id,
        &LeafOptions {
            key_type: leaf.key_type,
            validity: leaf.validity,
            not_before: None,
            dns_names: leaf.dns.clone(),
        },
    )?;
    let files = identity_files(&identity, &leaf.out);
    write_all(&files, leaf.force)?;
    for f in &files {
        println!("wrote {}", f.path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn inspect(files: &[PathBuf], root: Option<&Path>, json: bool) -> Result<ExitCode> {
    let root_der = match root {
        Some(p) => {
            let mut certs = read_cert_file(p).context("reading --root")?;
            if certs.len() != 1 {
                bail!(
                    "{}: --root must hold exactly one certificate, found {}",
                    p.display(),
                    certs.len()
                );
            }
            Some((certs.remove(0), p))
        }
        None => None,
    };
    let reports: Vec<_> = files
        .iter()
        .map(|f| inspect_file(f, root_der.as_ref().map(|(d, p)| (d, *p))))
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print!("{}", render_human(&reports));
    }
    Ok(if reports.iter().any(|r| r.failed()) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `90s`, `30m`, `24h`, `90d`, `10y` (365 days).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with unit s, m, h, d or y (e.g. 24h)"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "y" => 365 * 86_400,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use s, m, h, d or y)"
            ))
        }
    };
    if n == 0 {
        return Err(format!("{s:?}: validity must be positive"));
    }
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?}: too long"))
}
