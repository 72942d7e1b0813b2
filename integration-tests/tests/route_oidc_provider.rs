//! Route OIDC against a real OpenID provider: `oidc-provider` from npm (a
//! certified implementation) with its development login form, walked by an
//! HTTP client with a cookie jar that follows redirects and submits forms
//! like a browser. Covers the login, spoofed claim headers, a tampered
//! cookie, a replayed `state`, an open-redirect attempt, refresh tokens,
//! logout, `--default` with two Hosts, and the HTTPS ingress (Secure
//! cookies, an `https` callback URL), junk-code callbacks that leave a
//! login in progress to complete and are limited per address (429 with
//! `Retry-After`, the provider not asked). And two coordinators on one etcd:
//! a login, a refresh, a used `state` and a logout through one count on
//! the other.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::{miren, temp, NodeOidcProvider, ProbeCluster, TestTls};
use reqwest::blocking::Client;
use reqwest::cookie::{CookieStore, Jar};
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, COOKIE, LOCATION, RETRY_AFTER, SET_COOKIE};
use reqwest::Url;
use serde_json::Value;

const CLIENT_ID: &str = "miren-route";
const CLIENT_SECRET: &str = "route-secret-4f2a";
const CALLBACK: &str = "/.well-known/miren/oidc/callback";

/// One response seen while following redirects.
#[derive(Debug)]
struct Hop {
    url: Url,
    status: u16,
    set_cookies: Vec<String>,
}

/// Where a walk ended.
#[derive(Debug)]
struct Page {
    url: Url,
    status: u16,
    body: String,
}

/// A browser-like client: a cookie jar, `Accept: text/html`, redirects
/// followed by hand so each hop can be inspected, forms submitted.
struct Browser {
    client: Client,
    jar: Arc<Jar>,
    hops: Vec<Hop>,
}

impl Browser {
    /// Resolves each `(host, addr)` to `addr` and trusts the CA `ca` (and
    /// `extra_ca`) for HTTPS.
    fn new(ca: &Path, extra_ca: Option<&str>, hosts: &[(&str, SocketAddr)]) -> Browser {
        let jar = Arc::new(Jar::default());
        let mut headers = HeaderMap::new();
        headers.insert(
            ACCEPT,
            HeaderValue::from_static("text/html,application/xhtml+xml"),
        );
        let mut b = Client::builder()
            .cookie_provider(jar.clone())
            .default_headers(headers)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .add_root_certificate(
                reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap(),
            );
        if let Some(pem) = extra_ca {
            b = b.add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap());
        }
        for (host, addr) in hosts {
            b = b.resolve(host, *addr);
        }
        Browser {
            client: b.build().unwrap(),
            jar,
            hops: vec![],
        }
    }

    /// Sends a request and follows redirects (as GETs) to the end.
    fn walk(&mut self, mut req: reqwest::blocking::RequestBuilder) -> Page {
        for _ in 0..20 {
            let resp = req.send().expect("request");
            let url = resp.url().clone();
            let status = resp.status().as_u16();
            let set_cookies = resp
                .headers()
                .get_all(SET_COOKIE)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect();
            self.hops.push(Hop {
                url: url.clone(),
                status,
                set_cookies,
            });
            if resp.status().is_redirection() {
                let location = resp.headers()[LOCATION].to_str().unwrap().to_string();
                req = self.client.get(url.join(&location).unwrap());
                continue;
            }
            return Page {
                url,
                status,
                body: resp.text().unwrap(),
            };
        }
        panic!("more than 20 redirects: {:#?}", self.hops);
    }

    fn get(&mut self, url: &str, extra: &[(&str, &str)]) -> Page {
        let mut req = self.client.get(url);
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        self.walk(req)
    }

    /// Fills in the first form of `page` (its hidden fields plus `fields`)
    /// and submits it.
    fn submit(&mut self, page: &Page, fields: &[(&str, &str)]) -> Page {
        let form = &page.body[page.body.find("<form").expect("a form")..];
        let form = &form[..form.find("</form>").expect("form end")];
        let action = attr(form, "action").expect("form action");
        let mut values: Vec<(String, String)> = form
            .split("<input")
            .skip(1)
            .filter(|i| attr(i, "type").as_deref() == Some("hidden"))
            .filter_map(|i| Some((attr(i, "name")?, attr(i, "value").unwrap_or_default())))
            .collect();
        for (k, v) in fields {
            values.push((k.to_string(), v.to_string()));
        }
        let req = self
            .client
            .post(page.url.join(&action).unwrap())
            .form(&values);
        self.walk(req)
    }

    /// Signs in as `login` on the provider's development form (and its
    /// consent page) until the walk leaves the provider.
    fn sign_in(&mut self, mut page: Page, provider: &str, login: &str) -> Page {
        for _ in 0..4 {
            if !page.url.as_str().starts_with(provider) {
                return page;
            }
            assert_eq!(page.status, 200, "provider page: {}", page.body);
            page = if page.body.contains(r#"name="login""#) {
                self.submit(&page, &[("login", login), ("password", "any password")])
            } else {
                self.submit(&page, &[])
            };
        }
        panic!("still at the provider: {} {}", page.url, page.body);
    }

    /// The value of cookie `name` the jar would send to `url`.
    fn cookie(&self, url: &str, name: &str) -> Option<String> {
        let header = self.jar.cookies(&Url::parse(url).unwrap())?;
        header
            .to_str()
            .unwrap()
            .split("; ")
            .find_map(|c| c.strip_prefix(&format!("{name}=")).map(str::to_string))
    }

    /// The `state` and the login cookie (`name=value`) of the login this
    /// browser's walk started: the gate's answer is the first hop, the
    /// provider's authorization request the second.
    fn started_login(&self) -> (String, String) {
        let state = self.hops[1]
            .url
            .query_pairs()
            .find(|(k, _)| k == "state")
            .map(|(_, v)| v.into_owned())
            .expect("state");
        let login_cookie = self.hops[0]
            .set_cookies
            .iter()
            .find(|c| c.starts_with(&format!("miren_oidc_login_{}=", &state[..12])))
            .map(|c| c.split(';').next().unwrap().to_string())
            .expect("login cookie");
        (state, login_cookie)
    }

    /// The first hop whose URL path is `path`.
    fn hop_at(&self, path: &str) -> &Hop {
        self.hops
            .iter()
            .find(|h| h.url.path() == path)
            .unwrap_or_else(|| panic!("no hop at {path}: {:#?}", self.hops))
    }
}

