//! The cluster CA and the certificates it issues (server, admin, runners).
//!
//! Certificates are minted with rcgen on aws-lc-rs. The role of a client
//! certificate is carried in its common name (`admin-<name>`,
//! `runner-<uuid>`) and read back by [`crate::peer`]; only certificates signed
//! by the cluster CA are ever accepted, so the name cannot be forged.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::path::PathBuf;

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::{Duration, OffsetDateTime};

use identity::Fingerprint;

/// Why certificate material could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// PEM text holds no certificate.
    #[error("not a PEM certificate: {0}")]
    BadCertificatePem(#[source] pem::Error),
    /// A certificate file could not be read or parsed.
    #[error("not a PEM certificate: {}: {source}", path.display())]
    CertificateFile {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("not a PEM certificate: {}: no certificate", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// DER bytes are not an X.509 certificate.
    #[error("not a PEM certificate: {0}")]
    BadCertificateDer(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// A certificate's validity is outside what a date can hold.
    #[error("not a PEM certificate: {0}")]
    BadValidity(#[source] time::error::ComponentRange),
    /// A CA certificate that cannot issue (its key does not fit it, or it
    /// cannot be parsed for issuing).
    #[error("not a PEM certificate: {0}")]
    BadCaCertificate(#[source] rcgen::Error),
    /// PEM text holds no private key.
    #[error("not a PEM private key: {0}")]
    BadKeyPem(#[source] pem::Error),
    /// PEM text holds no private key rcgen can sign with.
    #[error("not a PEM private key: {0}")]
    BadSigningKey(#[source] rcgen::Error),
    /// rcgen could not make a key, a certificate or a request.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PKCS#10 request that does not parse or whose signature is wrong.
    #[error("certificate signing request refused: {0}")]
    BadCsr(#[source] rcgen::Error),
    /// A name that cannot go in a certificate (empty or too long a common
    /// name, a subject alternative name that is no DNS name or IP).
    #[error("invalid name {0:?} for a certificate")]
    BadName(String),
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CertifiedPem {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM (PKCS#8).
    pub key_pem: String,
}

/// Parses the first certificate of a PEM document.
pub fn cert_der_from_pem(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(PkiError::BadCertificatePem)
}

/// Every certificate of a PEM file (a CA bundle or a chain); an empty
/// file is an error.
pub fn certs_from_pem_file(
    path: &std::path::Path,
) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| PkiError::CertificateFile {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(PkiError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Parses a PEM private key (PKCS#8, SEC1 or PKCS#1).
pub fn key_der_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(PkiError::BadKeyPem)
}

/// Lifetime of the server certificate unless the coordinator is told
/// otherwise; it renews it with a third of this left.
pub const SERVER_CERT_LIFETIME: Duration = Duration::days(365);

/// The cluster certificate authority, loaded with its key.
pub struct ClusterCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    not_after: OffsetDateTime,
    issuer: Issuer<'static, KeyPair>,
}

impl ClusterCa {
    /// Makes a new CA (ECDSA P-256, 10 years) for a cluster.
    pub fn generate(cluster_name: &str) -> Result<CertifiedPem, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("miren cluster CA {cluster_name}"),
        );
        dn.push(DnType::OrganizationName, "miren");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(3650);
        let cert = params.self_signed(&key)?;
        Ok(CertifiedPem {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Loads a CA from its PEM certificate and key.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let cert_der = cert_der_from_pem(cert_pem)?;
        let key = KeyPair::from_pem(key_pem).map_err(PkiError::BadSigningKey)?;
        let issuer =
            Issuer::from_ca_cert_der(&cert_der, key).map_err(PkiError::BadCaCertificate)?;
        let (_, not_after) = validity_of_der(&cert_der)?;
        let not_after =
            OffsetDateTime::from_unix_timestamp(not_after).map_err(PkiError::BadValidity)?;
        Ok(ClusterCa {
            cert_pem: cert_pem.to_string(),
            cert_der,
            not_after,
            issuer,
        })
    }

    /// `notAfter` of the CA certificate, in Unix seconds. Nothing it issues
    /// ends later.
    pub fn not_after_unix(&self) -> i64 {
        self.not_after.unix_timestamp()
    }

    /// `now + validity`, but never past the CA's own end: a certificate
    /// cannot be verified beyond it anyway, and saying so keeps the expiry
    /// people see honest.
    fn end_of(&self, now: OffsetDateTime, validity: Duration) -> OffsetDateTime {
        (now + validity).min(self.not_after)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// SHA-1 of the CA certificate DER: what cluster addresses pin.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_der(&self.cert_der)
    }

    /// Issues the server certificate for the given DNS names and IPs
    /// (serverAuth only, [`SERVER_CERT_LIFETIME`]).
    pub fn issue_server(&self, names: &[String]) -> Result<CertifiedPem, PkiError> {
        self.issue_server_for(names, SERVER_CERT_LIFETIME)
    }

    /// Issues a server certificate valid for `lifetime` (never past the
    /// CA's end) with a fresh key.
    pub fn issue_server_for(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<CertifiedPem, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "miren coordinator");
        params.distinguished_name = dn;
        for name in names {
            params.subject_alt_names.push(san_for(name)?);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = self.end_of(now, lifetime);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedPem {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a client certificate (clientAuth only) with the given common
    /// name, valid for `validity`.
    pub fn issue_client(
        &self,
        common_name: &str,
        validity: Duration,
    ) -> Result<CertifiedPem, PkiError> {
        let key = KeyPair::generate()?;
        let cert_pem = self.issue_client_for_key(common_name, validity, &key)?;
        Ok(CertifiedPem {
            cert_pem,
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a client certificate for a public key the holder generated
    /// itself (the private key never leaves it).
    pub fn issue_client_for_key(
        &self,
        common_name: &str,
        validity: Duration,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<String, PkiError> {
        if common_name.is_empty() || common_name.len() > 64 {
            return Err(PkiError::BadName(common_name.to_string()));
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = self.end_of(now, validity);
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok(cert.pem())
    }
}

impl ClusterCa {
    /// Issues a client certificate with `common_name` for the key that
    /// signed the PKCS#10 request `csr_der` (its signature is checked; its
    /// subject and extensions are ignored).
    pub fn issue_client_for_csr(
        &self,
        common_name: &str,
        validity: Duration,
        csr_der: &[u8],
    ) -> Result<String, PkiError> {
        let der = rustls_pki_types::CertificateSigningRequestDer::from(csr_der.to_vec());
        let csr =
            rcgen::CertificateSigningRequestParams::from_der(&der).map_err(PkiError::BadCsr)?;
        self.issue_client_for_key(common_name, validity, &csr.public_key)
    }
}

/// A fresh key pair and a PKCS#10 request signed by it: what a runner sends
/// to get (or renew) its certificate. The private key never leaves the caller.
pub fn key_and_csr() -> Result<(String, Vec<u8>), PkiError> {
    let key = KeyPair::generate()?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// `(notBefore, notAfter)` of a DER certificate, in unix seconds.
pub fn validity_of_der(der: &[u8]) -> Result<(i64, i64), PkiError> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(PkiError::BadCertificateDer)?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// `notAfter` of a PEM certificate, in unix seconds.
pub fn not_after_unix(cert_pem: &str) -> Result<i64, PkiError> {
    Ok(validity_of_der(cert_der_from_pem(cert_pem)?.as_ref())?.1)
}

/// `notBefore` of a PEM certificate, in unix seconds.
pub fn not_before_unix(cert_pem: &str) -> Result<i64, PkiError> {
    Ok(validity_of_der(cert_der_from_pem(cert_pem)?.as_ref())?.0)
}

fn san_for(name: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    name.to_string()
        .try_into()
        .map(SanType::DnsName)
        .map_err(|_| PkiError::BadName(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> ClusterCa {
        let pem = ClusterCa::generate("t").expect("CA");
        ClusterCa::load(&pem.cert_pem, &pem.key_pem).expect("load")
    }

    #[test]
    fn server_certificates_last_their_lifetime_with_a_fresh_key() {
        let ca = ca();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let a = ca
            .issue_server_for(&["127.0.0.1".into()], Duration::seconds(90))
            .expect("issue");
        let b = ca.issue_server(&["127.0.0.1".into()]).expect("issue");
        let a_end = not_after_unix(&a.cert_pem).expect("not after");
        assert!((now + 90..now + 95).contains(&a_end), "{a_end} vs {now}");
        assert!(not_before_unix(&a.cert_pem).expect("not before") <= now - 299);
        let year = SERVER_CERT_LIFETIME.whole_seconds();
        let b_end = not_after_unix(&b.cert_pem).expect("not after");
        assert!((now + year..now + year + 5).contains(&b_end));
        assert_ne!(a.key_pem, b.key_pem);
    }

    #[test]
    fn nothing_outlives_the_ca() {
        let ca = ca();
        let leaf = ca
            .issue_server_for(&["localhost".into()], Duration::days(20 * 365))
            .expect("issue");
        assert_eq!(
            not_after_unix(&leaf.cert_pem).expect("not after"),
            ca.not_after_unix()
        );
        let admin = ca
            .issue_client("admin-x", Duration::days(20 * 365))
            .expect("issue");
        assert_eq!(
            not_after_unix(&admin.cert_pem).expect("not after"),
            ca.not_after_unix()
        );
        assert_eq!(
            not_after_unix(ca.cert_pem()).expect("CA not after"),
            ca.not_after_unix()
        );
    }
}
