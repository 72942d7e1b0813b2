//! rustls configurations: the coordinator's server side (optional mTLS) and
//! the client side, which pins the cluster CA by fingerprint.
//!
//! Pinning is not trust-on-first-use: the client knows the SHA-1 of the CA
//! certificate before it connects (from `MIREN_CLUSTER`, the client config or
//! a join token). The server presents `[leaf, CA]`; the verifier finds the CA
//! by fingerprint among what was presented and then runs full WebPKI
//! verification of the leaf against that CA alone (signature, validity,
//! serverAuth usage, name). Without a fingerprint the platform roots are used.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use identity::Fingerprint;

/// The one crypto provider used everywhere: aws-lc-rs.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(aws_lc_rs::default_provider())
}

/// Errors building a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("could not build the certificate verifier: {0}")]
    Verifier(String),
    #[error("no trusted root certificates found on this machine (set SSL_CERT_FILE, or pin the cluster with host:port;sha1:<fingerprint>)")]
    NoPlatformRoots,
}

/// Server configuration: presents `[leaf, CA]`, accepts (but does not require)
/// client certificates signed by the cluster CA, TLS 1.3 only.
pub fn server_config(
    ca: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsConfigError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone())?;
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsConfigError::Verifier(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
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
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// A client configuration plus, for pinned trust, the slot where the
/// verifier records a fingerprint mismatch so callers can report it exactly.
pub struct ClientTls {
    pub config: rustls::ClientConfig,
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
                .map_err(|e| rustls::Error::General(e.to_string()))?;
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
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
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