/// Value of attribute `name` in an HTML tag fragment (double-quoted).
fn attr(tag: &str, name: &str) -> Option<String> {
    let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    let end = tag[start..].find('"')? + start;
    Some(
        tag[start..end]
            .replace("&amp;", "&")
            .replace("&#x2F;", "/")
            .replace("&#39;", "'")
            .replace("&quot;", "\""),
    )
}

fn json(page: &Page) -> Value {
    serde_json::from_str(&page.body).unwrap_or_else(|e| panic!("{e}: {}", page.body))
}

/// How many tokens each grant type has issued at the provider.
fn grants(provider: &NodeOidcProvider, ca: &Path) -> Value {
    let client = Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap())
        .build()
        .unwrap();
    client
        .get(format!("{}/_test/grants", provider.url))
        .send()
        .unwrap()
        .json()
        .unwrap()
}

fn enable(config: &Path, target: &str, provider: &NodeOidcProvider) {
    let en = miren(
        config,
        &[
            "route",
            "oidc",
            "enable",
            target,
            "--provider",
            "node",
            "--provider-url",
            &provider.url,
            "--client-id",
            CLIENT_ID,
            "--client-secret",
            CLIENT_SECRET,
            // The documented forms: scopes and claim headers as separate
            // words after one flag (the login below needs the email scope
            // and both headers, so a misparse fails it).
            "--scope",
            "openid",
            "email",
            "profile",
            "--claim-header",
            "email:X-User-Email",
            "groups:X-User-Groups",
        ],
        &[],
    );
    assert!(en.ok, "{en:?}");
    // It says what to register at the provider.
    if target != "--default" {
        assert!(
            en.stdout
                .contains(&format!("https://{target}/.well-known/miren/oidc/callback")),
            "{}",
            en.stdout
        );
    }
    assert!(
        !en.stdout.contains(CLIENT_SECRET),
        "secret printed: {}",
        en.stdout
    );
}

/// The probe app routed at `route` (a host or `--default`) and protected
/// by a real provider, whose client accepts the callback of each of
/// `hosts`; the ingress is plain HTTP, or HTTPS with `https` (the cluster's
/// server certificate then names every host).
struct Protected {
    tls: TestTls,
    cluster: ProbeCluster,
    provider: NodeOidcProvider,
    ingress: SocketAddr,
    scheme: &'static str,
    dir: tempfile::TempDir,
}

