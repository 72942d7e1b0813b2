//! Route OIDC: the pure rules of single sign-on at the ingress.
//!
//! An operator can protect an app's route with an OpenID Connect provider
//! (`miren route oidc enable HOST --provider-url … --claim-header
//! CLAIM:HEADER`). The ingress then logs users in with the authorization code
//! flow (PKCE S256, `state`, `nonce`), keeps an encrypted session cookie, and
//! hands the app the user's identity as request headers. The app trusts those
//! headers blindly, so every rule that decides what reaches it is security
//! policy, and this module is the one place that defines it:
//!
//! * which `--claim-header` mappings are accepted ([`ClaimHeader`]): a header
//!   that a proxy or server gives meaning to (`Host`, `Cookie`,
//!   `X-Forwarded-For`, …) cannot be chosen;
//! * which incoming headers are removed before proxying ([`HeaderFilter`]), so
//!   a client cannot forge its own identity: names are compared ignoring ASCII
//!   case and treating `_` and `-` as the same character, because many
//!   backends (CGI, WSGI, Rack, PHP) fold both into one variable;
//! * how a claim becomes a header value ([`render_claim`], [`claim_headers`]),
//!   refusing values that would split the header or that no HTTP stack would
//!   send;
//! * where the user may be sent back after login ([`safe_return_path`]): only
//!   a path on the same host, never an open redirect;
//! * the PKCE verifier and challenge, `state` and `nonce` ([`pkce_verifier`],
//!   [`pkce_challenge_s256`], [`random_token`], [`tokens_match`]);
//! * how long a session lasts ([`SessionClaims`], [`session_expiry`]): its
//!   claims never outlive the ID token they came from; a refresh token
//!   renews them ([`SessionClaims::refreshed`]) up to the session cap.
//!
//! Like the rest of this crate it does no IO and reads no clock: randomness
//! and `now` are passed in, so the coordinator's HTTPS layer only translates
//! between the wire and these functions.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The filter of client-sent headers, shared with the forwarding headers
/// (see [`crate::headers`]).
pub use crate::headers::HeaderFilter;
use crate::headers::{normalise_header_name, same_header_name};
use crate::names::{check_claim_name, first_refused, ClaimNameError};

/// Longest accepted claim name in a `--claim-header` mapping, in bytes
/// (the one claim-name rule, [`crate::names::check_claim_name`]).
pub use crate::names::MAX_CLAIM_NAME_LEN;
/// Longest accepted header name in a `--claim-header` mapping, in bytes.
pub const MAX_HEADER_NAME_LEN: usize = 128;
/// Longest claim value, in bytes once rendered, that is passed to the app.
///
/// Servers commonly refuse request headers above 8 KiB; a larger value is
/// skipped like a missing claim rather than making every request fail.
pub const MAX_CLAIM_VALUE_LEN: usize = 8 * 1024;
/// Longest accepted return path, in bytes.
pub const MAX_RETURN_PATH_LEN: usize = 2048;
/// Where the user lands when the requested return target is refused.
pub const DEFAULT_RETURN_PATH: &str = "/";
/// The only PKCE method used: `code_challenge_method=S256`.
pub const PKCE_METHOD: &str = "S256";

/// Percent-decoding rounds applied to a return path before it is given up
/// on; see [`safe_return_path`].
const MAX_DECODE_ROUNDS: usize = 8;

/// Header names a claim may not be mapped to, compared after
/// [normalisation](HeaderFilter): they carry meaning for the proxy or the
/// server (routing, framing, credentials, hop-by-hop control).
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "upgrade",
    "cookie",
    "authorization",
    "te",
    "trailer",
    "keep-alive",
    // The standard form of the `X-Forwarded-*` family (RFC 7239).
    "forwarded",
];

/// Prefixes of header names a claim may not be mapped to, compared after
/// normalisation: `Proxy-*` (credentials and hop-by-hop control of proxies)
/// and `X-Forwarded-*` (client address, scheme and host set by the ingress).
const RESERVED_HEADER_PREFIXES: &[&str] = &["proxy-", "x-forwarded-"];

/// Why a `--claim-header CLAIM:HEADER` mapping was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimHeaderError {
    /// The text holds no `:` between the claim and the header.
    #[error("claim header {input:?} must be CLAIM:HEADER, for example email:X-User-Email")]
    MissingSeparator {
        /// The refused text.
        input: String,
    },
    /// The claim name breaks the claim-name rule
    /// ([`crate::names::check_claim_name`]).
    #[error(transparent)]
    Claim(#[from] ClaimNameError),
    /// The header name is empty.
    #[error("claim header mapping has an empty header name")]
    EmptyHeader,
    /// The header name is longer than [`MAX_HEADER_NAME_LEN`].
    #[error("header name is {len} bytes long; at most {max} are allowed")]
    HeaderTooLong {
        /// Length of the header name, in bytes.
        len: usize,
        /// The limit, [`MAX_HEADER_NAME_LEN`].
        max: usize,
    },
    /// The header name holds a character that is not an HTTP token
    /// character (RFC 9110 `tchar`).
    #[error(
        "header name {header:?} contains {ch:?} at position {position}, \
         which is not allowed in an HTTP header name"
    )]
    HeaderChar {
        /// The refused header name.
        header: String,
        /// The first offending character.
        ch: char,
        /// Its position, counted in characters from 0.
        position: usize,
    },
    /// The header name is one the proxy or the server gives meaning to
    /// (`Host`, `Cookie`, `Authorization`, hop-by-hop headers, `Proxy-*`,
    /// `X-Forwarded-*`, …), compared ignoring case and `_`/`-`.
    #[error("header {header:?} is reserved and cannot carry a claim; choose a name such as X-User-Email")]
    ReservedHeader {
        /// The refused header name.
        header: String,
    },
}

