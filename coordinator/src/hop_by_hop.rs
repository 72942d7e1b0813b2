//! Headers that speak of one HTTP/1.1 connection rather than of the message
//! (RFC 9110 §7.6.1), which the ingress never passes from one of its two
//! connections to the other.
//!
//! A proxied request runs over two connections: the client's to the
//! ingress, and a kept-alive one from the ingress to the sandbox that the
//! pool ([`crate::upstream`]) hands to the next client's request after it.
//! What a client says about its own connection must not reach the
//! sandbox's: `Connection: close` (or an HTTP/1.0 request without
//! keep-alive) has the app close a connection the pool still counts as
//! alive, and the next client's request sent on it in that moment would
//! get a 502; `Connection: X-Forwarded-For` has a proxy inside the sandbox
//! drop the header the ingress sets; `TE`/`Trailer` announce trailers that
//! could carry a header after the ingress's checks. Likewise what the app
//! says about its connection (`Connection: close`, `Keep-Alive`) is not the
//! client's business: the ingress decides about the client's connection.
//!
//! Only an upgrade crosses: a request that names `upgrade` in `Connection`
//! and carries `Upgrade` keeps both (`Connection: upgrade`), and so does a
//! `101 Switching Protocols` answer, since the two connections then become
//! one tunnel.

use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, UPGRADE};
use hyper::Version;

/// Hop-by-hop headers removed whether `Connection` names them or not.
static ALWAYS: [HeaderName; 5] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    hyper::header::TE,
    hyper::header::TRAILER,
    HeaderName::from_static("http2-settings"),
];

/// Headers a `Connection` token never removes: they carry where the
/// message goes and how it is framed, which hyper has already read and
/// sets again on the other connection.
static NEVER_NAMED_AWAY: [HeaderName; 3] = [
    hyper::header::HOST,
    hyper::header::CONTENT_LENGTH,
    hyper::header::TRANSFER_ENCODING,
];

/// Removes the hop-by-hop headers of a client's request of HTTP `version`.
/// Keeps `Upgrade` with `Connection: upgrade` when an HTTP/1.1 client
/// asked to switch protocols (both given); returns whether it did. An
/// HTTP/1.0 client cannot switch (RFC 9110 §7.8): its `Upgrade` goes, as
/// the request goes up as HTTP/1.1, where the app would take it.
pub fn strip_request(headers: &mut HeaderMap, version: Version) -> bool {
    let upgrade = strip(headers) && version >= Version::HTTP_11;
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(UPGRADE);
    }
    upgrade
}

/// Removes the hop-by-hop headers of a sandbox's response, unless it
/// switches protocols (`switching`): then the tunnel needs them as sent.
pub fn strip_response(headers: &mut HeaderMap, switching: bool) {
    if !switching && !strip(headers) {
        headers.remove(UPGRADE);
    }
}

/// Removes `Connection`, what it names (but `Upgrade`) and the [`ALWAYS`]
/// list. Returns whether `Connection` named `upgrade` and `Upgrade` is
/// there; the callers decide what becomes of `Upgrade`.
fn strip(headers: &mut HeaderMap) -> bool {
    // Most messages have none of them: one pass over the names, comparing
    // (already parsed) names rather than looking each one up.
    if !headers
        .keys()
        .any(|name| name == CONNECTION || ALWAYS.contains(name))
    {
        return false;
    }
    // Tokens split as bytes: one token that is not UTF-8 does not hide the
    // others.
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
        .collect();
    headers.remove(CONNECTION);
    let mut upgrade = false;
    for name in named {
        if name == UPGRADE {
            upgrade = headers.contains_key(UPGRADE);
        } else if !NEVER_NAMED_AWAY.contains(&name) {
            headers.remove(&name);
        }
    }
    for name in &ALWAYS {
        headers.remove(name);
    }
    upgrade
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut n: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        n.sort();
        n
    }

    #[test]
    fn what_a_client_says_of_its_connection_stays_with_it() {
        let mut h = headers(&[
            ("connection", "close, X-Extra"),
            ("connection", "X_Forwarded_For, x-user-email"),
            ("x-extra", "1"),
            ("x-user-email", "set-by-the-client"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "X-User-Email"),
            ("http2-settings", "AAMA"),
            ("upgrade", "h2c"),
            ("accept", "*/*"),
        ]);
        assert!(!strip_request(&mut h, Version::HTTP_11));
        assert_eq!(names(&h), ["accept"]);
    }

    #[test]
    fn a_connection_token_cannot_remove_where_or_how_long_the_message_is() {
        let mut h = headers(&[
            ("connection", "Host, Content-Length, transfer-encoding"),
            ("host", "a.test"),
            ("content-length", "3"),
        ]);
        strip_request(&mut h, Version::HTTP_11);
        assert_eq!(names(&h), ["content-length", "host"]);
    }

    #[test]
    fn an_upgrade_keeps_its_two_headers_and_nothing_else() {
        let mut h = headers(&[
            ("connection", "keep-alive, Upgrade, x-extra"),
            ("upgrade", "websocket"),
            ("x-extra", "1"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        assert!(strip_request(&mut h, Version::HTTP_11));
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(names(&h), ["connection", "sec-websocket-key", "upgrade"]);
        // Connection names upgrade but no Upgrade is given: nothing to keep.
        let mut h = headers(&[("connection", "upgrade")]);
        assert!(!strip_request(&mut h, Version::HTTP_11));
        assert!(h.is_empty());
        // Upgrade without Connection naming it is not a request to switch.
        let mut h = headers(&[("upgrade", "websocket"), ("accept", "*/*")]);
        assert!(!strip_request(&mut h, Version::HTTP_11));
        assert_eq!(names(&h), ["accept"]);
    }

    #[test]
    fn an_http_1_0_client_cannot_switch_protocols() {
        let mut h = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(!strip_request(&mut h, Version::HTTP_10));
        assert!(h.is_empty());
    }

    #[test]
    fn a_token_of_other_bytes_does_not_hide_the_others() {
        let mut h = HeaderMap::new();
        h.append(
            CONNECTION,
            HeaderValue::from_bytes(b"x-extra, \xff\xfe, upgrade").unwrap(),
        );
        h.append("x-extra", HeaderValue::from_static("1"));
        h.append(UPGRADE, HeaderValue::from_static("websocket"));
        assert!(strip_request(&mut h, Version::HTTP_11));
        assert_eq!(names(&h), ["connection", "upgrade"]);
    }

    #[test]
    fn the_apps_words_on_its_connection_do_not_reach_the_client() {
        let mut h = headers(&[
            ("connection", "close"),
            ("keep-alive", "timeout=5, max=100"),
            ("content-type", "text/plain"),
        ]);
        strip_response(&mut h, false);
        assert_eq!(names(&h), ["content-type"]);
        let mut h = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        strip_response(&mut h, true);
        assert_eq!(names(&h), ["connection", "upgrade"]);
    }
}