impl Protected {
    fn start(route: &str, hosts: &[&str], https: bool, id_token_ttl_secs: u64) -> Protected {
        let dir = temp();
        let tls = TestTls::generate(dir.path());
        let mut args = vec![
            "--labs".to_string(),
            "routeoidc".into(),
            // The provider listens on 127.0.0.1.
            "--oidc-allow-loopback-issuers".into(),
            "--oidc-ca-file".into(),
            tls.ca.to_str().unwrap().into(),
        ];
        let (listen, printed, scheme) = if https {
            args.extend(["--name".into(), "127.0.0.1".into()]);
            for h in hosts {
                args.extend(["--name".into(), h.to_string()]);
            }
            ("--ingress-https-listen", "HTTPS ingress: https://", "https")
        } else {
            ("--http-listen", "HTTP ingress: http://", "http")
        };
        args.extend([listen.into(), "127.0.0.1:0".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let cluster = ProbeCluster::start(dir.path(), &args, "web");
        let ingress: SocketAddr = cluster.server.printed_address(printed).parse().unwrap();
        let callbacks: Vec<String> = hosts
            .iter()
            .map(|h| format!("{scheme}://{h}:{}{CALLBACK}", ingress.port()))
            .collect();
        let provider = NodeOidcProvider::start(
            dir.path(),
            &tls,
            CLIENT_ID,
            CLIENT_SECRET,
            &callbacks,
            id_token_ttl_secs,
        );
        // `route` is a host or the flag `--default`: the same argument list.
        let set = miren(&cluster.config, &["route", "set", route, "-a", "web"], &[]);
        assert!(set.ok, "{set:?}");
        enable(&cluster.config, route, &provider);
        Protected {
            tls,
            cluster,
            provider,
            ingress,
            scheme,
            dir,
        }
    }

    /// `scheme://host:port` of the app at `host`.
    fn base(&self, host: &str) -> String {
        format!("{}://{host}:{}", self.scheme, self.ingress.port())
    }
}

#[test]
fn login_through_a_real_provider_and_the_ingress_is_airtight() {
    // ID tokens live 4 s, so the session needs its refresh token soon.
    let p = Protected::start("sso.test", &["sso.test"], false, 4);
    let (tls, provider, ingress) = (&p.tls, &p.provider, p.ingress);
    let app = p.base("sso.test");
    let mut browser = Browser::new(&tls.ca, None, &[("sso.test", ingress)]);

    // A spoofed header without a session: sent to the provider's login
    // form, so the app never sees it.
    let page = browser.get(
        &format!("{app}/headers?x=1"),
        &[("X-User-Email", "evil@example.com")],
    );
    assert!(page.url.as_str().starts_with(&provider.url), "{}", page.url);
    assert!(page.body.contains(r#"name="login""#), "{}", page.body);
    let authorize = &browser.hops[1].url;
    let q: std::collections::HashMap<_, _> = authorize.query_pairs().into_owned().collect();
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["client_id"], CLIENT_ID);
    assert_eq!(q["redirect_uri"], format!("{app}{CALLBACK}"));
    assert!(q["state"].len() >= 32 && q["nonce"].len() >= 32, "{q:?}");
    // One login cookie per login, named after its state.
    let (_, login_cookie) = browser.started_login();

    // Sign in on the provider's form; back at the page first asked for.
    let page = browser.sign_in(page, &provider.url, "alice@example.com");
    assert_eq!(page.url.as_str(), format!("{app}/headers?x=1"));
    assert_eq!(page.status, 200, "{}", page.body);
    let seen = json(&page);
    assert_eq!(seen["x-user-email"], "alice@example.com", "{seen}");
    assert_eq!(seen["x-user-groups"], r#"["dev","ops"]"#, "{seen}");
    assert!(
        !page.body.contains("miren_oidc"),
        "session reached the app: {seen}"
    );
    let set = browser
        .hop_at(CALLBACK)
        .set_cookies
        .iter()
        .find(|c| c.starts_with("miren_oidc_session="))
        .expect("session cookie")
        .clone();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Lax"),
        "{set}"
    );
    assert!(
        !set.contains("Secure"),
        "Secure cookie over plain HTTP: {set}"
    );
    let session = browser.cookie(&app, "miren_oidc_session").unwrap();

    // With a session, spoofed values (any case, `_` for `-`) are replaced.
    let page = browser.get(
        &format!("{app}/headers"),
        &[
            ("x-user-email", "evil@example.com"),
            ("X_User_Email", "evil2@example.com"),
            ("X-USER-GROUPS", "admins"),
        ],
    );
    let seen = json(&page);
    assert!(
        !page.body.contains("evil") && !page.body.contains("admins"),
        "{seen}"
    );
    assert_eq!(seen["x-user-email"], "alice@example.com", "{seen}");

    // The callback's state cannot be replayed, even with its login cookie.
    let callback = browser.hop_at(CALLBACK).url.clone();
    let raw = Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .resolve("sso.test", ingress)
        .build()
        .unwrap();
    let replay = raw
        .get(callback.clone())
        .header(COOKIE, &login_cookie)
        .send()
        .unwrap();
    assert_eq!(replay.status(), 400);
    assert!(replay.text().unwrap().contains("already used"));

    // A tampered session cookie is refused.
    let mut bad = session.clone().into_bytes();
    let i = bad.len() / 2;
    bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
    let r = raw
        .get(format!("{app}/headers"))
        .header(
            COOKIE,
            format!("miren_oidc_session={}", String::from_utf8(bad).unwrap()),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);

    // The ID token expires after 4 s; the refresh token renews the session
    // without a login, once for several concurrent requests.
    let before = grants(provider, &tls.ca)["refresh_token"]
        .as_u64()
        .unwrap_or(0);
    std::thread::sleep(Duration::from_secs(5));
    let cookie = format!("miren_oidc_session={session}");
    let answers: Vec<(u16, String, Vec<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let raw = raw.clone();
                let (app, cookie) = (&app, &cookie);
                s.spawn(move || {
                    let r = raw
                        .get(format!("{app}/headers"))
                        .header(COOKIE, cookie)
                        .send()
                        .unwrap();
                    let cookies = r
                        .headers()
                        .get_all(SET_COOKIE)
                        .iter()
                        .map(|v| v.to_str().unwrap().to_string())
                        .collect();
                    (r.status().as_u16(), r.text().unwrap(), cookies)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (status, body, cookies) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert!(body.contains("alice@example.com"), "{body}");
        assert!(
            cookies.iter().any(|c| c.starts_with("miren_oidc_session=")),
            "no renewed cookie: {cookies:?}"
        );
    }
    let after = grants(provider, &tls.ca)["refresh_token"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(
        after,
        before + 1,
        "one refresh at the provider for 4 requests"
    );
    // The browser's own walk refreshes its cookie too.
    let page = browser.get(&format!("{app}/headers"), &[]);
    assert_eq!(json(&page)["x-user-email"], "alice@example.com");

    // No way around the claim headers through HTTP/1.1 hop-by-hop
    // mechanics: an h2c upgrade is refused; a header named in Connection
    // is removed, not the claim header; trailers are not announced.
    let r = raw
        .get(format!("{app}/headers"))
        .header(COOKIE, &cookie)
        .header("upgrade", "h2c")
        .header("connection", "Upgrade, HTTP2-Settings")
        .header("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA")
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = raw
        .get(format!("{app}/headers"))
        .header(COOKIE, &cookie)
        .header("connection", "X-User-Email, X-Extra")
        .header("x-extra", "1")
        .header("trailer", "X-User-Email")
        .send()
        .unwrap();
    let seen: Value = r.json().unwrap();
    assert_eq!(seen["x-user-email"], "alice@example.com", "{seen}");
    assert!(
        seen.get("x-extra").is_none() && seen.get("trailer").is_none(),
        "{seen}"
    );
    // Another cookie with raw UTF-8 in its value (as browsers send) does
    // not hide the session, and reaches the app unchanged.
    let mut with_utf8 = format!("{cookie}; theirs=caf").into_bytes();
    with_utf8.extend_from_slice("é".as_bytes());
    let r = raw
        .get(format!("{app}/headers"))
        .header(
            COOKIE,
            reqwest::header::HeaderValue::from_bytes(&with_utf8).unwrap(),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().unwrap();
    assert_eq!(seen["x-user-email"], "alice@example.com", "{seen}");
    assert!(
        seen["cookie"].as_str().unwrap().starts_with("theirs=caf"),
        "{seen}"
    );

    // Logins started in two tabs do not clash: each comes back to its
    // own page.
    let mut tabs = Browser::new(&tls.ca, None, &[("sso.test", ingress)]);
    let first = tabs.get(&format!("{app}/headers?tab=1"), &[]);
    let second = tabs.get(&format!("{app}/headers?tab=2"), &[]);
    let first = tabs.sign_in(first, &provider.url, "frank@example.com");
    assert_eq!(
        first.url.as_str(),
        format!("{app}/headers?tab=1"),
        "{}",
        first.body
    );
    let second = tabs.sign_in(second, &provider.url, "frank@example.com");
    assert_eq!(
        second.url.as_str(),
        format!("{app}/headers?tab=2"),
        "{}",
        second.body
    );
    assert_eq!(json(&second)["x-user-email"], "frank@example.com");

    // An open-redirect attempt lands on "/" (the provider remembers the
    // user, so no form this time, or a consent at most).
    let mut fresh = Browser::new(&tls.ca, None, &[("sso.test", ingress)]);
    let page = fresh.get(&format!("{app}//evil.example.com/x"), &[]);
    let page = fresh.sign_in(page, &provider.url, "bob@example.com");
    assert_eq!(page.url.as_str(), format!("{app}/"), "{:#?}", fresh.hops);
    assert!(fresh
        .hops
        .iter()
        .all(|h| h.url.host_str() != Some("evil.example.com")));

    // Logout ends the session (a copy of the cookie too) and goes on to the
    // provider's end_session_endpoint.
    let page = browser.get(&format!("{app}/.well-known/miren/oidc/logout"), &[]);
    assert!(
        page.url
            .as_str()
            .starts_with(&format!("{}/session/end", provider.url)),
        "{}",
        page.url
    );
    assert!(browser.cookie(&app, "miren_oidc_session").is_none());
    let r = raw
        .get(format!("{app}/headers"))
        .header(COOKIE, format!("miren_oidc_session={session}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401, "session still valid after logout");

    // A refresh that cannot be had (here: the provider is gone) ends the
    // session: 401, and the cookie is cleared so it is not sent again.
    let tab_session = tabs.cookie(&app, "miren_oidc_session").unwrap();
    let Protected { provider, .. } = p;
    drop(provider);
    std::thread::sleep(Duration::from_secs(5));
    let r = raw
        .get(format!("{app}/headers"))
        .header(COOKIE, format!("miren_oidc_session={tab_session}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    let cleared = r.headers().get_all(SET_COOKIE).iter().any(|c| {
        c.to_str().unwrap().starts_with("miren_oidc_session=;")
            && c.to_str().unwrap().contains("Max-Age=0")
    });
    assert!(cleared, "{:?}", r.headers());
}

#[test]
fn default_route_serves_two_hosts_each_with_its_own_session() {
    let p = Protected::start("--default", &["one.test", "two.test"], false, 300);
    let (tls, cluster, provider, ingress) = (&p.tls, &p.cluster, &p.provider, p.ingress);
    let (one, two) = (p.base("one.test"), p.base("two.test"));
    let show = miren(
        &cluster.config,
        &["route", "oidc", "show", "--default"],
        &[],
    );
    assert!(show.ok && show.stdout.contains("node"), "{show:?}");
    assert!(!show.stdout.contains(CLIENT_SECRET), "{}", show.stdout);

    let mut browser = Browser::new(
        &tls.ca,
        None,
        &[("one.test", ingress), ("two.test", ingress)],
    );
    // The second host needs no form: the provider remembers the user (its
    // own single sign-on), but the ingress session is per host.
    for (base, forms) in [(&one, 2), (&two, 0)] {
        let page = browser.get(&format!("{base}/headers"), &[]);
        // The callback URL follows the Host the request came with.
        assert!(
            browser.hops.iter().any(|h| h
                .url
                .query_pairs()
                .any(|(k, v)| k == "redirect_uri" && v == format!("{base}{CALLBACK}"))),
            "{:#?}",
            browser.hops
        );
        let page = browser.sign_in(page, &provider.url, "dora@example.com");
        assert_eq!(page.url.as_str(), format!("{base}/headers"));
        assert_eq!(
            json(&page)["x-user-email"],
            "dora@example.com",
            "{}",
            page.body
        );
        let posted = browser
            .hops
            .iter()
            .filter(|h| h.url.path().starts_with("/interaction/") && h.status == 303)
            .count();
        assert_eq!(posted, forms, "{:#?}", browser.hops);
        browser.hops.clear();
    }
    // A session is bound to its host: one.test's cookie means nothing at
    // two.test.
    let one_session = browser.cookie(&one, "miren_oidc_session").unwrap();
    let raw = Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .resolve("two.test", ingress)
        .build()
        .unwrap();
    let r = raw
        .get(format!("{two}/headers"))
        .header(COOKIE, format!("miren_oidc_session={one_session}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    // A Host that is not a plain name cannot shape the callback URL.
    let r = raw
        .get(format!("{two}/headers"))
        .header("host", "evil.test@two.test")
        .header(ACCEPT, "text/html")
        .send()
        .unwrap();
    assert_eq!(r.status(), 400, "{:?}", r.text());
}

#[test]
fn https_ingress_sets_secure_cookies_and_an_https_callback() {
    let p = Protected::start("secure.test", &["secure.test"], true, 300);
    let (tls, cluster, provider, ingress) = (&p.tls, &p.cluster, &p.provider, p.ingress);
    let app = p.base("secure.test");
    // The ingress serves the cluster CA's server certificate, which names
    // every --name.
    let cluster_ca = std::fs::read_to_string(cluster.server.data_dir.join("ca.crt")).unwrap();
    let mut browser = Browser::new(&tls.ca, Some(&cluster_ca), &[("secure.test", ingress)]);
    let page = browser.get(&format!("{app}/headers"), &[]);
    let page = browser.sign_in(page, &provider.url, "carol@example.com");
    assert_eq!(page.url.as_str(), format!("{app}/headers"));
    let seen = json(&page);
    assert_eq!(seen["x-user-email"], "carol@example.com", "{seen}");
    assert_eq!(seen["x-forwarded-proto"], "https", "{seen}");
    assert!(browser
        .hops
        .iter()
        .any(|h| h.url.as_str().starts_with(&format!("{app}{CALLBACK}"))));
    // Over HTTPS our cookies are `__Host-` cookies (Secure, Path=/, no
    // Domain), which no sibling host can plant.
    let ours: Vec<&String> = browser
        .hops
        .iter()
        .flat_map(|h| &h.set_cookies)
        .filter(|c| c.contains("miren_oidc_"))
        .collect();
    assert!(ours.len() >= 3, "login, session, login cleared: {ours:?}");
    for c in ours {
        assert!(
            c.starts_with("__Host-miren_oidc_")
                && c.contains("; Secure")
                && c.contains("Path=/;")
                && !c.contains("Domain"),
            "{c}"
        );
    }
    assert!(browser.cookie(&app, "__Host-miren_oidc_session").is_some());
}

/// The same login in a real headless browser (Debian's chromium through
/// playwright-core). `scripts/test.sh` installs chromium; set
/// `MIREN_SKIP_BROWSER_TEST=1` to skip this test where it cannot be.
#[test]
fn login_in_a_real_headless_browser() {
    let chromium = Path::new("/usr/bin/chromium");
    if !chromium.exists() {
        assert!(
            std::env::var_os("MIREN_SKIP_BROWSER_TEST").is_some(),
            "{} is missing: run ./scripts/test.sh (it installs Debian's chromium), or set MIREN_SKIP_BROWSER_TEST=1",
            chromium.display()
        );
        eprintln!("skipped: no chromium and MIREN_SKIP_BROWSER_TEST is set");
        return;
    }
    let p = Protected::start("browser.test", &["browser.test"], false, 300);
    let app = p.base("browser.test");

    let config = p.dir.path().join("browser.json");
    let json_config = serde_json::json!({
        "chromium": chromium, "url": format!("{app}/headers"),
        "map_hosts": ["browser.test"], "login": "erin@example.com",
    });
    std::fs::write(&config, json_config.to_string()).unwrap();
    let node = integration_tests::node_fixtures();
    let out = std::process::Command::new("node")
        .arg(node.join("browser_login.mjs"))
        .arg(&config)
        .current_dir(&node)
        .output()
        .expect("node");
    assert!(
        out.status.success(),
        "browser login failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(result["url"], format!("{app}/headers"), "{result}");
    let seen: Value = serde_json::from_str(result["body"].as_str().unwrap()).unwrap();
    assert_eq!(seen["x-user-email"], "erin@example.com", "{seen}");
    let session = result["cookies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "miren_oidc_session")
        .unwrap_or_else(|| panic!("no session cookie in the browser: {result}"));
    assert_eq!(session["httpOnly"], true, "{session}");
    assert_eq!(session["sameSite"], "Lax", "{session}");
}

/// A route's protection belongs to its host: `route set` keeps it, and a
/// server started without the labs flag answers 503 on it (fails closed)
/// instead of proxying requests the app would take as signed in, until
/// `route oidc disable` (which works without the flag) opens it up.
#[test]
fn protection_outlives_route_set_and_fails_closed_without_labs() {
    let p = Protected::start("keep.test", &["keep.test"], false, 300);
    let Protected {
        cluster, dir, tls, ..
    } = p;
    let ProbeCluster {
        server,
        runner: _runner,
        config,
    } = cluster;
    let raw = |ingress: SocketAddr| {
        Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .resolve("keep.test", ingress)
            .build()
            .unwrap()
    };
    let ingress: SocketAddr = server
        .printed_address("HTTP ingress: http://")
        .parse()
        .unwrap();
    let spoofed = |ingress: SocketAddr| {
        raw(ingress)
            .get(format!("http://keep.test:{}/headers", ingress.port()))
            .header("x-user-email", "evil@example.com")
            .send()
            .unwrap()
    };
    // Pointing the host at an app again keeps its protection.
    let set = miren(&config, &["route", "set", "keep.test", "-a", "web"], &[]);
    assert!(set.ok, "{set:?}");
    assert_eq!(spoofed(ingress).status(), 401);

    // Restart on the same address without --labs routeoidc.
    let listen = server.host_port().to_string();
    let (stopped, out) = server.stop();
    assert!(stopped, "{out}");
    let server = integration_tests::Server::start(
        &dir.path().join("coord"),
        &config,
        &listen,
        &[
            "--http-listen",
            "127.0.0.1:0",
            "--oidc-ca-file",
            tls.ca.to_str().unwrap(),
        ],
    );
    let ingress: SocketAddr = server
        .printed_address("HTTP ingress: http://")
        .parse()
        .unwrap();
    let r = spoofed(ingress);
    assert_eq!(r.status(), 503);
    let body = r.text().unwrap();
    assert!(body.contains("--labs routeoidc"), "{body}");

    let off = miren(&config, &["route", "oidc", "disable", "keep.test"], &[]);
    assert!(off.ok, "{off:?}");
    assert!(
        integration_tests::wait_for(Duration::from_secs(30), || spoofed(ingress).status() == 200),
        "the unprotected route never served"
    );
}

/// The ingress reuses connections to sandboxes (`coordinator::upstream`),
/// but never a protected route's: two signed-in users' requests, sent in
/// turn, each come to the app on a connection of their own, with their own
/// claim headers and request id.
#[test]
fn a_protected_routes_requests_each_get_a_connection_of_their_own() {
    let p = Protected::start("sso.test", &["sso.test"], false, 300);
    let app = p.base("sso.test");
    let mut users = Vec::new();
    for login in ["alice@example.com", "bob@example.com"] {
        let mut b = Browser::new(&p.tls.ca, None, &[("sso.test", p.ingress)]);
        let page = b.get(&format!("{app}/conn"), &[]);
        let page = b.sign_in(page, &p.provider.url, login);
        assert_eq!(page.status, 200, "{}", page.body);
        assert_eq!(json(&page)["user"], login, "{}", page.body);
        users.push((login, b));
    }
    for round in 0..20 {
        for (login, b) in users.iter_mut() {
            let id = format!("{login}-{round}");
            let page = b.get(&format!("{app}/conn"), &[("X-Request-Id", &id)]);
            assert_eq!(page.status, 200, "{}", page.body);
            let seen = json(&page);
            assert_eq!(seen["request_id"], id.as_str(), "{seen}");
            assert_eq!(seen["user"], *login, "{seen}");
            assert_eq!(
                seen["served"], 1,
                "a protected route's connection to the app carried another request: {seen}"
            );
        }
    }
}

/// A login's `state` is taken only once the provider completed the login:
/// callbacks with what anyone gets from the gate (a sealed login cookie and
/// its state) and codes the provider refuses take nothing, so they neither
/// burn that login nor fill the coordinator's bound on used states. They
/// are bounded per address, though: past a burst, a callback is answered
/// 429 with `Retry-After` without the provider being asked. Once that wait
/// is over the genuine callback for the same state, from the same address
/// (every client here is 127.0.0.1), signs the user in.
#[test]
fn junk_code_callbacks_are_limited_per_address_and_leave_the_login_in_progress_to_complete() {
    // The coordinator's `sso::CALLBACK_BURST`, then one a second.
    const BURST: u32 = 10;
    let p = Protected::start("sso.test", &["sso.test"], false, 300);
    let app = p.base("sso.test");
    let mut browser = Browser::new(&p.tls.ca, None, &[("sso.test", p.ingress)]);
    let page = browser.get(&format!("{app}/headers"), &[]);
    assert!(
        page.url.as_str().starts_with(&p.provider.url),
        "{}",
        page.url
    );
    let (state, login_cookie) = browser.started_login();

    let raw = Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .resolve("sso.test", p.ingress)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let started = Instant::now();
    let mut refused_by_provider: u32 = 0;
    let (retry_after, body) = loop {
        // One a second gets through after the burst: a provider slower
        // than that would never see the limit, and neither would this loop.
        assert!(
            refused_by_provider < 200,
            "no 429 after {refused_by_provider} junk callbacks in {:?}",
            started.elapsed()
        );
        let mut junk = Url::parse(&format!("{app}{CALLBACK}")).unwrap();
        junk.query_pairs_mut()
            .append_pair("code", &format!("junk-{refused_by_provider}"))
            .append_pair("state", &state);
        let r = raw.get(junk).header(COOKIE, &login_cookie).send().unwrap();
        let status = r.status().as_u16();
        let retry_after = r
            .headers()
            .get(RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_string());
        let body = r.text().unwrap();
        match status {
            502 => refused_by_provider += 1,
            429 => break (retry_after, body),
            _ => panic!("junk callback {refused_by_provider}: {status} {body}"),
        }
    };
    let elapsed = started.elapsed();
    // The whole burst reached the provider (which refused each code), and
    // no more than one a second after it.
    assert!(refused_by_provider >= BURST, "{refused_by_provider}");
    assert!(
        f64::from(refused_by_provider) <= f64::from(BURST) + elapsed.as_secs_f64(),
        "{refused_by_provider} junk callbacks reached the provider in {elapsed:?}"
    );
    let retry_after: u64 = retry_after
        .expect("a 429 says when to retry")
        .parse()
        .expect("Retry-After in seconds");
    assert!(retry_after >= 1, "{retry_after}");
    assert!(
        body.contains(&format!(
            "too many sign-in attempts from this address; retry after {retry_after} s"
        )),
        "{body}"
    );
    // The limited callback was answered before the provider was asked.
    let seen = grants(&p.provider, &p.tls.ca);
    assert_eq!(
        seen["authorization_code_refused"], refused_by_provider,
        "{seen}"
    );

    std::thread::sleep(Duration::from_secs(retry_after));
    // The genuine callback, for that same state, completes the login.
    let page = browser.sign_in(page, &p.provider.url, "alice@example.com");
    let callback = browser.hop_at(CALLBACK);
    let came_back_with = callback
        .url
        .query_pairs()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.into_owned());
    assert_eq!(came_back_with.as_deref(), Some(state.as_str()));
    assert_eq!(page.status, 200, "{}: {}", page.url, page.body);
    assert_eq!(page.url.as_str(), format!("{app}/headers"));
    assert!(
        callback
            .set_cookies
            .iter()
            .any(|c| c.starts_with("miren_oidc_session=")),
        "no session cookie: {:?}",
        callback.set_cookies
    );
    let seen = json(&page);
    assert_eq!(seen["x-user-email"], "alice@example.com", "{seen}");
    assert_eq!(seen["x-user-groups"], r#"["dev","ops"]"#, "{seen}");
    let seen = grants(&p.provider, &p.tls.ca);
    assert_eq!(seen["authorization_code"], 1, "{seen}");
}

/// Whether a request with a session got past the route's gate: the app
/// answered with the session's claims.
fn past_the_gate(status: u16, body: &str) -> bool {
    status == 200 && body.contains("alice@example.com")
}

#[test]
fn two_coordinators_on_one_etcd_share_sessions_states_refreshes_and_logouts() {
    let dir = temp();
    let tls = TestTls::generate(dir.path());
    let etcd = integration_tests::etcd::EtcdCluster::start(dir.path(), 1);
    let endpoints = etcd.endpoints();
    let ca = tls.ca.to_str().unwrap().to_string();
    let common = [
        "--etcd",
        &endpoints,
        "--labs",
        "routeoidc",
        "--oidc-allow-loopback-issuers",
        "--oidc-ca-file",
        &ca,
    ];
    let c = integration_tests::Cluster::start(1, &common);
    let b_ingress = format!("127.0.0.1:{}", integration_tests::free_port());
    let mut b_args = common.to_vec();
    b_args.extend(["--http-listen", &b_ingress]);
    let b = integration_tests::etcd::second_coordinator(&c, dir.path(), &b_args);
    let (a_addr, b_addr): (SocketAddr, SocketAddr) =
        (c.ingress.parse().unwrap(), b_ingress.parse().unwrap());

    let probe = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/probe-app");
    let deploy = c.deploy("web", &probe);
    assert!(deploy.ok, "{deploy:?}");
    // ID tokens live 4 s, so the session needs its refresh token soon.
    let callbacks: Vec<String> = [a_addr, b_addr]
        .iter()
        .map(|a| format!("http://sso.test:{}{CALLBACK}", a.port()))
        .collect();
    let provider =
        NodeOidcProvider::start(dir.path(), &tls, CLIENT_ID, CLIENT_SECRET, &callbacks, 4);
    assert!(c.miren(&["route", "set", "sso.test", "-a", "web"]).ok);
    let (app_a, app_b) = (
        format!("http://sso.test:{}", a_addr.port()),
        format!("http://sso.test:{}", b_addr.port()),
    );
    let raw = |to: SocketAddr| {
        Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .resolve("sso.test", to)
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    };
    let (raw_a, raw_b) = (raw(a_addr), raw(b_addr));
    // The runner (joined before B) learns B and opens a session to it: B's
    // ingress reaches the app before the route is protected.
    assert!(
        integration_tests::wait_for(Duration::from_secs(90), || raw_b
            .get(format!("{app_b}/headers"))
            .send()
            .is_ok_and(|r| r.status() == 200)),
        "B's ingress never reached the app"
    );
    enable(&c.cfg, "sso.test", &provider);
    // Until the route (written through A) reaches B's index.
    assert!(
        integration_tests::wait_for(Duration::from_secs(20), || raw_b
            .get(format!("{app_b}/headers"))
            .send()
            .is_ok_and(|r| r.status() == 401)),
        "B never protected the route"
    );

    // A callback with what anyone gets from the gate (a sealed login
    // cookie and its state) but a code the provider refuses writes nothing
    // to etcd: a state is consumed in the store only for a login the
    // provider completed.
    let stored_states = || {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &etcd.endpoint(0)])
            .args(["get", "--prefix", "--keys-only", "/miren/routeoidc-state/"])
            .output()
            .expect("etcdctl (Debian package etcd-client)");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count()
    };
    let start = raw_b
        .get(format!("{app_b}/headers"))
        .header(ACCEPT, "text/html")
        .send()
        .unwrap();
    assert_eq!(start.status(), 302);
    let to_provider = Url::parse(start.headers()[LOCATION].to_str().unwrap()).unwrap();
    let junk_state = to_provider
        .query_pairs()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.into_owned())
        .expect("state");
    let junk_login_cookie = start
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with(&format!("miren_oidc_login_{}=", &junk_state[..12])))
        .map(|c| c.split(';').next().unwrap().to_string())
        .expect("login cookie");
    let mut junk_callback = Url::parse(&format!("{app_b}{CALLBACK}")).unwrap();
    junk_callback
        .query_pairs_mut()
        .append_pair("code", "junk")
        .append_pair("state", &junk_state);
    let r = raw_b
        .get(junk_callback)
        .header(COOKIE, &junk_login_cookie)
        .send()
        .unwrap();
    let (status, body) = (r.status().as_u16(), r.text().unwrap());
    assert_eq!(status, 502, "the provider refuses the code: {body}");
    assert_eq!(stored_states(), 0, "a refused login wrote a used state");

    // A login through A.
    let mut browser = Browser::new(&tls.ca, None, &[("sso.test", a_addr)]);
    let page = browser.get(&format!("{app_a}/headers"), &[]);
    let (_, login_cookie) = browser.started_login();
    let page = browser.sign_in(page, &provider.url, "alice@example.com");
    assert_eq!(page.status, 200, "{}", page.body);
    let session = browser.cookie(&app_a, "miren_oidc_session").unwrap();
    let cookie = format!("miren_oidc_session={session}");
    assert_eq!(stored_states(), 1, "the completed login consumed its state");

    // The session cookie works on B: B's gate lets the request through to
    // the app, with the session's claims.
    let r = raw_b
        .get(format!("{app_b}/headers"))
        .header(COOKIE, &cookie)
        .send()
        .unwrap();
    let (status, body) = (r.status().as_u16(), r.text().unwrap());
    assert!(past_the_gate(status, &body), "{status} {body}");

    // The callback used on A, replayed on B (which never saw it) with its
    // login cookie, is refused.
    let mut replay = browser.hop_at(CALLBACK).url.clone();
    replay.set_port(Some(b_addr.port())).unwrap();
    let r = raw_b
        .get(replay)
        .header(COOKIE, &login_cookie)
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().contains("already used"));

    // After the ID token expired, requests through both coordinators at
    // once share one refresh at the provider.
    let before = grants(&provider, &tls.ca)["refresh_token"]
        .as_u64()
        .unwrap_or(0);
    std::thread::sleep(Duration::from_secs(5));
    let answers: Vec<(u16, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = [(&raw_a, &app_a), (&raw_b, &app_b)]
            .into_iter()
            .cycle()
            .take(4)
            .map(|(client, app)| {
                let cookie = &cookie;
                s.spawn(move || {
                    let r = client
                        .get(format!("{app}/headers"))
                        .header(COOKIE, cookie)
                        .send()
                        .unwrap();
                    (r.status().as_u16(), r.text().unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (status, body) in &answers {
        assert!(past_the_gate(*status, body), "{status} {body}");
    }
    assert!(
        answers.iter().any(|(status, _)| *status == 200),
        "A's ingress served the app: {answers:?}"
    );
    let after = grants(&provider, &tls.ca)["refresh_token"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(
        after,
        before + 1,
        "one refresh at the provider for requests through two coordinators"
    );

    // A logout through A ends the session on B's ingress.
    let page = browser.get(&format!("{app_a}/.well-known/miren/oidc/logout"), &[]);
    assert!(page.url.as_str().starts_with(&provider.url), "{}", page.url);
    let refused_on_b = || {
        raw_b
            .get(format!("{app_b}/headers"))
            .header(COOKIE, &cookie)
            .send()
            .is_ok_and(|r| {
                r.status() == 401 && r.text().is_ok_and(|t| t.contains("login required"))
            })
    };
    assert!(
        integration_tests::wait_for(Duration::from_secs(5), refused_on_b),
        "session still valid on B after a logout through A"
    );
    drop(b);
}
