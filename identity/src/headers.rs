//! Which request headers of a client the ingress removes before proxying.
//!
//! The ingress sets some headers itself, and the app behind it trusts them
//! blindly: the forwarding headers (the client's address, the scheme and
//! host it used) on every route, and on a route protected by route OIDC the
//! claim headers naming the signed-in user. A client's own copy of any of
//! them must never reach the app, whatever its spelling. This module is the
//! one rule deciding that, used for both: a [`HeaderFilter`] names headers
//! exactly or by prefix, and names match ignoring ASCII case and treating
//! `_` and `-` as one character, because many backends (CGI, WSGI, Rack,
//! PHP) fold `X_Forwarded_For` and `X-Forwarded-For` into one variable
//! (`HTTP_X_FORWARDED_FOR`), and which copy wins there is up to them.
//!
//! It is a rule about names only, so it lives here without IO and is tested
//! without a socket; the coordinator's ingress applies it to hyper's header
//! map and then sets its own values.

use crate::route_oidc::ClaimHeader;

/// Client-sent headers the ingress always removes, compared after
/// normalisation (lowercase, `_` read as `-`): the standard `Forwarded`
/// (RFC 7239), the bare `X-Forwarded`, and the client-address headers that
/// proxies, CDNs and frameworks use in place of `X-Forwarded-For`
/// (`X-Real-IP` from nginx, `Client-IP` read by Rails, `True-Client-IP`,
/// `CF-Connecting-IP`, …) and of `X-Forwarded-Proto` (`Front-End-Https`,
/// `X-Url-Scheme`). An app behind miren can only have them from the client,
/// which may write anything there.
pub const FORWARDING_HEADERS: &[&str] = &[
    "forwarded",
    "x-forwarded",
    "x-real-ip",
    "client-ip",
    "x-client-ip",
    "true-client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "front-end-https",
    "x-url-scheme",
];

/// Prefixes of client-sent headers the ingress always removes, compared
/// after normalisation: the whole `X-Forwarded-*` family (`-For`, `-Host`,
/// `-Proto`, `-Port`, `-Prefix`, `-Ssl`, …). The ingress then sets its own
/// `X-Forwarded-For`, `X-Forwarded-Proto` and `X-Forwarded-Host`.
pub const FORWARDING_HEADER_PREFIXES: &[&str] = &["x-forwarded-"];

/// One byte of a header name in the form used for comparisons: ASCII
/// lowercase, with `_` read as `-`.
pub(crate) fn normalise_header_byte(b: u8) -> u8 {
    match b {
        b'_' => b'-',
        other => other.to_ascii_lowercase(),
    }
}

/// A header name in the form used for comparisons.
pub(crate) fn normalise_header_name(name: &str) -> String {
    name.bytes()
        .map(|b| char::from(normalise_header_byte(b)))
        .collect()
}

/// Whether two header names are the same once ASCII case is ignored and
/// `_` and `-` are treated as one character.
pub(crate) fn same_header_name(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .all(|(x, y)| normalise_header_byte(x) == normalise_header_byte(y))
}

/// Whether `name`, normalised, starts with `normalised_prefix`.
fn has_prefix(name: &str, normalised_prefix: &str) -> bool {
    name.len() >= normalised_prefix.len()
        && name
            .bytes()
            .zip(normalised_prefix.bytes())
            .all(|(x, p)| normalise_header_byte(x) == p)
}

/// Decides which headers of a client's request are removed before the
/// request is proxied to an app.
///
/// Names match ignoring ASCII case and treating `_` and `-` as the same
/// character: with `X-User-Email` configured, `X-User-Email`,
/// `x-user-email`, `X_User_Email` and `x_user-email` are all removed,
/// because backends that turn headers into variables (`HTTP_X_USER_EMAIL`)
/// cannot tell them apart. A filter holds whole names and prefixes; filters
/// combine with [`HeaderFilter::with`], so the ingress applies one filter
/// (the forwarding headers, plus a protected route's claim headers).
///
/// For route OIDC every configured claim header is removed, whether or not
/// the user's token holds that claim, so a header the app receives under
/// such a name was always set by the ingress.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderFilter {
    /// Whole header names, normalised (lowercase, `_` as `-`).
    names: Vec<String>,
    /// Name prefixes, normalised.
    prefixes: Vec<String>,
}

impl HeaderFilter {
    /// A filter removing every header named in `mappings` (route OIDC's
    /// claim headers).
    pub fn new(mappings: &[ClaimHeader]) -> Self {
        Self::default().with_names(mappings.iter().map(ClaimHeader::header))
    }

    /// The filter of headers the ingress owns on every route:
    /// [`FORWARDING_HEADERS`] and [`FORWARDING_HEADER_PREFIXES`].
    pub fn forwarding() -> Self {
        let mut filter = Self::default().with_names(FORWARDING_HEADERS.iter().copied());
        filter.prefixes = FORWARDING_HEADER_PREFIXES
            .iter()
            .map(|p| normalise_header_name(p))
            .collect();
        filter
    }

