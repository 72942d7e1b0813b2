//! Route OIDC administration (labs: `--labs routeoidc`): what `miren route
//! oidc enable|show|disable|providers|remove-provider` may do, checked
//! before [`crate::routes`] writes it.
//!
//! Providers are stored once and reused by routes; a route's record carries
//! its provider name and claim headers. A provider name is never silently
//! reused for other settings ([`provider_use`]): that would change the
//! provider under every route using it. Listings redact client secrets.
//! The login flow at the ingress is [`crate::sso`].

use identity::route_oidc::{
    ensure_distinct_headers, ClaimHeader, ClaimHeaderError, DuplicateClaimHeader,
};
use identity::IssuerUrl;
use serde::Serialize;

use crate::labs::{Feature, Labs};
use crate::routes::{Provider, ProviderWrite, RouteOidc, Routes, RoutesError, ShownProvider};

/// Why a `route oidc` command was refused, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum RouteOidcError {
    /// The server runs without `--labs routeoidc`.
    #[error(
        "route OIDC is a labs feature: start the server with --labs {} (or MIREN_LABS={})",
        Feature::RouteOidc.name(),
        Feature::RouteOidc.name()
    )]
    Labs,
    #[error(transparent)]
    Routes(#[from] RoutesError),
    /// A `--claim-header` that does not parse.
    #[error("--claim-header {given:?}: {source}")]
    ClaimHeader {
        given: String,
        source: ClaimHeaderError,
    },
    /// Two claims mapped to one header.
    #[error(transparent)]
    DuplicateHeader(#[from] DuplicateClaimHeader),
    /// `--provider-url` is no issuer URL.
    #[error("--provider-url: {0}")]
    ProviderUrl(#[source] identity::IssuerUrlError),
    #[error("--client-id and --client-secret must not be empty")]
    EmptyClient,
    /// The provider name breaks the one name rule.
    #[error(transparent)]
    ProviderName(#[from] identity::NameError),
    /// A provider of that name exists with other settings.
    #[error("a provider named {0:?} already exists with other settings; reuse it with --provider {0} (and no --provider-url), replace it for every route that uses it with --replace-provider, or name a new one with --provider NEW-NAME")]
    ProviderConflict(String),
    #[error("give --provider NAME, or --provider-url, --client-id and --client-secret")]
    NoProviderGiven,
    /// `--provider NAME` names none.
    #[error("no provider named {0:?} (see `miren route oidc providers`)")]
    NoProvider(String),
    #[error("--provider-url, --client-id and --client-secret go together")]
    PartialProvider,
}

/// What `route oidc enable` sends (`RouteOidcConfig` on the wire, read
/// and written by [`crate::wire_types`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnableRequest {
    /// Reuse (or name) a provider.
    pub provider: Option<String>,
    pub provider_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub scope: Option<String>,
    pub claim_headers: Vec<String>,
    /// Replace an existing provider of that name that has other settings.
    pub replace_provider: bool,
}

/// What `route oidc show` shows: a route and its protection, the
/// provider's secret left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteProtection {
    pub host: String,
    pub app: String,
    /// `None` when the route is not protected.
    pub oidc: Option<ShownOidc>,
}

/// The protection in a [`RouteProtection`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShownOidc {
    /// `None` when the provider record is gone.
    pub provider: Option<ShownProvider>,
    pub claim_headers: Vec<ClaimHeader>,
}

/// What enabling with a provider's full settings does to a provider of
/// that name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderUse {
    /// None exists: create it.
    Create,
    /// One exists with the same settings: reuse it as it is.
    Reuse,
    /// One exists with other settings and `--replace-provider` was given:
    /// replace it (for every route using it).
    Replace,
    /// One exists with other settings: refuse.
    Conflict,
}

/// The provider-reuse rule: the same settings reuse, other settings
/// replace only when asked to, else conflict.
pub fn provider_use(existing: Option<&Provider>, wanted: &Provider, replace: bool) -> ProviderUse {
    match existing {
        None => ProviderUse::Create,
        Some(existing) if existing == wanted => ProviderUse::Reuse,
        Some(_) if replace => ProviderUse::Replace,
        Some(_) => ProviderUse::Conflict,
    }
}

fn ensure_labs(labs: &Labs) -> Result<(), RouteOidcError> {
    if labs.has(Feature::RouteOidc) {
        Ok(())
    } else {
        Err(RouteOidcError::Labs)
    }
}

/// A provider name derived from its URL's host (`login.example.com` ->
/// `login-example-com`).
fn name_from_url(url: &IssuerUrl) -> String {
    let host = url
        .as_str()
        .trim_start_matches("https://")
        .split(['/', ':'])
        .next()
        .unwrap_or("provider");
    host.replace('.', "-")
}

