//! The coordinator's outbound HTTPS client, which resolves names itself and
//! connects only to addresses it has checked.
//!
//! The coordinator fetches on behalf of callers it does not trust: CI
//! issuers' discovery documents and JWKS when anyone presents a token
//! naming a bound issuer, route OIDC providers' discovery, JWKS and token
//! endpoints when any browser reaches a protected route. The URLs come from
//! bindings, provider settings and the documents those servers return, so a
//! DNS name among them may resolve to `127.0.0.1`, `169.254.169.254` or the
//! private network (SSRF by name). A check on the URL alone is not enough:
//! a second lookup at connect time could answer differently (DNS
//! rebinding). So:
//!
//! - names are resolved by [`CheckedResolver`], which judges every address
//!   of the answer with [`identity::AddressPolicy`] and hands reqwest only
//!   that checked answer: hyper connects to exactly those addresses, with
//!   no second lookup. One refused address refuses the whole answer (see
//!   [`identity::AddressPolicy::check_all`] for why it is not dropped);
//! - IP literals never reach a resolver (hyper connects to them directly),
//!   so [`Outbound::get`] and [`Outbound::post`] judge them with the same
//!   policy before a request exists;
//! - no proxy (the proxy, not we, would pick the address), no redirects,
//!   https only, 5 s for the whole exchange.
//!
//! A refusal is typed ([`OutboundError`]), says which name resolved to
//! what and which flag would allow it, and is logged with `tracing` where it
//! happens. Callers that answer anonymous peers should not echo it.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use identity::{AddressClass, AddressPolicy, Refused};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// The whole exchange (connect, request, response body) must fit in this.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// The server flag that would allow a refused address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowedBy(pub Refused);

impl fmt::Display for AllowedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.class {
            AddressClass::Loopback => f.write_str("--oidc-allow-loopback-issuers"),
            _ => write!(f, "--outbound-allow {}", self.0.ip.to_canonical()),
        }
    }
}

/// The addresses of one DNS answer, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer(pub Vec<IpAddr>);

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, ip) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{ip}")?;
        }
        Ok(())
    }
}

/// Why an outbound fetch was not made.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("{url:?} is not an absolute URL with a host")]
    BadUrl { url: String },
    #[error(
        "{url} names {}, a {} address; the coordinator fetches from it only when \
         the server runs with {}",
        .refused.ip, .refused.class, AllowedBy(*.refused)
    )]
    Literal { url: String, refused: Refused },
    #[error(
        "{name} resolved to {answer}, and {} is a {} address; the coordinator fetches \
         from it only when the server runs with {}",
        .refused.ip, .refused.class, AllowedBy(*.refused)
    )]
    Name {
        name: String,
        answer: Answer,
        refused: Refused,
    },
    #[error("resolving {name}: {source}")]
    Resolve {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} resolved to no address")]
    NoAddress { name: String },
}

impl OutboundError {
    /// Whether the same fetch may succeed later: the name did not resolve
    /// (for now), as opposed to a URL or an address the policy refuses.
    pub fn is_transient(&self) -> bool {
        match self {
            OutboundError::Resolve { .. } | OutboundError::NoAddress { .. } => true,
            OutboundError::BadUrl { .. }
            | OutboundError::Literal { .. }
            | OutboundError::Name { .. } => false,
        }
    }

    /// The refusal inside a reqwest error, if the fetch failed because the
    /// resolver refused the name (reqwest keeps it as a source).
    pub fn in_reqwest(err: &reqwest::Error) -> Option<&OutboundError> {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = source {
            if let Some(found) = e.downcast_ref::<OutboundError>() {
                return Some(found);
            }
            source = e.source();
        }
        None
    }
}

/// Judges one DNS answer for `name`: every address must be allowed.
pub fn check_answer(
    policy: &AddressPolicy,
    name: &str,
    answer: &[SocketAddr],
) -> Result<(), OutboundError> {
    if answer.is_empty() {
        return Err(OutboundError::NoAddress {
            name: name.to_string(),
        });
    }
    let ips: Vec<IpAddr> = answer.iter().map(SocketAddr::ip).collect();
    policy
        .check_all(&ips)
        .map_err(|refused| OutboundError::Name {
            name: name.to_string(),
            answer: Answer(ips),
            refused,
        })
}

/// A reqwest resolver that resolves with the system resolver (as reqwest's
/// default does) and returns the answer only when [`check_answer`] allows
/// all of it.
#[derive(Debug, Clone)]
pub struct CheckedResolver {
    policy: Arc<AddressPolicy>,
}

