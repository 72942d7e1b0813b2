//! Which IP addresses the coordinator may contact on someone else's behalf.
//!
//! The coordinator fetches OIDC discovery documents, JWKS and token
//! endpoints from URLs that come from outside: an issuer named in a CI
//! binding, a `jwks_uri` or `token_endpoint` named by a discovery document.
//! Without a rule, any of them could point the coordinator at its own
//! loopback services, the cloud metadata endpoint (169.254.169.254) or the
//! private network behind it (server-side request forgery). This module is
//! that rule, pure and in one place: [`classify`] names the range an address
//! is in, [`is_public`] says whether it may be contacted by default, and
//! [`AddressPolicy`] adds what the operator allows on top (loopback for
//! tests, CIDR ranges for an internal provider). The same rule judges IP
//! literals in URLs (at binding time and at fetch time) and the addresses a
//! DNS name resolves to (at fetch time, by the coordinator's resolver).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// The kind of range an address is in. Only [`AddressClass::Public`] is
/// contacted without the operator's permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressClass {
    /// Globally reachable unicast.
    Public,
    /// `0.0.0.0/8` ("this network"; Linux connects `0.0.0.0` to the host
    /// itself) and `::`.
    Unspecified,
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// RFC 1918 (`10/8`, `172.16/12`, `192.168/16`), unique local
    /// `fc00::/7`, deprecated site-local `fec0::/10`.
    Private,
    /// Shared address space `100.64.0.0/10` (carrier-grade NAT).
    Shared,
    /// `169.254.0.0/16` (cloud metadata lives here), `fe80::/10`.
    LinkLocal,
    /// `224.0.0.0/4`, `ff00::/8`.
    Multicast,
    /// `192.0.2/24`, `198.51.100/24`, `203.0.113/24`, `2001:db8::/32`,
    /// `3fff::/20`.
    Documentation,
    /// `198.18.0.0/15`, `2001:2::/48`.
    Benchmarking,
    /// Everything else that is not globally reachable unicast: `240/4` and
    /// broadcast, IETF protocol assignments (`192.0.0/24`, `2001::/23`
    /// with Teredo), the deprecated 6to4 relay `192.88.99/24`, IPv4-compatible
    /// IPv6 (`::a.b.c.d`), and IPv6 outside `2000::/3` (discard `100::/64`,
    /// local NAT64 `64:ff9b:1::/48`, SRv6 `5f00::/16`, unassigned space).
    Reserved,
}

impl AddressClass {
    /// Whether addresses of this class are contacted by default.
    pub fn is_public(self) -> bool {
        self == AddressClass::Public
    }
}

impl fmt::Display for AddressClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressClass::Public => "public",
            AddressClass::Unspecified => "unspecified",
            AddressClass::Loopback => "loopback",
            AddressClass::Private => "private",
            AddressClass::Shared => "shared (carrier-grade NAT)",
            AddressClass::LinkLocal => "link-local",
            AddressClass::Multicast => "multicast",
            AddressClass::Documentation => "documentation",
            AddressClass::Benchmarking => "benchmarking",
            AddressClass::Reserved => "reserved",
        })
    }
}

/// Whether `ip` is globally reachable unicast: the only addresses the
/// coordinator contacts for anyone without the operator's permission.
pub fn is_public(ip: IpAddr) -> bool {
    classify(ip).is_public()
}

