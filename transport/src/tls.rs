//! rustls configurations: the coordinator's server side (optional mTLS) and
//! the client side, which pins the cluster CA by fingerprint.
//!
//! Pinning is not trust-on-first-use: the client knows the SHA-1 of the CA
//! certificate before it connects (from `MIREN_CLUSTER`, the client config or
//! a join token). The server presents `[leaf, CA]`; the verifier finds the CA
//! by fingerprint among what was presented and then runs full WebPKI
//! verification of the leaf against that CA alone (signature, validity,
//! serverAuth usage, name). Without a fingerprint the platform roots are used.
//!
//! The coordinator's own certificate sits in a [`ServerCertSlot`], which
//! rustls asks on every handshake: renewing the certificate is replacing
//! what the slot holds, so new handshakes (QUIC and HTTPS) present the new
//! one while established connections carry on untouched.

use std::sync::{Arc, Mutex, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use identity::Fingerprint;

/// The one crypto provider used everywhere: aws-lc-rs.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(aws_lc_rs::default_provider())
}

/// Errors building a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// rustls refused the configuration (a key that does not match its
    /// certificate, no certificate, a root it cannot parse, ...).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client certificate verifier could not be built from the roots.
    #[error("could not build the certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// Trust in the platform's roots was asked for, and there are none.
    #[error("no trusted root certificates found on this machine (set SSL_CERT_FILE, or pin the cluster with host:port;sha1:<fingerprint>)")]
    NoPlatformRoots,
}

/// A server certificate that can be replaced while serving: every TLS
/// configuration built on it presents what it holds at the moment of each
/// handshake.
#[derive(Debug)]
pub struct ServerCertSlot {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ServerCertSlot {
    /// A slot holding `chain` (leaf first) and its key; the key must match
    /// the leaf.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Arc<Self>, TlsConfigError> {
        Ok(Arc::new(ServerCertSlot {
            current: RwLock::new(Arc::new(certified_key(chain, key)?)),
        }))
    }

    /// Presents `chain` and `key` from the next handshake on. A key that
    /// does not match the leaf is refused and the slot keeps what it had.
    pub fn replace(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), TlsConfigError> {
        let next = Arc::new(certified_key(chain, key)?);
        match self.current.write() {
            Ok(mut slot) => *slot = next,
            // A writer never panics while holding the lock; should one
            // have, the value is still whole: replace it all the same.
            Err(poisoned) => *poisoned.into_inner() = next,
        }
        Ok(())
    }

    /// The leaf certificate presented now.
    pub fn leaf(&self) -> Option<CertificateDer<'static>> {
        self.current().cert.first().cloned()
    }

    fn current(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl ResolvesServerCert for ServerCertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A chain and key checked to belong together (the leaf's public key is
/// the key's), as rustls' `with_single_cert` checks them.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<CertifiedKey, TlsConfigError> {
    if chain.is_empty() {
        return Err(TlsConfigError::Rustls(
            rustls::Error::NoCertificatesPresented,
        ));
    }
    Ok(CertifiedKey::from_der(chain, key, &provider())?)
}

/// Server configuration: presents `[leaf, CA]`, accepts (but does not require)
/// client certificates signed by the cluster CA, TLS 1.3 only.
pub fn server_config(
    ca: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsConfigError> {
    server_config_with_slot(ca, ServerCertSlot::new(chain, key)?, alpn)
}

/// Like [`server_config`], presenting whatever `slot` holds at each
/// handshake.
pub fn server_config_with_slot(
    ca: &CertificateDer<'static>,
    slot: Arc<ServerCertSlot>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsConfigError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone())?;
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .allow_unauthenticated()
            .build()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_cert_resolver(slot);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// Checks `leaf` the way the coordinator's server configuration checks a
/// client certificate: signed by `ca`, valid now, usable for clientAuth.
pub fn verify_client_certificate(
    ca: &CertificateDer<'static>,
    leaf: &CertificateDer<'static>,
) -> Result<(), TlsConfigError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone())?;
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build()?;
    verifier.verify_client_cert(leaf, &[], UnixTime::now())?;
    Ok(())
}

/// How a client decides to trust the server.
#[derive(Clone, Debug)]
pub enum ServerTrust {
    /// The cluster CA must have this fingerprint.
    Pinned(Fingerprint),
    /// The platform's roots (`SSL_CERT_FILE` honoured).
    Platform,
}

/// A client certificate and key to present.
pub struct ClientIdentity {
    /// The certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for ClientIdentity {
    /// A copy to present on another connection (dialing several
    /// coordinators at once).
    fn clone(&self) -> ClientIdentity {
        ClientIdentity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// A client configuration plus, for pinned trust, the slot where the
/// verifier records a fingerprint mismatch so callers can report it exactly.
pub struct ClientTls {
    /// The rustls configuration.
    pub config: rustls::ClientConfig,
    /// With a pin: where the verifier writes the fingerprint it was shown
    /// instead of the pinned one.
    pub mismatch: Option<Arc<Mutex<Option<Fingerprint>>>>,
}

/// Builds a client configuration for `trust`, presenting `identity` if given.
pub fn client_config(
    trust: &ServerTrust,
    identity: Option<ClientIdentity>,
    alpn: &[&[u8]],
) -> Result<ClientTls, TlsConfigError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let (builder, mismatch) = match trust {
        ServerTrust::Pinned(fp) => {
            let verifier = Arc::new(PinnedCaVerifier::new(*fp, provider));
            let slot = verifier.mismatch.clone();
            (
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(verifier),
                Some(slot),
            )
        }
        ServerTrust::Platform => {
            let roots = platform_roots()?;
            (builder.with_root_certificates(roots), None)
        }
    };
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain, id.key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(ClientTls { config, mismatch })
}

/// The platform's trusted roots (honours `SSL_CERT_FILE`/`SSL_CERT_DIR`).
pub fn platform_roots() -> Result<RootCertStore, TlsConfigError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (_added, _ignored) = roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(TlsConfigError::NoPlatformRoots);
    }
    Ok(roots)
}

