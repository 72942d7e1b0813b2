//! Cluster addresses (`host:port;sha1:<hex>`) and CA fingerprints.
//!
//! The address is how users name a cluster everywhere (`MIREN_CLUSTER`,
//! `miren cluster add`, join tokens), and the fingerprint in it is the only
//! thing that makes the first TLS connection trustworthy, so parsing is strict
//! and every refusal says what was wrong.

use std::fmt;
use std::str::FromStr;

use sha1::{Digest, Sha1};

/// Port used when an address names no port.
pub const DEFAULT_PORT: u16 = 8443;

/// SHA-1 of a certificate's DER encoding: how a cluster's CA is pinned.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 20]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Self {
        let digest = Sha1::digest(der);
        let mut out = [0u8; 20];
        out.copy_from_slice(&digest);
        Fingerprint(out)
    }

    /// The raw 20 bytes.
    pub fn as_bytes(&self) -> &[u8; 20] {
        &self.0
    }

    /// Whether this fingerprint is the one of `der`.
    pub fn matches_der(&self, der: &[u8]) -> bool {
        Self::of_der(der) == *self
    }
}

impl fmt::Display for Fingerprint {
    /// Lowercase hex, without the `sha1:` prefix.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha1:{self}")
    }
}

impl FromStr for Fingerprint {
    type Err = AddressError;

    /// Accepts `sha1:<40 hex>` or `<40 hex>`, prefix and hex case-insensitive.
    fn from_str(s: &str) -> Result<Self, AddressError> {
        let s = s.trim();
        let hex_part = match s.split_once(':') {
            Some((algo, rest)) if algo.eq_ignore_ascii_case("sha1") => rest,
            Some((algo, _)) => return Err(AddressError::UnsupportedDigest(algo.to_string())),
            None => s,
        };
        if hex_part.is_empty() {
            return Err(AddressError::EmptyFingerprint);
        }
        if hex_part.len() != 40 || !hex_part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AddressError::BadFingerprint(hex_part.to_string()));
        }
        let mut out = [0u8; 20];
        hex::decode_to_slice(hex_part.to_ascii_lowercase(), &mut out)
            .map_err(|_| AddressError::BadFingerprint(hex_part.to_string()))?;
        Ok(Fingerprint(out))
    }
}

/// Why an address or fingerprint was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Nothing was given.
    #[error("cluster address is empty: expected host:port;sha1:<40 hex digits>")]
    Empty,
    /// The host before the port is empty; holds the address.
    #[error("cluster address {0:?} has no host: expected host:port;sha1:<40 hex digits>")]
    MissingHost(String),
    #[error(
        "cluster address {0:?} has an invalid host: use a DNS name, an IPv4 address or [IPv6]"
    )]
    /// The host is neither a DNS name, an IPv4 address nor a bracketed
    /// IPv6 address; holds the host.
    BadHost(String),
    #[error("cluster address has an invalid port {0:?}: expected a number from 1 to 65535")]
    /// The port is not a number from 1 to 65535 (an empty one included);
    /// holds the port text.
    BadPort(String),
    /// Nothing follows the `;`.
    #[error("cluster address has an empty fingerprint after ';': expected sha1:<40 hex digits> (see `miren cluster export-address`)")]
    EmptyFingerprint,
    #[error("fingerprint {0:?} is not 40 hex digits: expected sha1:<40 hex digits> (see `miren cluster export-address`)")]
    /// The fingerprint is not 40 hex digits; holds it.
    BadFingerprint(String),
    #[error("the address lists {0} coordinators; at most 16 are allowed")]
    /// More than [`MAX_ENDPOINTS`] endpoints.
    TooManyEndpoints(usize),
    #[error("fingerprint digest {0:?} is not supported: only sha1 is")]
    /// The fingerprint names a digest other than `sha1`; holds its name.
    UnsupportedDigest(String),
}

/// Most coordinator endpoints one address may list.
pub const MAX_ENDPOINTS: usize = 16;

