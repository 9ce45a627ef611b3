//! `eastwest-certs`: mesh PKI for operators (Istio plug-in CA `cacerts`, SPIFFE leaves,
//! inspection). Thin CLI over the `eastwest_certs` library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use eastwest_certs::files::{cacerts_files, cluster_files, identity_files, write_all, OutFile};
use eastwest_certs::inspect::{inspect_file, read_cert_file, render_human};
use eastwest_certs::{ClusterCa, KeyType, LeafOptions, Mesh, MeshOptions, SpiffeId};

#[derive(Parser)]
#[command(
    name = "eastwest-certs",
    about = "Mesh PKI for eastwest / Istio multi-cluster",
    after_help = "Examples:
  eastwest-certs mesh --out ../pki --trust-domain cluster.local --clusters fra,ash
  eastwest-certs cluster --root ../pki --name par
  eastwest-certs gateway --ca ../pki/fra --out gw/ --validity 365d
  eastwest-certs inspect gw/cert-chain.pem --root ../pki/root-cert.pem"
)]
struct Cli {
    #[command(flatten)]
    log: eastwest_cli::LogArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A root CA and one intermediate per cluster in Istio's `cacerts` layout, plus a
    /// `cacerts` Secret manifest per cluster.
    #[command(after_help = "Examples:
  eastwest-certs mesh --out ../pki --clusters fra,ash
  eastwest-certs mesh --out ../pki --trust-domain example.org --clusters fra,ash --key-type rsa4096 --root-validity 20y")]
    Mesh {
        /// Output directory (DIR/root-{cert,key}.pem and
        /// DIR/<cluster>/{ca-cert,ca-key,root-cert,cert-chain}.pem). Keep it out of any Docker
        /// build context: it holds the root key.
        #[arg(long)]
        out: PathBuf,
        /// SPIFFE trust domain of the mesh (Istio's meshConfig.trustDomain).
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Comma-separated cluster names, e.g. fra,ash.
        #[arg(long, value_delimiter = ',', required = true)]
        clusters: Vec<String>,
        /// Key algorithm: ecdsa-p256, rsa2048 or rsa4096.
        #[arg(long, default_value = "ecdsa-p256")]
        key_type: KeyType,
        /// Root validity, e.g. 10y, 3650d.
        #[arg(long, default_value = "10y", value_parser = validity)]
        root_validity: Duration,
        /// Intermediate validity, e.g. 5y.
        #[arg(long, default_value = "5y", value_parser = validity)]
        intermediate_validity: Duration,
        /// Overwrite existing files (a new root: every cluster's certificates change).
        #[arg(long)]
        force: bool,
    },
    /// Add a cluster to an existing mesh: a new intermediate signed by the root that `mesh`
    /// wrote, in the same layout (DIR/<name>/...). The root and the other clusters are not
    /// touched.
    #[command(after_help = "Examples:
  eastwest-certs cluster --root ../pki --name par
  eastwest-certs cluster --root ../pki --name par --validity 2y --key-type rsa2048")]
    Cluster {
        /// The directory `mesh --out` wrote (root-cert.pem and root-key.pem).
        #[arg(long)]
        root: PathBuf,
        /// The new cluster's name, e.g. par.
        #[arg(long)]
        name: String,
        /// Intermediate validity, e.g. 5y; never past the root's.
        #[arg(long, default_value = "5y", value_parser = validity)]
        validity: Duration,
        /// Key algorithm: ecdsa-p256, rsa2048 or rsa4096.
        #[arg(long, default_value = "ecdsa-p256")]
        key_type: KeyType,
        /// Overwrite this cluster's files if they exist (never the root).
        #[arg(long)]
        force: bool,
    },
    /// A short-lived workload leaf whose URI SAN is the SPIFFE ID, with its chain.
    #[command(after_help = "Examples:
  eastwest-certs workload --ca ../pki/ash --spiffe-id spiffe://cluster.local/ns/echo/sa/client --out client
  eastwest-certs workload --ca ../pki/fra --spiffe-id spiffe://cluster.local/ns/istio-system/sa/eastwest-control --out control/ --validity 365d")]
    Workload {
        #[command(flatten)]
        leaf: LeafArgs,
        /// The workload's SPIFFE ID: spiffe://<td>/ns/<ns>/sa/<sa>
        #[arg(long, alias = "spiffe")]
        spiffe_id: SpiffeId,
    },
    /// Like `workload`, for a gateway identity (default: the east-west gateway's service
    /// account spiffe://<td>/ns/istio-system/sa/istio-eastwestgateway).
    #[command(after_help = "Examples:
  eastwest-certs gateway --ca ../pki/fra --out gw-fra/ --validity 365d
  eastwest-certs gateway --ca ../pki/ash --dns eastwest.ash.example --out gw-ash/")]
    Gateway {
        #[command(flatten)]
        leaf: LeafArgs,
        /// Full SPIFFE ID; overrides --trust-domain/--namespace/--service-account.
        #[arg(long, alias = "spiffe")]
        spiffe_id: Option<SpiffeId>,
        /// Trust domain of the gateway's SPIFFE ID.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Namespace of the gateway's service account.
        #[arg(long, default_value = "istio-system")]
        namespace: String,
        /// The gateway's service account.
        #[arg(long, default_value = "istio-eastwestgateway")]
        service_account: String,
    },
    /// Show subject, issuer, SANs, validity, key type and CA flags of PEM/DER certs;
    /// with --root verify each file's chain. Exits 1 on a broken chain, an expired
    /// certificate or unreadable input.
    #[command(after_help = "Examples:
  eastwest-certs inspect gw/cert-chain.pem --root ../pki/root-cert.pem
  eastwest-certs inspect --json ../pki/fra/ca-cert.pem ../pki/ash/ca-cert.pem")]
    Inspect {
        /// Certificate files (PEM, one or more certificates each, or DER).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Root certificate to verify each file's chain against.
        #[arg(long)]
        root: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    Completions(eastwest_cli::Completions),
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
    #[arg(long, default_value = "24h", value_parser = validity)]
    validity: Duration,
    /// Key algorithm: ecdsa-p256, rsa2048 or rsa4096.
    #[arg(long, default_value = "ecdsa-p256")]
    key_type: KeyType,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

fn main() -> ExitCode {
    let cli: Cli = eastwest_cli::parse();
    cli.log.init("warn");
    match run(cli.cmd) {
        Ok(code) => code,
        Err(e) => eastwest_cli::exit_failure(&e),
    }
}

fn run(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
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
            write(&cacerts_files(&mesh, &out), force)
        }
        Cmd::Cluster {
            root,
            name,
            validity,
            key_type,
            force,
        } => {
            let mut mesh = Mesh::load_root(&root).context("loading the mesh root")?;
            mesh.add_cluster(&name, key_type, validity)?;
            write(&cluster_files(&mesh, &name, &root), force)
        }
        Cmd::Workload { leaf, spiffe_id } => issue(&leaf, &spiffe_id),
        Cmd::Gateway {
            leaf,
            spiffe_id,
            trust_domain,
            namespace,
            service_account,
        } => {
            let id = match spiffe_id {
                Some(id) => id,
                None => format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
                    .parse()?,
            };
            issue(&leaf, &id)
        }
        Cmd::Inspect { files, root, json } => inspect(&files, root.as_deref(), json),
        Cmd::Completions(completions) => {
            completions.print::<Cli>();
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Writes `files` (refusing to overwrite without `force`) and lists them.
fn write(files: &[OutFile], force: bool) -> Result<ExitCode> {
    write_all(files, force)?;
    for f in files {
        println!("wrote {}", f.path.display());
    }
    Ok(ExitCode::SUCCESS)
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
    write(&identity_files(&identity, &leaf.out), leaf.force)
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

/// A certificate validity: a humantime duration (`24h`, `90d`, `10y`), more than zero.
fn validity(s: &str) -> Result<Duration, String> {
    match eastwest_cli::duration(s)? {
        d if d.is_zero() => Err("a validity must be more than zero".to_string()),
        d => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_is_complete() {
        eastwest_cli::assert_help_complete::<Cli>(false);
    }
}
