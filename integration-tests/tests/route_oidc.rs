//! Route OIDC (labs): the labs gate, configuration errors, and the whole
//! browser login flow at the ingress against a test OpenID provider.

use integration_tests::{miren, temp, Server};

#[test]
fn route_oidc_is_gated_by_labs() {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let _server = Server::start(&dir.path().join("data"), &cfg, "127.0.0.1:0", &[]);
    let r = miren(&cfg, &["route", "oidc", "providers"], &[]);
    assert!(!r.ok);
    assert!(r.stderr.contains("--labs routeoidc"), "{}", r.stderr);
    assert!(r.stderr.contains("MIREN_LABS=routeoidc"), "{}", r.stderr);
}

#[test]
fn route_oidc_needs_a_route() {
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let _server = Server::start(
        &dir.path().join("data"),
        &cfg,
        "127.0.0.1:0",
        &["--labs", "routeoidc"],
    );
    // The full configuration round trip runs in tests/apps.rs, where a
    // deployed app has a route.
    let r = miren(
        &cfg,
        &["route", "oidc", "enable", "app.test", "--provider", "x"],
        &[],
    );
    assert!(!r.ok);
    assert!(
        r.stderr.contains("miren route set app.test"),
        "{}",
        r.stderr
    );
}

mod flow {
    //! The login flow at the ingress against a test OpenID provider (our
    //! HTTPS fixture that logs "alice" in at once).

    use std::io::{BufRead, BufReader, Read, Write};
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use integration_tests::{miren, runners, temp, wait_for, RunnerProc, Server};
    use serde_json::Value;

    struct Resp {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Resp {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
        fn cookie(&self, name: &str) -> Option<String> {
            self.headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
                .find_map(|(_, v)| v.strip_prefix(&format!("{name}=")))
                .map(|v| v.split(';').next().unwrap_or_default().to_string())
        }
    }