impl CheckedResolver {
    pub fn new(policy: Arc<AddressPolicy>) -> CheckedResolver {
        CheckedResolver { policy }
    }

    /// Resolves `name` and checks the answer.
    pub async fn lookup(&self, name: &str) -> Result<Vec<SocketAddr>, OutboundError> {
        let answer: Vec<SocketAddr> = tokio::net::lookup_host((name, 0))
            .await
            .map_err(|source| OutboundError::Resolve {
                name: name.to_string(),
                source,
            })?
            .collect();
        match check_answer(&self.policy, name, &answer) {
            Ok(()) => Ok(answer),
            Err(e) => {
                tracing::warn!("outbound fetch refused: {e}");
                Err(e)
            }
        }
    }
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let this = self.clone();
        let name = name.as_str().to_string();
        Box::pin(async move {
            let answer = this.lookup(&name).await?;
            Ok(Box::new(answer.into_iter()) as Addrs)
        })
    }
}

/// The coordinator's one outbound HTTPS client (CI issuers, route OIDC
/// providers). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbound {
    client: reqwest::Client,
    policy: Arc<AddressPolicy>,
}

impl Outbound {
    /// A client trusting `tls`'s roots that contacts only what `policy`
    /// allows.
    pub fn new(
        tls: rustls::ClientConfig,
        policy: AddressPolicy,
    ) -> Result<Outbound, reqwest::Error> {
        let policy = Arc::new(policy);
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .dns_resolver(CheckedResolver::new(policy.clone()))
            .no_proxy()
            .https_only(true)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(TIMEOUT)
            .build()?;
        Ok(Outbound { client, policy })
    }

    /// What this client may contact.
    pub fn policy(&self) -> &AddressPolicy {
        &self.policy
    }

    /// A GET of `url`, refused here when its host is an IP literal the
    /// policy does not allow (names are judged when they are resolved).
    pub fn get(&self, url: &str) -> Result<reqwest::RequestBuilder, OutboundError> {
        self.request(reqwest::Method::GET, url)
    }

    /// A POST to `url`; see [`Outbound::get`].
    pub fn post(&self, url: &str) -> Result<reqwest::RequestBuilder, OutboundError> {
        self.request(reqwest::Method::POST, url)
    }

    fn request(
        &self,
        method: reqwest::Method,
        url: &str,
    ) -> Result<reqwest::RequestBuilder, OutboundError> {
        let checked = self.check_url(url);
        if let Err(e) = &checked {
            tracing::warn!("outbound fetch refused: {e}");
        }
        Ok(self.client.request(method, checked?))
    }

