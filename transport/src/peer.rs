//! Who is on the other end of a connection, read from its client certificate.
//!
//! rustls has already verified that any client certificate chains to the
//! cluster CA; this module only maps the certificate's common name to a role.

use x509_parser::prelude::{FromDer, X509Certificate};

/// The authenticated identity of a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    /// No client certificate: may only ask for public cluster info.
    Anonymous,
    /// An operator holding an admin certificate (`admin-<name>`).
    Admin {
        /// The name after `admin-`.
        name: String,
    },
    /// A joined runner (`runner-<uuid>`).
    Runner {
        /// The runner id after `runner-`.
        id: String,
    },
    /// A CA-signed certificate with a common name of no known role.
    Unknown {
        /// The certificate's common name (empty when it has none).
        common_name: String,
    },
}

impl PeerIdentity {
    /// Classifies a verified client certificate chain (leaf first).
    pub fn from_chain(chain: Option<&[rustls_pki_types::CertificateDer<'_>]>) -> Self {
        let Some(leaf) = chain.and_then(|c| c.first()) else {
            return PeerIdentity::Anonymous;
        };
        let Ok((_, cert)) = X509Certificate::from_der(leaf.as_ref()) else {
            return PeerIdentity::Unknown {
                common_name: String::new(),
            };
        };
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default()
            .to_string();
        Self::from_common_name(&cn)
    }

    /// Classifies a common name.
    pub fn from_common_name(cn: &str) -> Self {
        if let Some(name) = cn.strip_prefix("admin-").filter(|n| !n.is_empty()) {
            PeerIdentity::Admin {
                name: name.to_string(),
            }
        } else if let Some(id) = cn.strip_prefix("runner-").filter(|n| !n.is_empty()) {
            PeerIdentity::Runner { id: id.to_string() }
        } else {
            PeerIdentity::Unknown {
                common_name: cn.to_string(),
            }
        }
    }

    /// Reads the identity of an established QUIC connection.
    pub fn of_connection(conn: &quinn::Connection) -> Self {
        let Some(any) = conn.peer_identity() else {
            return PeerIdentity::Anonymous;
        };
        match any.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>() {
            Ok(chain) => Self::from_chain(Some(&chain)),
            Err(_) => PeerIdentity::Anonymous,
        }
    }
}