    fn get(addr: &str, host: &str, path: &str, extra: &[&str]) -> Resp {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
        for h in extra {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Resp {
            status,
            headers,
            body: body.to_string(),
        }
    }

    /// Follows the provider's authorize URL (HTTPS, our fixture CA) once and
    /// returns where it sends the browser.
    fn authorize(url: &str, ca: &Path) -> String {
        let out = Command::new("python3")
            .args([
                "-c",
                "import ssl,sys,urllib.request\nclass N(urllib.request.HTTPRedirectHandler):\n  def redirect_request(self,*a,**k): return None\no=urllib.request.build_opener(N,urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=sys.argv[2])))\ntry:\n  o.open(sys.argv[1])\nexcept urllib.error.HTTPError as e:\n  print(e.headers['Location'])",
            ])
            .arg(url)
            .arg(ca)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    #[test]
    fn browser_login_sets_claim_headers_and_the_ingress_is_airtight() {
        let dir = temp();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/oidc_issuer.py");
        let mut issuer = Command::new("python3")
            .arg(script)
            .arg(dir.path())
            .arg("unused")
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 with PyJWT");
        let mut line = String::new();
        BufReader::new(issuer.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line.trim().strip_prefix("READY ").unwrap().parse().unwrap();
        let provider = format!("https://127.0.0.1:{port}");
        let ca = dir.path().join("ca.pem");

        let cfg = dir.path().join("c.yaml");
        let server = Server::start(
            &dir.path().join("coord"),
            &cfg,
            "127.0.0.1:0",
            &[
                "--labs",
                "routeoidc",
                "--http-listen",
                "127.0.0.1:0",
                "--oidc-ca-file",
                ca.to_str().unwrap(),
            ],
        );
        let ingress = server
            .stdout
            .iter()
            .find_map(|l| l.strip_prefix("HTTP ingress: http://"))
            .and_then(|l| l.split_whitespace().next())
            .unwrap()
            .to_string();
        let code = miren(&cfg, &["runner", "token", "create"], &[]);
        let _r = RunnerProc::start(
            &dir.path().join("r"),
            Some(code.stdout.trim()),
            &["--isolation", "none"],
        );
        assert!(wait_for(Duration::from_secs(30), || runners(&cfg)
            .iter()
            .any(|r| r["status"] == "ready")));
        let probe = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/probe-app");
        assert!(
            miren(
                &cfg,
                &["deploy", "--dir", probe.to_str().unwrap(), "-a", "web"],
                &[]
            )
            .ok
        );
        assert!(miren(&cfg, &["route", "set", "sso.test", "-a", "web"], &[]).ok);
        let en = miren(
            &cfg,
            &[
                "route",
                "oidc",
                "enable",
                "sso.test",
                "--provider-url",
                &provider,
                "--client-id",
                "app-client",
                "--client-secret",
                "client-secret",
                "--claim-header",
                "email:X-User-Email",
                "--claim-header",
                "groups:X-User-Groups",
            ],
            &[],
        );
        assert!(en.ok, "{en:?}");
        let html = "Accept: text/html";

        // A spoofed header without logging in: redirected, the app never sees it.
        let r = get(
            &ingress,
            "sso.test",
            "/headers",
            &[html, "X-User-Email: evil@example.com"],
        );
        assert_eq!(r.status, 302, "{}", r.body);
        let location = r.header("location").unwrap().to_string();
        assert!(
            location.starts_with(&format!("{provider}/authorize?")),
            "{location}"
        );
        assert!(
            location.contains("code_challenge_method=S256") && location.contains("nonce="),
            "{location}"
        );
        // Non-browser clients get 401.
        assert_eq!(get(&ingress, "sso.test", "/headers", &[]).status, 401);

        // Log in: provider -> callback -> session cookie -> back to the page.
        let login = r.cookie("miren_oidc_login").expect("login cookie");
        let back = authorize(&location, &ca);
        let callback = back
            .strip_prefix("http://sso.test")
            .expect(&back)
            .to_string();
        let cb = get(
            &ingress,
            "sso.test",
            &callback,
            &[&format!("Cookie: miren_oidc_login={login}")],
        );
        assert_eq!(cb.status, 302, "{}", cb.body);
        assert_eq!(cb.header("location"), Some("/headers"));
        let session = cb.cookie("miren_oidc_session").expect("session cookie");
        let set = cb
            .headers
            .iter()
            .find(|(k, v)| {
                k.eq_ignore_ascii_case("set-cookie") && v.starts_with("miren_oidc_session")
            })
            .unwrap();
        assert!(
            set.1.contains("HttpOnly") && set.1.contains("SameSite=Lax"),
            "{set:?}"
        );

        // The app sees the claims, never the spoofed values or the session.
        let r = get(
            &ingress,
            "sso.test",
            "/headers",
            &[
                html,
                &format!("Cookie: miren_oidc_session={session}; theirs=1"),
                "X-User-Email: evil@example.com",
                "X_User_Email: evil2@example.com",
            ],
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let seen: Value = serde_json::from_str(&r.body).unwrap();
        let text = r.body.to_ascii_lowercase();
        assert!(
            !text.contains("evil"),
            "spoofed header reached the app: {}",
            r.body
        );
        assert_eq!(seen["x-user-email"], "alice@example.com", "{}", r.body);
        assert_eq!(seen["x-user-groups"], r#"["dev","ops"]"#, "{}", r.body);
        assert_eq!(seen["cookie"], "theirs=1", "{}", r.body);

        // The callback's state cannot be replayed.
        let replay = get(
            &ingress,
            "sso.test",
            &callback,
            &[&format!("Cookie: miren_oidc_login={login}")],
        );
        assert_eq!(replay.status, 400, "{}", replay.body);
        assert!(replay.body.contains("already used"), "{}", replay.body);
        // A tampered session cookie is refused.
        let mut bad = session.clone().into_bytes();
        let i = bad.len() / 2;
        bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
        let bad = String::from_utf8(bad).unwrap();
        let r = get(
            &ingress,
            "sso.test",
            "/headers",
            &[&format!("Cookie: miren_oidc_session={bad}")],
        );
        assert_eq!(r.status, 401);
        // An open-redirect attempt lands on "/".
        let r = get(&ingress, "sso.test", "//evil.example.com/x", &[html]);
        assert_eq!(r.status, 302);
        let login = r.cookie("miren_oidc_login").unwrap();
        let back = authorize(r.header("location").unwrap(), &ca);
        let cb = get(
            &ingress,
            "sso.test",
            back.strip_prefix("http://sso.test").unwrap(),
            &[&format!("Cookie: miren_oidc_login={login}")],
        );
        assert_eq!(cb.header("location"), Some("/"), "{:?}", cb.headers);

        // Logout ends the session (even for a copy of the cookie).
        let out = get(
            &ingress,
            "sso.test",
            "/.well-known/miren/oidc/logout",
            &[&format!("Cookie: miren_oidc_session={session}")],
        );
        assert_eq!(out.status, 302);
        let r = get(
            &ingress,
            "sso.test",
            "/headers",
            &[&format!("Cookie: miren_oidc_session={session}")],
        );
        assert_eq!(r.status, 401, "session still valid after logout");

        let _ = issuer.kill();
        let _ = issuer.wait();
    }
}