/// One coordinator's `host:port`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct HostPort {
    /// DNS name or IP literal, without brackets.
    pub host: String,
    /// UDP (QUIC) and TCP (HTTPS) port.
    pub port: u16,
}

impl fmt::Display for HostPort {
    /// `host:port`, IPv6 hosts in brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Where a cluster is and, optionally, which CA it must present:
/// `host:port[,host:port…][;sha1:<hex>]`. The first endpoint is the
/// cluster's name (the CI token audience); the others are more
/// coordinators of the same cluster, under the same pin, tried when the
/// first cannot be reached.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ClusterAddress {
    /// DNS name or IP literal, without brackets.
    pub host: String,
    /// UDP (QUIC) and TCP (HTTPS) port.
    pub port: u16,
    /// Pin for the cluster CA; `None` means "verify against platform roots".
    pub fingerprint: Option<Fingerprint>,
    /// The other coordinators, in the order given.
    pub alternates: Vec<HostPort>,
}

impl ClusterAddress {
    /// One coordinator's address with `pin`.
    pub fn single(host: String, port: u16, fingerprint: Option<Fingerprint>) -> ClusterAddress {
        ClusterAddress {
            host,
            port,
            fingerprint,
            alternates: Vec::new(),
        }
    }

    /// The first endpoint's `host:port`, as used for dialing and as the CI
    /// token audience (IPv6 hosts in brackets).
    pub fn host_port(&self) -> String {
        self.primary().to_string()
    }

    /// Every endpoint as `host:port[,host:port…]`, without the pin.
    pub fn hosts(&self) -> String {
        self.endpoints()
            .iter()
            .map(HostPort::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The first endpoint.
    pub fn primary(&self) -> HostPort {
        HostPort {
            host: self.host.clone(),
            port: self.port,
        }
    }

    /// Every endpoint, the first one first.
    pub fn endpoints(&self) -> Vec<HostPort> {
        let mut all = vec![self.primary()];
        all.extend(self.alternates.iter().cloned());
        all
    }

    /// The same cluster reached at `endpoint` alone (for dialing it).
    pub fn at(&self, endpoint: &HostPort) -> ClusterAddress {
        ClusterAddress::single(endpoint.host.clone(), endpoint.port, self.fingerprint)
    }

    /// Whether `other` names the same endpoint (host case-insensitive) with
    /// the same pin.
    pub fn same_cluster(&self, other: &ClusterAddress) -> bool {
        self.host.eq_ignore_ascii_case(&other.host)
            && self.port == other.port
            && self.fingerprint == other.fingerprint
    }
}

impl fmt::Display for ClusterAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.host_port())?;
        for other in &self.alternates {
            write!(f, ",{other}")?;
        }
        if let Some(fp) = &self.fingerprint {
            write!(f, ";sha1:{fp}")?;
        }
        Ok(())
    }
}

impl FromStr for ClusterAddress {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, AddressError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(AddressError::Empty);
        }
        let (endpoint, fingerprint) = match s.split_once(';') {
            Some((endpoint, fp)) => (endpoint, Some(fp.parse::<Fingerprint>()?)),
            None => (s, None),
        };
        let mut endpoints: Vec<HostPort> = Vec::new();
        for one in endpoint.split(',') {
            let (host, port) = split_host_port(one)?;
            let hp = HostPort { host, port };
            if !endpoints
                .iter()
                .any(|e| e.port == hp.port && e.host.eq_ignore_ascii_case(&hp.host))
            {
                endpoints.push(hp);
            }
        }
        if endpoints.len() > MAX_ENDPOINTS {
            return Err(AddressError::TooManyEndpoints(endpoints.len()));
        }
        let mut endpoints = endpoints.into_iter();
        let Some(first) = endpoints.next() else {
            return Err(AddressError::Empty);
        };
        Ok(ClusterAddress {
            host: first.host,
            port: first.port,
            fingerprint,
            alternates: endpoints.collect(),
        })
    }
}

