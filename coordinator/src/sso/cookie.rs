//! Route OIDC's cookies: their names, what each is bound to, and the key
//! that seals them.
//!
//! Every cookie of ours is sealed with AES-256-GCM under one key
//! (`<data dir>/route-oidc.key`, created once, 0600, written through
//! `transport::files`), with a [`CookieScope`] as associated data: a cookie
//! sealed for one scheme, host and provider opens nowhere else. Over HTTPS
//! the cookies are `__Host-` cookies. The app never sees them
//! ([`is_our_cookie`]).

use std::path::Path;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

/// The session cookie (`__Host-` prefixed over HTTPS; see
/// [`CookieScope::cookie_name`]).
pub const SESSION_COOKIE: &str = "miren_oidc_session";
/// The login-in-progress cookies: `miren_oidc_login_<state prefix>`, one
/// per login, so logins started in several tabs do not clash.
pub const LOGIN_COOKIE: &str = "miren_oidc_login";
/// How many characters of `state` name its login cookie.
const LOGIN_COOKIE_STATE_CHARS: usize = 12;

/// The login cookie's base name for `state` (None when `state` is too
/// short to be one of ours).
pub(super) fn login_cookie_for(state: &str) -> Option<String> {
    let prefix = state.get(..LOGIN_COOKIE_STATE_CHARS)?;
    prefix
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        .then(|| format!("{LOGIN_COOKIE}_{prefix}"))
}

/// Cookies of ours, by any of their names: never passed to the app, and
/// never set by one. ASCII case is ignored (browsers compare the `__Host-`
/// prefix so), and so is space around the name.
pub fn is_our_cookie(name: &[u8]) -> bool {
    let name = name.trim_ascii().to_ascii_lowercase();
    let name = name.strip_prefix(b"__host-").unwrap_or(&name);
    name.starts_with(b"miren_oidc_")
}

/// Largest sealed session cookie value set: browsers drop cookies over
/// about 4 KiB (name and attributes included), which would loop the user
/// through the login forever.
pub const MAX_COOKIE_VALUE_BYTES: usize = 3800;

/// What a sealed cookie is bound to: the scheme, the host, and the
/// provider's issuer and client. A cookie sealed for one never opens for
/// another: not at another host, not on the other listener, not after the
/// route's provider changed.
#[derive(Debug, Clone, Copy)]
pub struct CookieScope<'a> {
    pub secure: bool,
    pub host: &'a str,
    pub issuer: &'a str,
    pub client_id: &'a str,
}

impl CookieScope<'_> {
    pub(super) fn aad(&self, kind: &str) -> String {
        let scheme = if self.secure { "https" } else { "http" };
        format!(
            "{kind}|{scheme}|{}|{}|{}",
            self.host, self.issuer, self.client_id
        )
    }

    /// The name of cookie `base` here: `__Host-<base>` over HTTPS, which a
    /// browser accepts only from this exact host (Secure, Path=/, no
    /// Domain), so a sibling host cannot plant one.
    pub fn cookie_name(&self, base: &str) -> String {
        if self.secure {
            format!("__Host-{base}")
        } else {
            base.to_string()
        }
    }

    /// A `Set-Cookie` header for cookie `base` (HttpOnly, SameSite=Lax,
    /// Path=/, and Secure over HTTPS).
    pub(super) fn set_cookie(&self, base: &str, value: &str, max_age: i64) -> (String, String) {
        (
            "set-cookie".into(),
            format!(
                "{}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}{}",
                self.cookie_name(base),
                max_age.max(0),
                if self.secure { "; Secure" } else { "" }
            ),
        )
    }
}

/// Every value of cookie `name`, in order: a browser may send several
/// (another path's, a planted one), and the first need not be ours.
pub(super) fn cookie_values<'a>(
    cookies: &'a str,
    name: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    cookies.split(';').filter_map(move |c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// The data dir file of the cookie key (without `--etcd`; with it, the
/// key is the cluster's shared record `secret/route-oidc-key`).
pub const COOKIE_KEY_FILE: &str = "route-oidc.key";

/// The key that seals and opens our cookies.
pub struct CookieKey(LessSafeKey);

impl CookieKey {
    /// Loads the key from `path`, creating it once.
    pub(super) fn load_or_create(path: &Path) -> anyhow::Result<CookieKey> {
        let bytes = transport::files::secret_32(path, "delete it to end every route OIDC session")?;
        Self::from_bytes(&bytes)
            .map_err(|_| anyhow::anyhow!("{}: not an AES-256 key", path.display()))
    }

    /// The key from its 32 bytes (the cluster's shared one).
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<CookieKey, aws_lc_rs::error::Unspecified> {
        Ok(CookieKey(LessSafeKey::new(UnboundKey::new(
            &AES_256_GCM,
            bytes,
        )?)))
    }

    /// `plain` sealed with `aad` as associated data: nonce and ciphertext,
    /// base64url.
    pub(super) fn seal(&self, aad: &str, plain: &[u8]) -> Option<String> {
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let mut buf = plain.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(aad.as_bytes()),
                &mut buf,
            )
            .ok()?;
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&buf);
        Some(URL_SAFE_NO_PAD.encode(out))
    }

    /// What [`CookieKey::seal`] sealed with the same `aad`, if `sealed` is
    /// that, unaltered.
    pub(super) fn open(&self, aad: &str, sealed: &str) -> Option<Vec<u8>> {
        let raw = URL_SAFE_NO_PAD.decode(sealed).ok()?;
        if raw.len() < NONCE_LEN + 16 || raw.len() > 16 * 1024 {
            return None;
        }
        let (n, ct) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(n).ok()?;
        let mut buf = ct.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf)
            .ok()?;
        Some(plain.to_vec())
    }
}