/// Protects a route with a provider (creating the provider when its
/// settings are given).
pub fn enable(
    routes: &Routes,
    labs: &Labs,
    host: &str,
    req: EnableRequest,
) -> Result<(), RouteOidcError> {
    ensure_labs(labs)?;
    let (route_bytes, route) = routes.load(host)?;
    let claim_headers: Vec<ClaimHeader> = req
        .claim_headers
        .iter()
        .map(|c| {
            c.parse::<ClaimHeader>()
                .map_err(|source| RouteOidcError::ClaimHeader {
                    given: c.clone(),
                    source,
                })
        })
        .collect::<Result<_, _>>()?;
    ensure_distinct_headers(&claim_headers)?;
    let (name, write) = match (req.provider_url, req.client_id, req.client_secret) {
        (Some(url), Some(id), Some(secret)) => {
            let issuer = IssuerUrl::parse(&url).map_err(RouteOidcError::ProviderUrl)?;
            if id.is_empty() || secret.is_empty() {
                return Err(RouteOidcError::EmptyClient);
            }
            let name = req.provider.unwrap_or_else(|| name_from_url(&issuer));
            identity::check_name(identity::NameKind::Provider, &name)?;
            let provider = Provider {
                name: name.clone(),
                issuer: issuer.as_str().to_string(),
                client_id: id,
                client_secret: secret,
                scope: req.scope.unwrap_or_else(|| "openid email profile".into()),
            };
            // A provider may protect other routes: changing it under them
            // would let another client's users in. Same settings: reuse.
            let stored = routes.provider_record(&name)?;
            let existing = stored.as_ref().map(|(_, p)| p);
            let write = match (
                provider_use(existing, &provider, req.replace_provider),
                stored,
            ) {
                (ProviderUse::Reuse, Some((bytes, _))) => ProviderWrite::Keep(bytes),
                (ProviderUse::Replace, Some((bytes, _))) => ProviderWrite::Replace(bytes, provider),
                (ProviderUse::Create, _) => ProviderWrite::Create(provider),
                _ => return Err(RouteOidcError::ProviderConflict(name)),
            };
            (name, write)
        }
        (None, None, None) => {
            let name = req.provider.ok_or(RouteOidcError::NoProviderGiven)?;
            let Some((bytes, _)) = routes.provider_record(&name)? else {
                return Err(RouteOidcError::NoProvider(name));
            };
            (name, ProviderWrite::Keep(bytes))
        }
        _ => return Err(RouteOidcError::PartialProvider),
    };
    let oidc = RouteOidc {
        provider: name,
        claim_headers,
    };
    Ok(routes.protect(host, route_bytes, route, oidc, write)?)
}

/// The protection of a route, secrets redacted.
pub fn show(routes: &Routes, labs: &Labs, host: &str) -> Result<RouteProtection, RouteOidcError> {
    ensure_labs(labs)?;
    let (_, route) = routes.load(host)?;
    let oidc = match route.oidc {
        None => None,
        Some(oidc) => Some(ShownOidc {
            provider: routes.provider(&oidc.provider)?.map(|p| p.shown()),
            claim_headers: oidc.claim_headers,
        }),
    };
    Ok(RouteProtection {
        host: host.to_string(),
        app: route.app,
        oidc,
    })
}

/// Removes a route's protection; the provider stays for reuse. Works
/// without the labs flag, so a protected route (which then answers 503)
/// can be opened up again.
pub fn disable(routes: &Routes, host: &str) -> Result<(), RouteOidcError> {
    Ok(routes.unprotect(host)?)
}

/// Every provider, secrets redacted.
pub fn providers(routes: &Routes, labs: &Labs) -> Result<Vec<ShownProvider>, RouteOidcError> {
    ensure_labs(labs)?;
    Ok(routes.providers()?.iter().map(Provider::shown).collect())
}

/// Removes a provider no route uses.
pub fn remove_provider(routes: &Routes, labs: &Labs, name: &str) -> Result<(), RouteOidcError> {
    ensure_labs(labs)?;
    Ok(routes.remove_provider(name)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(secret: &str) -> Provider {
        Provider {
            name: "login".into(),
            issuer: "https://login.example.com".into(),
            client_id: "client".into(),
            client_secret: secret.into(),
            scope: "openid".into(),
        }
    }

    #[test]
    fn a_provider_name_is_reused_only_for_the_same_settings_unless_replaced() {
        let stored = provider("s1");
        assert_eq!(provider_use(None, &stored, false), ProviderUse::Create);
        assert_eq!(provider_use(None, &stored, true), ProviderUse::Create);
        assert_eq!(
            provider_use(Some(&stored), &provider("s1"), false),
            ProviderUse::Reuse
        );
        assert_eq!(
            provider_use(Some(&stored), &provider("s1"), true),
            ProviderUse::Reuse
        );
        // Another secret (a rotation, or another client altogether).
        assert_eq!(
            provider_use(Some(&stored), &provider("s2"), false),
            ProviderUse::Conflict
        );
        assert_eq!(
            provider_use(Some(&stored), &provider("s2"), true),
            ProviderUse::Replace
        );
    }

    #[test]
    fn route_oidc_needs_its_labs_flag() {
        let e = ensure_labs(&Labs::none()).unwrap_err().to_string();
        assert!(
            e.contains("--labs routeoidc") && e.contains("MIREN_LABS=routeoidc"),
            "{e}"
        );
        assert!(ensure_labs(&Labs::none().with(Feature::RouteOidc)).is_ok());
    }
}