/// The range `ip` is in. IPv6 forms that carry an IPv4 address a host
/// would reach over IPv4 (mapped `::ffff:a.b.c.d`, translated
/// `::ffff:0:a.b.c.d`, compatible `::a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4
/// `2002::/16`) are judged by that IPv4 address.
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    use AddressClass::*;
    let [a, b, c, _] = ip.octets();
    match (a, b, c) {
        (0, ..) => Unspecified,
        (127, ..) => Loopback,
        (10, ..) | (172, 16..=31, _) | (192, 168, _) => Private,
        (100, 64..=127, _) => Shared,
        (169, 254, _) => LinkLocal,
        (224..=239, ..) => Multicast,
        (240..=255, ..) => Reserved,
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => Documentation,
        (198, 18..=19, _) => Benchmarking,
        (192, 0, 0) | (192, 88, 99) => Reserved,
        _ => Public,
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    use AddressClass::*;
    let s = ip.segments();
    let low_v4 = || Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if ip.is_unspecified() {
        return Unspecified;
    }
    if ip.is_loopback() {
        return Loopback;
    }
    // IPv4-mapped ::ffff:0:0/96 and IPv4-translated ::ffff:0:0:0/96.
    if (s[..5] == [0; 5] && s[5] == 0xffff) || (s[..4] == [0; 4] && s[4] == 0xffff && s[5] == 0) {
        return classify_v4(low_v4());
    }
    // IPv4-compatible ::/96 (deprecated): never a public destination.
    if s[..6] == [0; 6] {
        return match classify_v4(low_v4()) {
            Public => Reserved,
            other => other,
        };
    }
    // Well-known NAT64 prefix: the translator connects to the IPv4 inside.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return classify_v4(low_v4());
    }
    // 6to4: the IPv4 address is in bits 16..48.
    if s[0] == 0x2002 {
        let v4 = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
        return classify_v4(v4);
    }
    match s[0] {
        0x2001 if s[1] == 0x0002 && s[2] == 0 => Benchmarking,
        0x2001 if s[1] < 0x0200 => Reserved,
        0x2001 if s[1] == 0x0db8 => Documentation,
        0x3fff if s[1] < 0x1000 => Documentation,
        x if x & 0xe000 == 0x2000 => Public,
        x if x & 0xfe00 == 0xfc00 => Private,
        x if x & 0xffc0 == 0xfe80 => LinkLocal,
        x if x & 0xffc0 == 0xfec0 => Private,
        x if x & 0xff00 == 0xff00 => Multicast,
        _ => Reserved,
    }
}

/// An IP range, `ADDR/LEN` (or a bare address: one host). An IPv4-mapped
/// IPv6 range is stored as the IPv4 range it maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpCidr {
    addr: IpAddr,
    len: u8,
}

/// Why a CIDR was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// The address part is not an IP address; holds the input.
    #[error("{0:?} is not an IP address or ADDR/LEN range")]
    BadAddress(String),
    /// The prefix length is not a number up to the family's bits.
    #[error("{input:?}: prefix length must be a number up to {max}")]
    BadLength {
        /// The refused input.
        input: String,
        /// The family's address length in bits (32 or 128).
        max: u8,
    },
    /// The address has bits set past its prefix, so the range meant is
    /// unclear.
    #[error("{input:?} has bits set after its prefix; did you mean {suggestion}?")]
    HostBits {
        /// The refused input.
        input: String,
        /// The range with those bits cleared.
        suggestion: IpCidr,
    },
}

impl IpCidr {
    /// The range of `len` leading bits of `addr`, or `None` when `len` is
    /// too long for the family or `addr` has bits set after it.
    pub fn new(addr: IpAddr, len: u8) -> Option<IpCidr> {
        let cidr = IpCidr::masked(addr, len)?;
        (cidr.addr == canonical(addr, len).0).then_some(cidr)
    }

    fn masked(addr: IpAddr, len: u8) -> Option<IpCidr> {
        let (addr, len) = canonical(addr, len);
        let bits = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if len > bits {
            return None;
        }
        let addr = match addr {
            IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask32(len))),
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask128(len))),
        };
        Some(IpCidr { addr, len })
    }

    /// Whether `ip` (IPv4-mapped IPv6 counting as its IPv4 address) is in
    /// the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => u32::from(ip) & mask32(self.len) == u32::from(net),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(ip) & mask128(self.len) == u128::from(net)
            }
            _ => false,
        }
    }
}

/// A mapped IPv6 range of at least 96 bits is the IPv4 range it maps.
fn canonical(addr: IpAddr, len: u8) -> (IpAddr, u8) {
    match addr {
        IpAddr::V6(v6) if len >= 96 => match v6.to_ipv4_mapped() {
            Some(v4) => (IpAddr::V4(v4), len - 96),
            None => (addr, len),
        },
        _ => (addr, len),
    }
}