/// Splits `host[:port]`, `[v6][:port]`; a missing port means [`DEFAULT_PORT`].
pub fn split_host_port(endpoint: &str) -> Result<(String, u16), AddressError> {
    let (host, port) = split_host_optional_port(endpoint)?;
    Ok((host, port.unwrap_or(DEFAULT_PORT)))
}

/// Splits `host[:port]`, `[v6][:port]`, telling whether a port was given.
pub fn split_host_optional_port(endpoint: &str) -> Result<(String, Option<u16>), AddressError> {
    let endpoint = endpoint.trim();
    if endpoint.is_empty() {
        return Err(AddressError::MissingHost(endpoint.to_string()));
    }
    let (host, port) = if let Some(rest) = endpoint.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| AddressError::BadHost(endpoint.to_string()))?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(AddressError::BadHost(endpoint.to_string()));
        }
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| AddressError::BadHost(endpoint.to_string()))?,
            ),
        };
        (host.to_string(), port)
    } else {
        match endpoint.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => {
                // A bare IPv6 literal without brackets is ambiguous with a port.
                return Err(AddressError::BadHost(endpoint.to_string()));
            }
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (endpoint.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(AddressError::MissingHost(endpoint.to_string()));
    }
    if !host.contains(':') && !valid_dns_or_ipv4(&host) {
        return Err(AddressError::BadHost(host));
    }
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Some(n),
            _ => return Err(AddressError::BadPort(p.to_string())),
        },
    };
    Ok((host, port))
}