/// Two mappings of one route name the same header once case and `_`/`-`
/// are ignored, so the app could not tell their values apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "claim headers {first:?} and {second:?} name the same header \
     (case and `_`/`-` are ignored); give each claim its own header"
)]
pub struct DuplicateClaimHeader {
    /// The header name of the earlier mapping.
    pub first: String,
    /// The header name of the later mapping.
    pub second: String,
}

/// One `--claim-header CLAIM:HEADER` mapping: the ID token claim `claim` is
/// passed to the app in the request header `header`.
///
/// A value of this type is always valid: the claim name is 1 to
/// [`MAX_CLAIM_NAME_LEN`] characters of `[A-Za-z0-9_.:-]`; the header name
/// is 1 to [`MAX_HEADER_NAME_LEN`] HTTP token characters and not reserved
/// (see [`ClaimHeaderError::ReservedHeader`]). It is parsed from and
/// serialised to its `CLAIM:HEADER` text, so a stored mapping is checked
/// again when loaded.
///
/// The text is split on its **last** `:`: a header name can never hold a
/// `:`, while claim names such as `urn:example:groups` can.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClaimHeader {
    claim: String,
    header: String,
}

impl ClaimHeader {
    /// Checks a claim name and a header name and pairs them.
    pub fn new(claim: &str, header: &str) -> Result<Self, ClaimHeaderError> {
        check_claim_name(claim)?;
        check_header_name(header)?;
        Ok(Self {
            claim: claim.to_owned(),
            header: header.to_owned(),
        })
    }

    /// The ID token claim, for example `email`.
    pub fn claim(&self) -> &str {
        &self.claim
    }

    /// The request header, as the operator spelled it, for example
    /// `X-User-Email`.
    pub fn header(&self) -> &str {
        &self.header
    }
}

impl FromStr for ClaimHeader {
    type Err = ClaimHeaderError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (claim, header) =
            s.rsplit_once(':')
                .ok_or_else(|| ClaimHeaderError::MissingSeparator {
                    input: s.to_owned(),
                })?;
        Self::new(claim, header)
    }
}

impl fmt::Display for ClaimHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.claim, self.header)
    }
}

impl TryFrom<String> for ClaimHeader {
    type Error = ClaimHeaderError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ClaimHeader> for String {
    fn from(c: ClaimHeader) -> Self {
        c.to_string()
    }
}

fn check_header_name(header: &str) -> Result<(), ClaimHeaderError> {
    if header.is_empty() {
        return Err(ClaimHeaderError::EmptyHeader);
    }
    if header.len() > MAX_HEADER_NAME_LEN {
        return Err(ClaimHeaderError::HeaderTooLong {
            len: header.len(),
            max: MAX_HEADER_NAME_LEN,
        });
    }
    if let Some((position, ch)) = first_refused(header, is_tchar) {
        return Err(ClaimHeaderError::HeaderChar {
            header: header.to_owned(),
            ch,
            position,
        });
    }
    let normalised = normalise_header_name(header);
    let reserved = RESERVED_HEADERS.contains(&normalised.as_str())
        || RESERVED_HEADER_PREFIXES
            .iter()
            .any(|p| normalised.starts_with(p));
    if reserved {
        return Err(ClaimHeaderError::ReservedHeader {
            header: header.to_owned(),
        });
    }
    Ok(())
}

/// RFC 9110 `tchar`: the characters of an HTTP token such as a field name.
fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            '!' | '#'
                | '$'
                | '%'
                | '&'
                | '\''
                | '*'
                | '+'
                | '-'
                | '.'
                | '^'
                | '_'
                | '`'
                | '|'
                | '~'
        )
}

/// Refuses a set of mappings in which two name the same header (ignoring
/// ASCII case and `_`/`-`), such as `email:X-User` and `name:x_user`.
///
/// The CLI and the coordinator call this when a route's mappings are set;
/// one claim may still be mapped to several headers.
pub fn ensure_distinct_headers(mappings: &[ClaimHeader]) -> Result<(), DuplicateClaimHeader> {
    for (i, later) in mappings.iter().enumerate() {
        if let Some(earlier) = mappings[..i]
            .iter()
            .find(|earlier| same_header_name(&earlier.header, &later.header))
        {
            return Err(DuplicateClaimHeader {
                first: earlier.header.clone(),
                second: later.header.clone(),
            });
        }
    }
    Ok(())
}