/// Verifies a server chain against the CA whose fingerprint is pinned.
#[derive(Debug)]
pub struct PinnedCaVerifier {
    pin: Fingerprint,
    provider: Arc<CryptoProvider>,
    /// Set to the fingerprint actually presented when it was not the pin.
    pub mismatch: Arc<Mutex<Option<Fingerprint>>>,
}

impl PinnedCaVerifier {
    /// A verifier accepting only chains that hold the CA pinned by `pin`,
    /// verifying with `provider`'s algorithms.
    pub fn new(pin: Fingerprint, provider: Arc<CryptoProvider>) -> Self {
        PinnedCaVerifier {
            pin,
            provider,
            mismatch: Arc::new(Mutex::new(None)),
        }
    }

    fn record_mismatch(&self, got: Fingerprint) {
        if let Ok(mut slot) = self.mismatch.lock() {
            *slot = Some(got);
        }
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| self.pin.matches_der(c.as_ref()))
        else {
            // Report what the server's top-most certificate actually is.
            let top = intermediates.last().unwrap_or(end_entity);
            let got = Fingerprint::of_der(top.as_ref());
            self.record_mismatch(got);
            return Err(rustls::Error::General(format!(
                "TLS certificate fingerprint mismatch: got {got}, expected {}",
                self.pin
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::Other(rustls::OtherError(Arc::new(e))))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// HTTPS server configuration (no client certificates; h2 and http/1.1).
pub fn https_server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, TlsConfigError> {
    https_server_config_with_slot(ServerCertSlot::new(chain, key)?)
}

/// Like [`https_server_config`], presenting whatever `slot` holds at each
/// handshake.
pub fn https_server_config_with_slot(
    slot: Arc<ServerCertSlot>,
) -> Result<rustls::ServerConfig, TlsConfigError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(slot);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Client configuration for outbound HTTPS (OIDC issuers, CI token
/// endpoints): the platform roots (`SSL_CERT_FILE` honoured) plus any
/// `extra_roots`, TLS 1.2 and 1.3.
pub fn https_client_config(
    extra_roots: &[CertificateDer<'static>],
) -> Result<rustls::ClientConfig, TlsConfigError> {
    let mut roots = match platform_roots() {
        Ok(r) => r,
        Err(_) if !extra_roots.is_empty() => RootCertStore::empty(),
        Err(e) => return Err(e),
    };
    for c in extra_roots {
        roots.add(c.clone())?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{self, ClusterCa};

    fn pair(ca: &ClusterCa) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let leaf = ca.issue_server(&["localhost".into()]).expect("leaf");
        (
            vec![
                pki::cert_der_from_pem(&leaf.cert_pem).expect("cert"),
                ca.cert_der().clone(),
            ],
            pki::key_der_from_pem(&leaf.key_pem).expect("key"),
        )
    }

    /// One TLS handshake in memory; the leaf the client was shown.
    fn handshake(server: &Arc<rustls::ServerConfig>, pin: Fingerprint) -> CertificateDer<'static> {
        let client = client_config(&ServerTrust::Pinned(pin), None, &[b"t"]).expect("client");
        let name = ServerName::try_from("localhost").expect("name");
        let mut c = rustls::ClientConnection::new(Arc::new(client.config), name).expect("c");
        let mut s = rustls::ServerConnection::new(server.clone()).expect("s");
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).expect("client writes");
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).expect("server reads");
            }
            s.process_new_packets().expect("server");
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).expect("server writes");
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).expect("client reads");
            }
            c.process_new_packets().expect("client");
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
        }
        assert!(!c.is_handshaking(), "handshake did not finish");
        c.peer_certificates().expect("server chain")[0].clone()
    }

    #[test]
    fn a_replaced_certificate_is_presented_from_the_next_handshake() {
        let pem = ClusterCa::generate("t").expect("CA");
        let ca = ClusterCa::load(&pem.cert_pem, &pem.key_pem).expect("load");
        let (chain1, key1) = pair(&ca);
        let (chain2, key2) = pair(&ca);
        let leaf1 = chain1[0].clone();
        let leaf2 = chain2[0].clone();
        let slot = ServerCertSlot::new(chain1, key1).expect("slot");
        let quic = Arc::new(
            server_config_with_slot(ca.cert_der(), slot.clone(), &[b"t"]).expect("config"),
        );
        let https = Arc::new(https_server_config_with_slot(slot.clone()).expect("https"));
        assert_eq!(handshake(&quic, ca.fingerprint()), leaf1);

        // A key that is not the leaf's is refused; the slot is unchanged.
        let (_, other_key) = pair(&ca);
        assert!(slot.replace(chain2.clone(), other_key).is_err());
        assert_eq!(slot.leaf(), Some(leaf1.clone()));

        slot.replace(chain2, key2).expect("replace");
        assert_eq!(slot.leaf(), Some(leaf2.clone()));
        // The same configurations, never rebuilt, present the new leaf.
        let mut https_t = (*https).clone();
        https_t.alpn_protocols = vec![b"t".to_vec()];
        assert_eq!(handshake(&quic, ca.fingerprint()), leaf2);
        assert_eq!(handshake(&Arc::new(https_t), ca.fingerprint()), leaf2);
    }
}
