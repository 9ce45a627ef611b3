//! Mesh PKI for eastwest: one root, one intermediate per cluster (Istio's plug-in CA
//! `cacerts` layout), SPIFFE workload/gateway leaves, and rustls mTLS configs that
//! check peers' SPIFFE IDs.
//!
//! ```no_run
//! use eastwest_certs::{Mesh, PeerPolicy, SpiffeId};
//! let mesh = Mesh::generate("cluster.local", &["fra", "ash"]).unwrap();
//! let server = mesh.workload("fra", &SpiffeId::workload("cluster.local", "ns", "srv")).unwrap();
//! let cfg = server.server_config(PeerPolicy::TrustDomain("cluster.local".into())).unwrap();
//! # drop(cfg);
//! ```

mod error;
pub mod files;
mod identity;
pub mod inspect;
mod issue;
mod spiffe;
mod verify;

pub use error::CertError;
pub use identity::Identity;
pub use issue::{Ca, ClusterCa, KeyType, LeafOptions, Mesh, MeshOptions};
pub use spiffe::{not_after, spiffe_id_of, SpiffeId};
pub use verify::{check_chain, mtls_server_config, PeerPolicy, PeerRejected, TlsVersions};