    /// The parsed `url`, if its host is a name or an allowed literal.
    fn check_url(&self, url: &str) -> Result<reqwest::Url, OutboundError> {
        let bad = || OutboundError::BadUrl {
            url: url.to_string(),
        };
        let parsed = reqwest::Url::parse(url).map_err(|_| bad())?;
        // The parsed URL is what reqwest connects to; its IPv4 hosts are
        // already normalised (`2130706433`, `127.1` and `0x7f.1` are
        // `127.0.0.1` here), IPv6 hosts are bracketed, and a name never
        // parses as an address.
        let host = parsed.host_str().ok_or_else(bad)?;
        let literal = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .parse::<IpAddr>()
            .ok();
        if let Some(ip) = literal {
            self.policy
                .check(ip)
                .map_err(|refused| OutboundError::Literal {
                    url: url.to_string(),
                    refused,
                })?;
        }
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls() -> rustls::ClientConfig {
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter()
            .map(|s| SocketAddr::new(s.parse().expect("ip"), 0))
            .collect()
    }

    #[test]
    fn an_answer_with_one_internal_address_is_refused_whole() {
        let strict = AddressPolicy::default();
        let answer = addrs(&["93.184.215.14", "10.0.0.5", "2606:2800::1"]);
        let err = check_answer(&strict, "issuer.example", &answer).unwrap_err();
        match &err {
            OutboundError::Name {
                name,
                answer,
                refused,
            } => {
                assert_eq!(name, "issuer.example");
                assert_eq!(answer.0.len(), 3);
                assert_eq!(refused.ip, "10.0.0.5".parse::<IpAddr>().unwrap());
                assert_eq!(refused.class, AddressClass::Private);
                assert_eq!(AllowedBy(*refused).to_string(), "--outbound-allow 10.0.0.5");
            }
            other => panic!("{other:?}"),
        }
        // The message names the name, the answer and the flag.
        let msg = err.to_string();
        for part in [
            "issuer.example",
            "93.184.215.14, 10.0.0.5",
            "private",
            "--outbound-allow",
        ] {
            assert!(msg.contains(part), "{msg}");
        }
        assert!(check_answer(&strict, "a.example", &addrs(&["8.8.8.8", "2606:4700::1"])).is_ok());
        assert!(matches!(
            check_answer(&strict, "a.example", &[]),
            Err(OutboundError::NoAddress { .. })
        ));
        // Mapped forms are judged by the IPv4 inside; loopback names its own flag.
        let err = check_answer(&strict, "a.example", &addrs(&["::ffff:127.0.0.1"])).unwrap_err();
        assert!(
            matches!(err, OutboundError::Name { refused, .. }
                if refused.class == AddressClass::Loopback
                && AllowedBy(refused).to_string() == "--oidc-allow-loopback-issuers"),
            "{err:?}"
        );
        let allowed = AddressPolicy::new(false, vec!["10.0.0.0/8".parse().unwrap()]);
        assert!(check_answer(&allowed, "issuer.example", &answer).is_ok());
    }

    #[tokio::test]
    async fn the_resolver_refuses_localhost_unless_loopback_is_allowed() {
        // `localhost` resolves through /etc/hosts to loopback addresses.
        let strict = CheckedResolver::new(Arc::new(AddressPolicy::default()));
        match strict.lookup("localhost").await {
            Err(OutboundError::Name { name, refused, .. }) => {
                assert_eq!(name, "localhost");
                assert_eq!(refused.class, AddressClass::Loopback);
            }
            other => panic!("{other:?}"),
        }
        let loopback = CheckedResolver::new(Arc::new(AddressPolicy::new(true, vec![])));
        let answer = loopback.lookup("localhost").await.expect("allowed");
        assert!(!answer.is_empty());
        assert!(answer.iter().all(|a| a.ip().is_loopback()), "{answer:?}");
    }

    /// A local TCP listener that counts the connections it gets (and drops
    /// them, so a TLS client fails at once).
    async fn counting_listener() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = count.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(stream);
            }
        });
        (port, count)
    }

    #[tokio::test]
    async fn the_client_connects_only_to_checked_addresses() {
        let (port, connections) = counting_listener().await;
        let strict = Outbound::new(tls(), AddressPolicy::default()).unwrap();
        // A name resolving to loopback: refused by the resolver, typed.
        let err = strict
            .get(&format!(
                "https://localhost:{port}/.well-known/openid-configuration"
            ))
            .expect("a name is judged when resolved")
            .send()
            .await
            .unwrap_err();
        let refusal = OutboundError::in_reqwest(&err).expect("a refusal inside");
        assert!(
            matches!(refusal, OutboundError::Name { name, refused, .. }
                if name == "localhost" && refused.class == AddressClass::Loopback),
            "{refusal:?}"
        );
        // Literals, in every spelling the URL parser normalises.
        for url in [
            format!("https://127.0.0.1:{port}/jwks"),
            format!("https://2130706433:{port}/jwks"),
            format!("https://0x7f.1:{port}/jwks"),
            format!("https://[::ffff:127.0.0.1]:{port}/jwks"),
            format!("https://[::1]:{port}/jwks"),
            "https://169.254.169.254/latest/meta-data".to_string(),
            "https://[fd00::1]/token".to_string(),
        ] {
            assert!(
                matches!(strict.post(&url), Err(OutboundError::Literal { .. })),
                "{url}"
            );
        }
        assert!(matches!(
            strict.get("not a url"),
            Err(OutboundError::BadUrl { .. })
        ));
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 0);

        // With loopback allowed the same name is connected to (the TLS
        // handshake then fails: the listener drops the connection).
        let loopback = Outbound::new(tls(), AddressPolicy::new(true, vec![])).unwrap();
        let err = loopback
            .get(&format!("https://localhost:{port}/"))
            .unwrap()
            .send()
            .await
            .unwrap_err();
        assert!(OutboundError::in_reqwest(&err).is_none(), "{err:?}");
        let err = loopback
            .get(&format!("https://127.0.0.1:{port}/"))
            .unwrap()
            .send()
            .await
            .unwrap_err();
        assert!(OutboundError::in_reqwest(&err).is_none(), "{err:?}");
        assert!(connections.load(std::sync::atomic::Ordering::SeqCst) >= 2);
        // Plain http is never fetched.
        assert!(loopback
            .get(&format!("http://127.0.0.1:{port}/"))
            .unwrap()
            .send()
            .await
            .is_err());
    }
}