    /// This filter, also removing what `other` removes.
    pub fn with(mut self, other: &HeaderFilter) -> Self {
        for n in &other.names {
            if !self.names.contains(n) {
                self.names.push(n.clone());
            }
        }
        for p in &other.prefixes {
            if !self.prefixes.contains(p) {
                self.prefixes.push(p.clone());
            }
        }
        self
    }

    fn with_names<'a>(mut self, names: impl IntoIterator<Item = &'a str>) -> Self {
        for name in names {
            let n = normalise_header_name(name);
            if !self.names.contains(&n) {
                self.names.push(n);
            }
        }
        self
    }

    /// Whether a header of the client's request, named `incoming_header_name`,
    /// must be removed before proxying.
    pub fn strips(&self, incoming_header_name: &str) -> bool {
        self.names
            .iter()
            .any(|n| same_header_name(n, incoming_header_name))
            || self
                .prefixes
                .iter()
                .any(|p| has_prefix(incoming_header_name, p))
    }
}

/// Whether `name` is a header the ingress owns on every route
/// (see [`HeaderFilter::forwarding`]).
pub fn is_forwarding_header(name: &str) -> bool {
    FORWARDING_HEADERS.iter().any(|n| same_header_name(n, name))
        || FORWARDING_HEADER_PREFIXES
            .iter()
            .any(|p| has_prefix(name, p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(s: &str) -> ClaimHeader {
        s.parse().expect("valid mapping")
    }

    #[test]
    fn forwarding_headers_are_stripped_in_every_spelling() {
        let filter = HeaderFilter::forwarding();
        for name in [
            "Forwarded",
            "forwarded",
            "FORWARDED",
            "X-Forwarded-For",
            "x-forwarded-for",
            "X_Forwarded_For",
            "x_forwarded_for",
            "X-FORWARDED_FOR",
            "x_Forwarded-for",
            "x-forwarded-host",
            "X_FORWARDED_HOST",
            "X-Forwarded-Proto",
            "x_forwarded_proto",
            "X-Forwarded-Port",
            "X-Forwarded-Prefix",
            "X-Forwarded-Ssl",
            "x-forwarded-anything-else",
            "X-Forwarded",
            "X-Real-IP",
            "x-real-ip",
            "X_Real_IP",
            "x_real-ip",
            "Client-IP",
            "X-Client-IP",
            "True-Client-IP",
            "X_Cluster_Client_IP",
            "CF-Connecting-IP",
            "Fastly-Client-IP",
            "Front-End-Https",
            "X-Url-Scheme",
        ] {
            assert!(filter.strips(name), "{name} kept");
            assert!(is_forwarding_header(name), "{name} not a forwarding header");
        }
    }

    #[test]
    fn other_headers_are_kept() {
        let filter = HeaderFilter::forwarding();
        for name in [
            "Host",
            "Cookie",
            "Accept",
            "X-Forward-For",
            "XForwarded-For",
            "X-Forwardedfor",
            "Forwarded-For",
            "X-Real-IPs",
            "X-Real",
            "Real-IP",
            "X-User-Email",
            "Upgrade",
            "",
        ] {
            assert!(!filter.strips(name), "{name} stripped");
            assert!(!is_forwarding_header(name), "{name}");
        }
    }

    #[test]
    fn filters_combine() {
        let claims = HeaderFilter::new(&[ch("email:X-User-Email")]);
        assert!(!claims.strips("X-Forwarded-For"));
        let both = HeaderFilter::forwarding().with(&claims);
        for name in [
            "x_user_email",
            "X-User-Email",
            "x-forwarded-for",
            "X_Real_IP",
        ] {
            assert!(both.strips(name), "{name}");
        }
        assert!(!both.strips("X-User-Emails"));
        // Combining twice changes nothing.
        assert_eq!(both.clone().with(&claims), both);
    }

    #[test]
    fn filter_strips_configured_header_in_any_case_and_separator() {
        let filter = HeaderFilter::new(&[ch("email:X-User-Email"), ch("groups:X-Groups")]);
        for name in [
            "X-User-Email",
            "x-user-email",
            "X_User_Email",
            "x_user-email",
            "X-USER_EMAIL",
            "x-groups",
        ] {
            assert!(filter.strips(name), "{name}");
        }
        for name in [
            "X-User-Emails",
            "X-User-Emai",
            "XUser-Email",
            "X-User Email",
            "Host",
            "X-Forwarded-For",
            "",
        ] {
            assert!(!filter.strips(name), "{name}");
        }
    }

    #[test]
    fn empty_filter_strips_nothing() {
        let filter = HeaderFilter::new(&[]);
        assert!(!filter.strips("X-User-Email"));
        assert!(!filter.strips("X-Forwarded-For"));
    }
}