fn valid_dns_or_ipv4(host: &str) -> bool {
    host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn parses_host_port_and_prefixed_fingerprint() {
        let a: ClusterAddress = format!("miren.example.com:8443;sha1:{HEX}")
            .parse()
            .unwrap();
        assert_eq!(a.host, "miren.example.com");
        assert_eq!(a.port, 8443);
        assert_eq!(a.fingerprint.unwrap().to_string(), HEX);
    }

    #[test]
    fn prefix_is_optional_and_case_insensitive() {
        let plain: ClusterAddress = format!("h:1;{HEX}").parse().unwrap();
        let upper: ClusterAddress = format!("h:1;SHA1:{}", HEX.to_uppercase()).parse().unwrap();
        assert_eq!(plain, upper);
        assert_eq!(upper.to_string(), format!("h:1;sha1:{HEX}"));
    }

    #[test]
    fn missing_port_means_default_port() {
        let a: ClusterAddress = format!("cluster.local;sha1:{HEX}").parse().unwrap();
        assert_eq!(a.port, DEFAULT_PORT);
        assert_eq!(
            "h:".parse::<ClusterAddress>(),
            Err(AddressError::BadPort(String::new()))
        );
        assert_eq!(
            "h:0".parse::<ClusterAddress>(),
            Err(AddressError::BadPort("0".into()))
        );
        assert_eq!(
            "h:99999".parse::<ClusterAddress>(),
            Err(AddressError::BadPort("99999".into()))
        );
        assert_eq!(
            "h:+80".parse::<ClusterAddress>(),
            Err(AddressError::BadPort("+80".into()))
        );
    }

    #[test]
    fn ipv6_in_brackets() {
        let a: ClusterAddress = format!("[::1]:8443;sha1:{HEX}").parse().unwrap();
        assert_eq!(a.host, "::1");
        assert_eq!(a.port, 8443);
        assert_eq!(a.host_port(), "[::1]:8443");
        assert_eq!(a.to_string(), format!("[::1]:8443;sha1:{HEX}"));
        assert!(matches!(
            "::1:8443".parse::<ClusterAddress>(),
            Err(AddressError::BadHost(_))
        ));
        assert!(matches!(
            "[zz]:8443".parse::<ClusterAddress>(),
            Err(AddressError::BadHost(_))
        ));
    }

    #[test]
    fn empty_fingerprint_refused() {
        assert_eq!(
            "h:1;".parse::<ClusterAddress>(),
            Err(AddressError::EmptyFingerprint)
        );
        assert_eq!(
            "h:1;sha1:".parse::<ClusterAddress>(),
            Err(AddressError::EmptyFingerprint)
        );
    }

    #[test]
    fn garbage_refused() {
        assert_eq!("".parse::<ClusterAddress>(), Err(AddressError::Empty));
        assert!(matches!(
            ":8443".parse::<ClusterAddress>(),
            Err(AddressError::MissingHost(_))
        ));
        assert!(matches!(
            "h:1;sha1:xyz".parse::<ClusterAddress>(),
            Err(AddressError::BadFingerprint(_))
        ));
        assert!(matches!(
            format!("h:1;sha1:{HEX}00").parse::<ClusterAddress>(),
            Err(AddressError::BadFingerprint(_))
        ));
        assert!(matches!(
            format!("h:1;sha256:{HEX}").parse::<ClusterAddress>(),
            Err(AddressError::UnsupportedDigest(_))
        ));
        assert!(matches!(
            "bad host:1".parse::<ClusterAddress>(),
            Err(AddressError::BadHost(_))
        ));
        assert!(matches!(
            "\u{0}:1".parse::<ClusterAddress>(),
            Err(AddressError::BadHost(_))
        ));
    }

    #[test]
    fn fingerprint_comparison() {
        let der = b"not really a certificate";
        let fp = Fingerprint::of_der(der);
        assert!(fp.matches_der(der));
        assert!(!fp.matches_der(b"another"));
        let reparsed: Fingerprint = format!("SHA1:{}", fp.to_string().to_uppercase())
            .parse()
            .unwrap();
        assert_eq!(fp, reparsed);
        // one hex digit off is another fingerprint
        let mut s = fp.to_string();
        let last = if s.ends_with('0') { '1' } else { '0' };
        s.pop();
        s.push(last);
        assert_ne!(fp, s.parse::<Fingerprint>().unwrap());
    }

    #[test]
    fn several_coordinators_share_one_pin() {
        let a: ClusterAddress = format!("h1:8443, [::1]:9000 ,h3;sha1:{HEX}")
            .parse()
            .unwrap();
        assert_eq!(a.host_port(), "h1:8443", "the first names the cluster");
        let all: Vec<String> = a.endpoints().iter().map(|e| e.to_string()).collect();
        assert_eq!(all, ["h1:8443", "[::1]:9000", "h3:8443"]);
        assert_eq!(
            a.to_string(),
            format!("h1:8443,[::1]:9000,h3:8443;sha1:{HEX}")
        );
        assert_eq!(a.to_string().parse::<ClusterAddress>().unwrap(), a);
        assert_eq!(a.hosts(), "h1:8443,[::1]:9000,h3:8443");
        let second = a.at(&a.alternates[0]);
        assert_eq!(
            (second.host_port(), second.fingerprint),
            ("[::1]:9000".to_string(), a.fingerprint)
        );
        assert!(second.alternates.is_empty());
        // Repeats are dropped; an empty or bad entry is refused.
        let d: ClusterAddress = "h:1,H:1,h:2".parse().unwrap();
        assert_eq!(d.endpoints().len(), 2);
        assert!(matches!(
            "h:1,,h:2".parse::<ClusterAddress>(),
            Err(AddressError::MissingHost(_))
        ));
        assert!(matches!(
            "h:1,bad host".parse::<ClusterAddress>(),
            Err(AddressError::BadHost(_))
        ));
        let many = (1..=17)
            .map(|p| format!("h:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(
            many.parse::<ClusterAddress>(),
            Err(AddressError::TooManyEndpoints(17))
        );
    }

    #[test]
    fn no_fingerprint_is_allowed() {
        let a: ClusterAddress = "h:9".parse().unwrap();
        assert_eq!(a.fingerprint, None);
        assert_eq!(a.to_string(), "h:9");
    }
}