/// Why a claim value is not passed to the app; see [`render_claim_checked`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimValueError {
    /// The rendered value holds a control character (CR, LF, NUL, any other
    /// C0 control except horizontal tab, or DEL). CR and LF would split the
    /// header and let the token's issuer inject headers of its own; the
    /// others are refused by HTTP stacks.
    #[error("claim value contains the control character {byte:#04x} at byte {position}")]
    ControlChar {
        /// The offending byte.
        byte: u8,
        /// Its offset in the rendered value.
        position: usize,
    },
    /// The rendered value starts or ends with a space or tab. HTTP
    /// receivers trim that whitespace, so a user-editable claim
    /// `" admin@corp"` would reach the app as `admin@corp`.
    #[error("claim value starts or ends with whitespace, which receivers would trim")]
    SurroundingWhitespace,
    /// The rendered value is longer than [`MAX_CLAIM_VALUE_LEN`].
    #[error("claim value is {len} bytes long; at most {max} are passed to the app")]
    TooLong {
        /// Length of the rendered value, in bytes.
        len: usize,
        /// The limit, [`MAX_CLAIM_VALUE_LEN`].
        max: usize,
    },
}

/// Renders a claim as a header value, saying why when it is refused.
///
/// * a string is passed as it is (UTF-8; the HTTP layer should build the
///   header value from its bytes, as non-ASCII text is allowed there);
/// * a number or boolean is passed in its JSON form (`42`, `1.5`, `true`);
/// * an array or object is passed as compact JSON (`["a","b"]`), in which
///   JSON escapes every control character;
/// * `null` gives `Ok(None)`: the claim is treated as missing.
///
/// A value holding a control character other than horizontal tab (CR, LF
/// and NUL included), starting or ending with a space or tab, or longer
/// than [`MAX_CLAIM_VALUE_LEN`] is refused.
pub fn render_claim_checked(value: &Value) -> Result<Option<String>, ClaimValueError> {
    let rendered = match value {
        Value::Null => return Ok(None),
        Value::String(s) => s.clone(),
        // `Display` of a JSON value is its compact JSON text.
        Value::Bool(_) | Value::Number(_) | Value::Array(_) | Value::Object(_) => value.to_string(),
    };
    if let Some((position, &byte)) = rendered
        .as_bytes()
        .iter()
        .enumerate()
        .find(|&(_, &b)| (b < 0x20 && b != b'\t') || b == 0x7f)
    {
        return Err(ClaimValueError::ControlChar { byte, position });
    }
    if rendered.starts_with([' ', '\t']) || rendered.ends_with([' ', '\t']) {
        return Err(ClaimValueError::SurroundingWhitespace);
    }
    if rendered.len() > MAX_CLAIM_VALUE_LEN {
        return Err(ClaimValueError::TooLong {
            len: rendered.len(),
            max: MAX_CLAIM_VALUE_LEN,
        });
    }
    Ok(Some(rendered))
}

/// Renders a claim as a header value, or `None` when it must not be passed.
///
/// The rules are those of [`render_claim_checked`]; a refused value (CR, LF,
/// NUL or another control character, or too long) and `null` both give
/// `None`, so the header is simply absent — and since [`HeaderFilter`]
/// removed any client-sent copy, the app never sees a forged or split value.
/// Callers wanting to log the reason use [`render_claim_checked`].
pub fn render_claim(value: &Value) -> Option<String> {
    render_claim_checked(value).ok().flatten()
}

/// The headers to set on a proxied request: `(header, value)` for every
/// mapping whose claim is present in `claims` and renders
/// ([`render_claim`]), in the order of `mappings`. Missing, `null` and
/// refused claims are skipped.
///
/// Header names are the operator's spelling. The caller first removes the
/// client's copies with a [`HeaderFilter`] built from the same mappings,
/// then sets these.
pub fn claim_headers(
    mappings: &[ClaimHeader],
    claims: &Map<String, Value>,
) -> Vec<(String, String)> {
    mappings
        .iter()
        .filter_map(|m| {
            let value = render_claim(claims.get(&m.claim)?)?;
            Some((m.header.clone(), value))
        })
        .collect()
}

/// The target to send the user to after login: `raw` when it is a path on
/// this host, [`DEFAULT_RETURN_PATH`] (`/`) otherwise. The query string and
/// fragment of an accepted path are kept.
///
/// `raw` is accepted only when all of these hold:
///
/// * it is 1 to [`MAX_RETURN_PATH_LEN`] bytes of visible ASCII (no spaces,
///   no control characters — browsers silently drop tabs and newlines inside
///   URLs, so `/\t/evil.com` would become `//evil.com`);
/// * it starts with exactly one `/`, and its second character is neither `/`
///   nor `\` (browsers read `//evil.com` and `/\evil.com` as another host).
///   Starting with `/` also rules out any scheme (`https:`, `javascript:`);
/// * its path (the part before `?` or `#`) still satisfies the above after
///   each round of percent-decoding, up to a few rounds (so `/%2F/evil.com`
///   and `/%252F/evil.com` are refused in case some layer decodes them),
///   with no control character in the decoded path either;
/// * its path holds no `.` or `..` segment, raw or decoded, with `/` or `\`
///   as separators: `/..//evil.com` normalises to `//evil.com`.
///
/// A path that still changes after the last decoding round is refused.
pub fn safe_return_path(raw: &str) -> String {
    if is_safe_return_path(raw) {
        raw.to_owned()
    } else {
        DEFAULT_RETURN_PATH.to_owned()
    }
}