fn mask32(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask128(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

impl FromStr for IpCidr {
    type Err = CidrError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let (addr, len) = match input.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (input, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| CidrError::BadAddress(input.to_string()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            // Plain decimal without a leading zero, so `/08` or `/+8` is
            // not read as something the operator did not write.
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= max && n.to_string() == l)
                .ok_or(CidrError::BadLength {
                    input: input.to_string(),
                    max,
                })?,
        };
        match IpCidr::new(addr, len) {
            Some(cidr) => Ok(cidr),
            None => Err(CidrError::HostBits {
                input: input.to_string(),
                suggestion: IpCidr::masked(addr, len).ok_or(CidrError::BadLength {
                    input: input.to_string(),
                    max,
                })?,
            }),
        }
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// What the operator lets the coordinator contact besides public
/// addresses: loopback (`--oidc-allow-loopback-issuers`, for tests and a
/// provider on the same host) and explicit ranges (`--outbound-allow`).
/// The loopback permission covers loopback only, never link-local or
/// private ranges: a flag meant for a local test issuer must not open the
/// cloud metadata endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    allow_loopback: bool,
    allow: Vec<IpCidr>,
}

/// An address the policy refuses, with the range it is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// The refused address.
    pub ip: IpAddr,
    /// The range it is in.
    pub class: AddressClass,
}

impl AddressPolicy {
    /// Public addresses, plus loopback when `allow_loopback`, plus `allow`.
    pub fn new(allow_loopback: bool, allow: Vec<IpCidr>) -> AddressPolicy {
        AddressPolicy {
            allow_loopback,
            allow,
        }
    }

    /// Whether `ip` may be contacted; else the class that refused it.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refused> {
        let class = classify(ip);
        if class.is_public()
            || (class == AddressClass::Loopback && self.allow_loopback)
            || self.allow.iter().any(|c| c.contains(ip))
        {
            Ok(())
        } else {
            Err(Refused { ip, class })
        }
    }

    /// Whether every address of a name's answer may be contacted; else the
    /// first one that may not. An empty answer is allowed here (there is
    /// nothing to connect to; the caller reports it). One refused address
    /// refuses the whole answer rather than being dropped: a name that
    /// resolves to both public and internal addresses is either
    /// misconfigured or someone probing for a rebinding race, and the
    /// operator should hear of it rather than have it half-work.
    pub fn check_all(&self, ips: &[IpAddr]) -> Result<(), Refused> {
        ips.iter().try_for_each(|ip| self.check(*ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AddressClass::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn addresses_are_classified() {
        for (addr, class) in [
            // IPv4
            ("8.8.8.8", Public),
            ("1.1.1.1", Public),
            ("140.82.112.3", Public),
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Unspecified),
            ("127.0.0.1", Loopback),
            ("127.255.255.254", Loopback),
            ("10.0.0.1", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("172.32.0.1", Public),
            ("172.15.255.255", Public),
            ("192.168.1.1", Private),
            ("100.64.0.1", Shared),
            ("100.127.255.255", Shared),
            ("100.128.0.1", Public),
            ("100.63.255.255", Public),
            ("169.254.169.254", LinkLocal),
            ("224.0.0.1", Multicast),
            ("239.255.255.250", Multicast),
            ("240.0.0.1", Reserved),
            ("255.255.255.255", Reserved),
            ("192.0.0.8", Reserved),
            ("192.88.99.1", Reserved),
            ("192.0.2.1", Documentation),
            ("198.51.100.7", Documentation),
            ("203.0.113.9", Documentation),
            ("198.18.0.1", Benchmarking),
            ("198.19.255.255", Benchmarking),
            ("198.20.0.1", Public),
            // IPv6
            ("2606:4700:4700::1111", Public),
            ("2a00:1450:4001::200e", Public),
            ("::", Unspecified),
            ("::1", Loopback),
            ("fc00::1", Private),
            ("fd12:3456::1", Private),
            ("fec0::1", Private),
            ("fe80::1", LinkLocal),
            ("febf::1", LinkLocal),
            ("ff02::1", Multicast),
            ("2001:db8::1", Documentation),
            ("3fff::1", Documentation),
            ("3fff:1000::1", Public),
            ("2001:2::1", Benchmarking),
            ("2001::1", Reserved),
            ("2001:1ff::1", Reserved),
            ("2001:200::1", Public),
            ("100::1", Reserved),
            ("64:ff9b:1::1", Reserved),
            ("5f00::1", Reserved),
            ("4000::1", Reserved),
            // IPv4 inside IPv6: judged by the IPv4 address.
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:10.0.0.1", Private),
            ("::ffff:169.254.169.254", LinkLocal),
            ("::ffff:100.64.0.1", Shared),
            ("::ffff:0.0.0.0", Unspecified),
            ("::ffff:8.8.8.8", Public),
            ("::ffff:0:127.0.0.1", Loopback),
            ("::ffff:0:8.8.8.8", Public),
            ("::127.0.0.1", Loopback),
            ("::10.0.0.1", Private),
            ("::8.8.8.8", Reserved),
            ("64:ff9b::a00:1", Private),
            ("64:ff9b::7f00:1", Loopback),
            ("64:ff9b::808:808", Public),
            ("2002:7f00:1::1", Loopback),
            ("2002:a9fe:a9fe::1", LinkLocal),
            ("2002:808:808::1", Public),
        ] {
            assert_eq!(classify(ip(addr)), class, "{addr}");
            assert_eq!(is_public(ip(addr)), class == Public, "{addr}");
        }
    }

    #[test]
    fn cidrs_parse_and_contain() {
        let c: IpCidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains(ip("10.1.2.3")));
        assert!(c.contains(ip("::ffff:10.1.2.3")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(!c.contains(ip("::a01:203")));
        assert_eq!(c.to_string(), "10.0.0.0/8");
        let host: IpCidr = "192.168.5.5".parse().unwrap();
        assert_eq!(host.to_string(), "192.168.5.5/32");
        assert!(host.contains(ip("192.168.5.5")));
        assert!(!host.contains(ip("192.168.5.6")));
        let v6: IpCidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")));
        assert!(!v6.contains(ip("fc00::1")));
        let mapped: IpCidr = "::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(mapped.to_string(), "10.0.0.0/8");
        let all: IpCidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("169.254.169.254")));
        assert!(!all.contains(ip("fe80::1")));

        assert!(matches!(
            "10.1.2.3/8".parse::<IpCidr>(),
            Err(CidrError::HostBits { suggestion, .. }) if suggestion.to_string() == "10.0.0.0/8"
        ));
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/08",
        ] {
            assert!(
                matches!(bad.parse::<IpCidr>(), Err(CidrError::BadLength { .. })),
                "{bad}"
            );
        }
        for bad in ["", "example.com", "10.0.0/8", "127.1"] {
            assert!(
                matches!(bad.parse::<IpCidr>(), Err(CidrError::BadAddress(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_policy_allows_public_then_what_the_operator_said() {
        let strict = AddressPolicy::default();
        assert_eq!(strict.check(ip("8.8.8.8")), Ok(()));
        assert_eq!(
            strict.check(ip("127.0.0.1")),
            Err(Refused {
                ip: ip("127.0.0.1"),
                class: Loopback
            })
        );
        let loopback = AddressPolicy::new(true, vec![]);
        assert!(loopback.check(ip("127.0.0.1")).is_ok());
        assert!(loopback.check(ip("::1")).is_ok());
        assert!(loopback.check(ip("::ffff:127.0.0.1")).is_ok());
        // Loopback only: not the metadata endpoint, not the LAN.
        assert_eq!(
            loopback.check(ip("169.254.169.254")).map_err(|r| r.class),
            Err(LinkLocal)
        );
        assert_eq!(
            loopback.check(ip("10.0.0.1")).map_err(|r| r.class),
            Err(Private)
        );
        let listed = AddressPolicy::new(false, vec!["10.1.0.0/16".parse().unwrap()]);
        assert!(listed.check(ip("10.1.2.3")).is_ok());
        assert!(listed.check(ip("::ffff:10.1.2.3")).is_ok());
        assert!(listed.check(ip("10.2.0.1")).is_err());
        assert!(listed.check(ip("127.0.0.1")).is_err());

        // One internal answer refuses the whole answer.
        let answer = [ip("93.184.215.14"), ip("10.0.0.5"), ip("2606:2800::1")];
        assert_eq!(
            strict.check_all(&answer),
            Err(Refused {
                ip: ip("10.0.0.5"),
                class: Private
            })
        );
        assert!(listed
            .check_all(&[ip("93.184.215.14"), ip("10.1.0.5")])
            .is_ok());
        assert!(strict.check_all(&[]).is_ok());
    }
}
