//! Labs features: parts of the coordinator that exist but are off unless
//! the operator turns them on (`miren server --labs NAME,…` or
//! `MIREN_LABS=NAME,…`).
//!
//! The set is typed so that a feature is checked by name in one place and
//! a misspelt one is refused at start with the list of known ones, rather
//! than silently leaving the feature off.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// A labs feature this coordinator knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Feature {
    /// Single sign-on in front of routes (`miren route oidc …`).
    RouteOidc,
}

impl Feature {
    /// Every known feature.
    pub const ALL: [Feature; 1] = [Feature::RouteOidc];

    /// The name operators write after `--labs`.
    pub fn name(self) -> &'static str {
        match self {
            Feature::RouteOidc => "routeoidc",
        }
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A `--labs` value that names no known feature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown labs feature {0:?} (--labs / MIREN_LABS); known features: {known}", known = known())]
pub struct UnknownFeature(pub String);

fn known() -> String {
    Feature::ALL.map(Feature::name).join(", ")
}

impl FromStr for Feature {
    type Err = UnknownFeature;

    fn from_str(s: &str) -> Result<Self, UnknownFeature> {
        Feature::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| UnknownFeature(s.to_string()))
    }
}

/// The labs features turned on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labs(BTreeSet<Feature>);

impl Labs {
    /// No feature on.
    pub fn none() -> Labs {
        Labs::default()
    }

    /// The features named in `items` (as `--labs a,b` gives them: each
    /// trimmed, empty ones skipped); an unknown name is refused.
    pub fn parse<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Labs, UnknownFeature> {
        let mut set = BTreeSet::new();
        for item in items.into_iter().map(str::trim).filter(|i| !i.is_empty()) {
            set.insert(item.parse()?);
        }
        Ok(Labs(set))
    }

    /// Whether `feature` is on.
    pub fn has(&self, feature: Feature) -> bool {
        self.0.contains(&feature)
    }

    /// `feature` turned on as well.
    pub fn with(mut self, feature: Feature) -> Labs {
        self.0.insert(feature);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_features_parse_trimmed_and_unknown_ones_are_refused() {
        let labs = Labs::parse([" routeoidc", "", "routeoidc "]).expect("known");
        assert!(labs.has(Feature::RouteOidc));
        assert_eq!(labs, Labs::none().with(Feature::RouteOidc));
        assert!(!Labs::parse([""]).expect("empty").has(Feature::RouteOidc));
        let e = Labs::parse(["routeoidc", "route-oidc"]).expect_err("unknown");
        assert_eq!(e, UnknownFeature("route-oidc".into()));
        let msg = e.to_string();
        assert!(
            msg.contains("\"route-oidc\"") && msg.contains("known features: routeoidc"),
            "{msg}"
        );
    }
}