/// Whether [`safe_return_path`] keeps `raw`.
pub fn is_safe_return_path(raw: &str) -> bool {
    let bytes = raw.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_RETURN_PATH_LEN {
        return false;
    }
    if !bytes.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return false;
    }
    let path_end = bytes
        .iter()
        .position(|&b| b == b'?' || b == b'#')
        .unwrap_or(bytes.len());
    let mut path = bytes[..path_end].to_vec();
    for _ in 0..MAX_DECODE_ROUNDS {
        if !path_stays_on_host(&path) {
            return false;
        }
        let decoded = percent_decode(&path);
        if decoded == path {
            return true;
        }
        path = decoded;
    }
    false
}

/// The checks applied to the path of a return target, raw and after each
/// decoding round.
fn path_stays_on_host(path: &[u8]) -> bool {
    path.first() == Some(&b'/')
        && !matches!(path.get(1), Some(b'/' | b'\\'))
        && !path.iter().any(u8::is_ascii_control)
        && !path
            .split(|&b| b == b'/' || b == b'\\')
            .any(|segment| segment == b"." || segment == b"..")
}

/// One round of percent-decoding; a `%` not followed by two hex digits is
/// kept as it is.
fn percent_decode(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        if b == b'%' {
            if let (Some(hi), Some(lo)) = (
                input.get(i + 1).copied().and_then(hex_value),
                input.get(i + 2).copied().and_then(hex_value),
            ) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    out
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// A PKCE code verifier (RFC 7636) from 32 random bytes: their base64url
/// form without padding, 43 characters of the unreserved set.
///
/// The caller draws the bytes from a cryptographic random source.
pub fn pkce_verifier(random: [u8; 32]) -> String {
    URL_SAFE_NO_PAD.encode(random)
}

/// The PKCE `code_challenge` for [`PKCE_METHOD`] `S256`:
/// `base64url-no-pad(SHA-256(ASCII(verifier)))`.
pub fn pkce_challenge_s256(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// An unguessable token, such as the `state` or `nonce` of a login, from 32
/// random bytes: their base64url form without padding (43 characters).
///
/// The caller draws the bytes from a cryptographic random source.
pub fn random_token(random: [u8; 32]) -> String {
    URL_SAFE_NO_PAD.encode(random)
}

/// Whether a presented `state` or `nonce` equals the expected one, compared
/// in time independent of where they differ. An empty expected value never
/// matches.
pub fn tokens_match(expected: &str, presented: &str) -> bool {
    let (a, b) = (expected.as_bytes(), presented.as_bytes());
    !a.is_empty()
        && a.len() == b.len()
        && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What the encrypted session cookie of a logged-in user holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionClaims {
    /// The `sub` claim of the user's ID token.
    pub sub: String,
    /// The claims of the ID token passed to the app (see [`claim_headers`]).
    pub claims: Map<String, Value>,
    /// When the current ID token's claims stop being trusted, in seconds
    /// since the Unix epoch; see [`session_expiry`].
    pub expires_at: i64,
    /// The provider's refresh token, when it gave one: it renews the claims
    /// once the ID token has expired, until [`ends_at`](Self::ends_at).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    /// The latest the session may last however often it is refreshed: the
    /// login time plus the session cap.
    #[serde(default)]
    pub ends_at: i64,
}

/// Where a session stands at a given time; see [`SessionClaims::state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// The claims are current: proxy with them.
    Active,
    /// The ID token has expired but a refresh token may renew it.
    Refreshable,
    /// Over: the user must log in again.
    Over,
}

/// Why a refreshed ID token cannot continue a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefreshError {
    /// OpenID Connect Core §12.2: the refreshed token must name the same
    /// user.
    #[error("the refreshed ID token names another user ({got:?}, the session is {expected:?})")]
    OtherSubject {
        /// The session's `sub`.
        expected: String,
        /// The refreshed token's `sub`.
        got: String,
    },
    /// The session reached its cap; refreshing cannot extend it.
    #[error("the session has reached its longest lifetime; log in again")]
    SessionOver,
}

impl SessionClaims {
    /// A session started at `now` from an ID token (`sub`, `claims`,
    /// `id_token_exp`) and the refresh token the provider gave with it, if
    /// any. It ends `max_secs` after `now` at the latest.
    pub fn start(
        sub: String,
        claims: Map<String, Value>,
        id_token_exp: i64,
        refresh_token: Option<String>,
        now: i64,
        max_secs: i64,
    ) -> SessionClaims {
        let ends_at = now.saturating_add(max_secs.max(0));
        SessionClaims {
            sub,
            claims,
            expires_at: session_expiry(id_token_exp, now, max_secs),
            refresh_token,
            ends_at,
        }
    }

    /// Where the session stands at `now`: active before `expires_at`;
    /// refreshable after it while a refresh token is held and `ends_at`
    /// has not come; otherwise over.
    pub fn state(&self, now: i64) -> SessionState {
        if now < self.expires_at {
            SessionState::Active
        } else if self.refresh_token.is_some() && now < self.ends_at {
            SessionState::Refreshable
        } else {
            SessionState::Over
        }
    }

    /// Whether the session is no longer active at `now` (a session is over
    /// from its `expires_at` second on, unless refreshed).
    pub fn is_expired(&self, now: i64) -> bool {
        self.state(now) != SessionState::Active
    }

    /// The cookie `Max-Age` at `now`, never negative: until `expires_at`,
    /// or until `ends_at` when a refresh token can renew the claims.
    pub fn max_age_secs(&self, now: i64) -> i64 {
        let until = if self.refresh_token.is_some() {
            self.ends_at.max(self.expires_at)
        } else {
            self.expires_at
        };
        until.saturating_sub(now).max(0)
    }

    /// The session continued by a refreshed ID token (`sub`, `claims`,
    /// `id_token_exp`) at `now`, keeping `keep` claims (such as a session
    /// id) from this one. The provider may rotate the refresh token
    /// (`new_refresh_token`); otherwise the current one is kept. The claims
    /// never outlive `ends_at`.
    pub fn refreshed(
        &self,
        sub: &str,
        mut claims: Map<String, Value>,
        id_token_exp: i64,
        new_refresh_token: Option<String>,
        now: i64,
        keep: &[&str],
    ) -> Result<SessionClaims, RefreshError> {
        if sub != self.sub {
            return Err(RefreshError::OtherSubject {
                expected: self.sub.clone(),
                got: sub.to_string(),
            });
        }
        if now >= self.ends_at {
            return Err(RefreshError::SessionOver);
        }
        for k in keep {
            if let Some(v) = self.claims.get(*k) {
                claims.insert((*k).to_string(), v.clone());
            }
        }
        Ok(SessionClaims {
            sub: self.sub.clone(),
            claims,
            expires_at: id_token_exp.min(self.ends_at),
            refresh_token: new_refresh_token.or_else(|| self.refresh_token.clone()),
            ends_at: self.ends_at,
        })
    }
}

/// When a new session ends: the ID token's `exp`, or `now + max_secs` when
/// that is sooner, so a session never outlives the token it came from. A
/// negative `max_secs` counts as 0.
pub fn session_expiry(id_token_exp: i64, now: i64, max_secs: i64) -> i64 {
    id_token_exp.min(now.saturating_add(max_secs.max(0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ch(s: &str) -> ClaimHeader {
        s.parse().expect("valid claim header")
    }

    #[test]
    fn claim_header_parses_claim_and_header() {
        let c = ch("email:X-User-Email");
        assert_eq!(c.claim(), "email");
        assert_eq!(c.header(), "X-User-Email");
        assert_eq!(c.to_string(), "email:X-User-Email");
    }

    #[test]
    fn claim_header_splits_on_the_last_colon() {
        let c = ch("urn:example:groups:X-Groups");
        assert_eq!(c.claim(), "urn:example:groups");
        assert_eq!(c.header(), "X-Groups");
    }

    #[test]
    fn claim_header_accepts_every_allowed_character() {
        let c = ch("a-Z_0.9:b:X!#$%&'*+-.^_`|~9");
        assert_eq!(c.claim(), "a-Z_0.9:b");
        assert_eq!(c.header(), "X!#$%&'*+-.^_`|~9");
        let long_claim = "c".repeat(MAX_CLAIM_NAME_LEN);
        let long_header = "h".repeat(MAX_HEADER_NAME_LEN);
        assert!(format!("{long_claim}:{long_header}")
            .parse::<ClaimHeader>()
            .is_ok());
    }

    #[test]
    fn claim_header_without_separator_is_refused() {
        assert_eq!(
            "email".parse::<ClaimHeader>(),
            Err(ClaimHeaderError::MissingSeparator {
                input: "email".into()
            })
        );
    }

    #[test]
    fn claim_header_with_bad_claim_is_refused() {
        assert_eq!(
            ":X-User".parse::<ClaimHeader>(),
            Err(ClaimHeaderError::Claim(ClaimNameError::Empty))
        );
        assert_eq!(
            "e mail:X-User".parse::<ClaimHeader>(),
            Err(ClaimHeaderError::Claim(ClaimNameError::BadChar {
                claim: "e mail".into(),
                ch: ' ',
                position: 1
            }))
        );
        assert!(matches!(
            "https://x/claims/email:X-User".parse::<ClaimHeader>(),
            Err(ClaimHeaderError::Claim(ClaimNameError::BadChar {
                ch: '/',
                ..
            }))
        ));
        assert!(matches!(
            "émail:X-User".parse::<ClaimHeader>(),
            Err(ClaimHeaderError::Claim(ClaimNameError::BadChar {
                ch: 'é',
                position: 0,
                ..
            }))
        ));
        let long = format!("{}:X-User", "c".repeat(MAX_CLAIM_NAME_LEN + 1));
        assert_eq!(
            long.parse::<ClaimHeader>(),
            Err(ClaimHeaderError::Claim(ClaimNameError::TooLong {
                len: MAX_CLAIM_NAME_LEN + 1,
                max: MAX_CLAIM_NAME_LEN
            }))
        );
    }

    #[test]
    fn claim_header_with_bad_header_is_refused() {
        assert_eq!(
            "email:".parse::<ClaimHeader>(),
            Err(ClaimHeaderError::EmptyHeader)
        );
        for (input, bad) in [
            ("email:X User", ' '),
            ("email:X-User\r\nEvil", '\r'),
            ("email:X(User)", '('),
            ("email:X/User", '/'),
            ("email:X-Üser", 'Ü'),
        ] {
            assert!(
                matches!(
                    input.parse::<ClaimHeader>(),
                    Err(ClaimHeaderError::HeaderChar { ch, .. }) if ch == bad
                ),
                "{input:?}"
            );
        }
        let long = format!("email:{}", "h".repeat(MAX_HEADER_NAME_LEN + 1));
        assert_eq!(
            long.parse::<ClaimHeader>(),
            Err(ClaimHeaderError::HeaderTooLong {
                len: MAX_HEADER_NAME_LEN + 1,
                max: MAX_HEADER_NAME_LEN
            })
        );
    }

    #[test]
    fn claim_header_to_reserved_header_is_refused() {
        for header in [
            "Host",
            "connection",
            "Content-Length",
            "content_length",
            "Transfer-Encoding",
            "Upgrade",
            "Cookie",
            "AUTHORIZATION",
            "TE",
            "Trailer",
            "Keep-Alive",
            "Proxy-Authorization",
            "proxy_connection",
            "X-Forwarded-For",
            "x_forwarded_proto",
            "X-Forwarded-Host",
            "Forwarded",
        ] {
            assert_eq!(
                format!("email:{header}").parse::<ClaimHeader>(),
                Err(ClaimHeaderError::ReservedHeader {
                    header: header.into()
                }),
                "{header}"
            );
        }
        // Names that merely resemble reserved ones are fine.
        for header in [
            "X-Host",
            "Hostname",
            "X-Forwarded",
            "Cookies-Seen",
            "X-Proxy",
        ] {
            assert!(
                format!("sub:{header}").parse::<ClaimHeader>().is_ok(),
                "{header}"
            );
        }
    }

    #[test]
    fn claim_header_round_trips_through_serde_and_is_checked_on_load() {
        let c = ch("email:X-User-Email");
        let text = serde_json::to_string(&c).expect("serialise");
        assert_eq!(text, "\"email:X-User-Email\"");
        assert_eq!(
            serde_json::from_str::<ClaimHeader>(&text).expect("deserialise"),
            c
        );
        assert!(serde_json::from_str::<ClaimHeader>("\"email:Cookie\"").is_err());
    }

    #[test]
    fn duplicate_header_names_are_refused() {
        let ok = [
            ch("email:X-User-Email"),
            ch("email:X-Email"),
            ch("sub:X-User"),
        ];
        assert_eq!(ensure_distinct_headers(&ok), Ok(()));
        let dup = [ch("email:X-User"), ch("sub:X-Id"), ch("name:x_user")];
        assert_eq!(
            ensure_distinct_headers(&dup),
            Err(DuplicateClaimHeader {
                first: "X-User".into(),
                second: "x_user".into()
            })
        );
    }

    #[test]
    fn render_string_as_is() {
        assert_eq!(render_claim(&json!("a@b.c")), Some("a@b.c".into()));
        assert_eq!(render_claim(&json!("José")), Some("José".into()));
        assert_eq!(render_claim(&json!("a\tb")), Some("a\tb".into()));
        assert_eq!(render_claim(&json!("")), Some(String::new()));
    }

    #[test]
    fn render_number_and_bool_in_json_form() {
        assert_eq!(render_claim(&json!(42)), Some("42".into()));
        assert_eq!(render_claim(&json!(-7)), Some("-7".into()));
        assert_eq!(render_claim(&json!(1.5)), Some("1.5".into()));
        assert_eq!(render_claim(&json!(true)), Some("true".into()));
        assert_eq!(render_claim(&json!(false)), Some("false".into()));
    }

    #[test]
    fn render_array_and_object_as_compact_json() {
        assert_eq!(
            render_claim(&json!(["admin", "dev"])),
            Some(r#"["admin","dev"]"#.into())
        );
        assert_eq!(
            render_claim(&json!({"level": 3, "org": "acme"})),
            Some(r#"{"level":3,"org":"acme"}"#.into())
        );
        // Inside JSON a newline is escaped, so it cannot split the header.
        assert_eq!(
            render_claim(&json!(["a\r\nX-Evil: 1"])),
            Some(r#"["a\r\nX-Evil: 1"]"#.into())
        );
    }

    #[test]
    fn render_null_is_none() {
        assert_eq!(render_claim(&Value::Null), None);
        assert_eq!(render_claim_checked(&Value::Null), Ok(None));
    }

    #[test]
    fn render_refuses_crlf_nul_and_other_controls() {
        for (s, byte, position) in [
            ("a\r\nX-Admin: true", b'\r', 1),
            ("a\nb", b'\n', 1),
            ("\rb", b'\r', 0),
            ("a\0b", 0, 1),
            ("a\u{7f}", 0x7f, 1),
            ("a\u{1b}[31m", 0x1b, 1),
        ] {
            assert_eq!(render_claim(&json!(s)), None, "{s:?}");
            assert_eq!(
                render_claim_checked(&json!(s)),
                Err(ClaimValueError::ControlChar { byte, position }),
                "{s:?}"
            );
        }
    }

    #[test]
    fn render_refuses_oversized_values() {
        let max = "x".repeat(MAX_CLAIM_VALUE_LEN);
        assert_eq!(render_claim(&json!(max)), Some(max.clone()));
        let over = format!("{max}x");
        assert_eq!(
            render_claim_checked(&json!(over)),
            Err(ClaimValueError::TooLong {
                len: MAX_CLAIM_VALUE_LEN + 1,
                max: MAX_CLAIM_VALUE_LEN
            })
        );
    }

    #[test]
    fn claim_headers_sets_present_claims_and_skips_missing_ones() {
        let mappings = [
            ch("email:X-User-Email"),
            ch("missing:X-Missing"),
            ch("groups:X-Groups"),
            ch("null:X-Null"),
            ch("evil:X-Evil"),
            ch("email_verified:X-Verified"),
            ch("email:X-Email-Again"),
        ];
        let claims = json!({
            "email": "a@b.c",
            "groups": ["admin"],
            "null": null,
            "evil": "x\r\nX-Admin: true",
            "email_verified": true,
        });
        let Value::Object(claims) = claims else {
            panic!("object literal");
        };
        assert_eq!(
            claim_headers(&mappings, &claims),
            vec![
                ("X-User-Email".to_owned(), "a@b.c".to_owned()),
                ("X-Groups".to_owned(), r#"["admin"]"#.to_owned()),
                ("X-Verified".to_owned(), "true".to_owned()),
                ("X-Email-Again".to_owned(), "a@b.c".to_owned()),
            ]
        );
    }

    #[test]
    fn return_path_on_this_host_is_kept_with_its_query() {
        for raw in [
            "/",
            "/a?b=1",
            "/dashboard/settings?tab=keys&x=%2F#top",
            "/a/b//c",
            "/a%20b",
            "/search?next=https://evil.com",
            "/?//evil.com",
            "/a\\b",
            "/.well-known",
            "/%",
            "/%zz",
        ] {
            assert_eq!(safe_return_path(raw), raw, "{raw:?}");
        }
    }

    #[test]
    fn return_path_to_another_host_lands_on_root() {
        for raw in [
            "//evil.com",
            "//evil.com/path",
            "/\\evil.com",
            "/%2F/evil.com",
            "/%2f/evil.com",
            "/%5Cevil.com",
            "/%252F/evil.com",
            "/%25252F/evil.com",
            "https://evil.com",
            "http://evil.com/",
            "javascript:alert(1)",
            "data:text/html,x",
            "",
            "evil.com",
            "./a",
            "\\\\evil.com",
            "///evil.com",
        ] {
            assert_eq!(safe_return_path(raw), "/", "{raw:?}");
        }
    }

    #[test]
    fn return_path_with_control_or_space_lands_on_root() {
        for raw in [
            "/\t/evil.com",
            "/\n/evil.com",
            "/a\r\nSet-Cookie: x=1",
            "/a b",
            "/\0",
            "/é",
            "/%09/evil.com",
            "/a%0d%0aSet-Cookie:x",
        ] {
            assert_eq!(safe_return_path(raw), "/", "{raw:?}");
        }
    }

    #[test]
    fn return_path_with_dot_segments_lands_on_root() {
        for raw in [
            "/..//evil.com",
            "/.//evil.com",
            "/a/../b",
            "/a/..",
            "/%2e%2e//evil.com",
            "/a\\..\\b",
        ] {
            assert_eq!(safe_return_path(raw), "/", "{raw:?}");
        }
    }

    #[test]
    fn return_path_length_is_bounded() {
        let max = format!("/{}", "a".repeat(MAX_RETURN_PATH_LEN - 1));
        assert_eq!(safe_return_path(&max), max);
        let over = format!("/{}", "a".repeat(MAX_RETURN_PATH_LEN));
        assert_eq!(safe_return_path(&over), "/");
    }

    #[test]
    fn return_path_decoding_rounds_are_bounded() {
        // Still decodable after the last round: refused rather than trusted.
        let mut raw = "/%2F".to_owned();
        for _ in 0..MAX_DECODE_ROUNDS {
            raw = raw.replace('%', "%25");
        }
        assert_eq!(safe_return_path(&raw), "/");
        assert!(!is_safe_return_path(&raw));
    }

    #[test]
    fn pkce_matches_rfc7636_appendix_b() {
        let octets: [u8; 32] = [
            116, 24, 223, 180, 151, 153, 224, 37, 79, 250, 96, 125, 216, 173, 187, 186, 22, 212,
            37, 77, 105, 214, 191, 240, 91, 88, 5, 88, 83, 132, 141, 121,
        ];
        let verifier = pkce_verifier(octets);
        assert_eq!(verifier, "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk");
        assert_eq!(
            pkce_challenge_s256(&verifier),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn pkce_verifier_is_43_unreserved_characters() {
        for random in [[0u8; 32], [0xff; 32], [0xfb; 32]] {
            let v = pkce_verifier(random);
            assert_eq!(v.len(), 43);
            assert!(v
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~')));
        }
    }

    #[test]
    fn random_token_is_url_safe_and_distinct_per_input() {
        let a = random_token([1; 32]);
        let b = random_token([2; 32]);
        assert_eq!(a.len(), 43);
        assert_ne!(a, b);
        assert!(a
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    }

    #[test]
    fn tokens_match_only_equal_non_empty_tokens() {
        let s = random_token([7; 32]);
        assert!(tokens_match(&s, &s));
        assert!(!tokens_match(&s, &random_token([8; 32])));
        assert!(!tokens_match(&s, &s[..42]));
        assert!(!tokens_match(&s, ""));
        assert!(!tokens_match("", ""));
    }

    #[test]
    fn render_refuses_values_a_receiver_would_trim() {
        for v in [" admin@corp", "admin@corp ", "\tadmin", "admin\t", " "] {
            assert_eq!(
                render_claim_checked(&json!(v)),
                Err(ClaimValueError::SurroundingWhitespace),
                "{v:?}"
            );
            assert_eq!(render_claim(&json!(v)), None);
        }
        // Inner spaces are fine; so is the empty string.
        assert_eq!(render_claim(&json!("Jane Doe")), Some("Jane Doe".into()));
        assert_eq!(render_claim(&json!("")), Some(String::new()));
    }

    #[test]
    fn session_never_outlives_the_id_token() {
        let now = 1_700_000_000;
        // Token expires before the cap: its exp wins.
        assert_eq!(session_expiry(now + 300, now, 3600), now + 300);
        // Token outlives the cap: the cap wins.
        assert_eq!(session_expiry(now + 86_400, now, 3600), now + 3600);
        // An already-expired token gives an already-expired session.
        assert_eq!(session_expiry(now - 1, now, 3600), now - 1);
        // Negative cap counts as zero; huge values do not overflow.
        assert_eq!(session_expiry(now + 300, now, -5), now);
        assert_eq!(session_expiry(i64::MAX, i64::MAX - 1, i64::MAX), i64::MAX);
    }

    #[test]
    fn session_expires_at_its_expiry_second() {
        let now = 1_700_000_000;
        let session = SessionClaims::start("user-1".into(), Map::new(), now + 600, None, now, 3600);
        assert_eq!(session.ends_at, now + 3600);
        assert!(!session.is_expired(now));
        assert!(!session.is_expired(now + 599));
        assert!(session.is_expired(now + 600));
        assert_eq!(session.state(now + 600), SessionState::Over);
        assert_eq!(session.max_age_secs(now), 600);
        assert_eq!(session.max_age_secs(now + 700), 0);
    }

    #[test]
    fn a_refresh_token_keeps_the_cookie_until_the_cap_and_the_claims_until_the_token() {
        let now = 1_700_000_000;
        let session = SessionClaims::start(
            "user-1".into(),
            Map::new(),
            now + 60,
            Some("rt-1".into()),
            now,
            3600,
        );
        assert_eq!(session.state(now + 59), SessionState::Active);
        assert_eq!(session.state(now + 60), SessionState::Refreshable);
        assert_eq!(session.state(now + 3599), SessionState::Refreshable);
        assert_eq!(session.state(now + 3600), SessionState::Over);
        // The browser keeps the cookie for the whole session, not just the
        // ID token's minute.
        assert_eq!(session.max_age_secs(now), 3600);
    }

    #[test]
    fn refreshing_keeps_the_user_the_session_id_and_the_cap() {
        let now = 1_700_000_000;
        let Value::Object(first) = json!({"email": "old@b.c", "sid": "s-1"}) else {
            panic!("object literal");
        };
        let session = SessionClaims::start(
            "user-1".into(),
            first,
            now + 60,
            Some("rt-1".into()),
            now,
            3600,
        );
        let Value::Object(fresh) = json!({"email": "new@b.c", "sid": "forged"}) else {
            panic!("object literal");
        };
        // A rotated refresh token replaces the old one; the claims are the
        // new token's, but the kept session id is the session's own.
        let r = session
            .refreshed(
                "user-1",
                fresh.clone(),
                now + 3000 + 600,
                Some("rt-2".into()),
                now + 3000,
                &["sid"],
            )
            .expect("same user");
        assert_eq!(r.claims["email"], "new@b.c");
        assert_eq!(r.claims["sid"], "s-1");
        assert_eq!(r.refresh_token.as_deref(), Some("rt-2"));
        // The new token outlives the cap: the claims stop at the cap.
        assert_eq!(r.expires_at, now + 3600);
        assert_eq!(r.ends_at, now + 3600);
        // Without a rotated token the old one is kept.
        let r = session
            .refreshed("user-1", fresh.clone(), now + 200, None, now + 100, &[])
            .expect("same user");
        assert_eq!(r.refresh_token.as_deref(), Some("rt-1"));
        assert_eq!(r.expires_at, now + 200);
        // Another user is refused; so is a refresh after the cap.
        assert_eq!(
            session.refreshed("user-2", fresh.clone(), now + 200, None, now + 100, &[]),
            Err(RefreshError::OtherSubject {
                expected: "user-1".into(),
                got: "user-2".into()
            })
        );
        assert_eq!(
            session.refreshed("user-1", fresh, now + 9000, None, now + 3600, &[]),
            Err(RefreshError::SessionOver)
        );
    }

    #[test]
    fn session_claims_round_trip_through_json() {
        let Value::Object(claims) = json!({"email": "a@b.c", "groups": ["x"]}) else {
            panic!("object literal");
        };
        let session = SessionClaims::start("user-1".into(), claims, 42, Some("rt".into()), 0, 100);
        let text = serde_json::to_string(&session).expect("serialise");
        assert_eq!(
            serde_json::from_str::<SessionClaims>(&text).expect("deserialise"),
            session
        );
    }
}
