//! Pure identity rules of miren, free of IO and clocks.
//!
//! Like quinn-proto under quinn, this crate holds the policy and the IO crates
//! (`transport`, `coordinator`, `runner`, `cli`) translate between the wire and
//! these functions. Every time-dependent rule takes `now` as an argument.

#![warn(missing_docs)]
// No `unwrap`/`expect` outside tests: input never panics this crate.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod address;
pub mod bindings;
pub mod breadth;
pub mod claims;
pub mod documents;
pub mod explain;
pub mod glob;
pub mod headers;
pub mod inspect;
pub mod ip;
pub mod join_token;
pub mod keys;
pub mod mint;
pub mod names;
pub mod renewal;
pub mod route_oidc;
pub mod used_states;
pub mod verify;

pub use address::{AddressError, ClusterAddress, Fingerprint, HostPort};
pub use bindings::{
    issuer_host_is_private_or_loopback, issuer_literal_address, Binding, BindingError, BindingSet,
    BindingSetError, Condition, IdDrift, IdPin, Match, MatchRefusal, NoMatch,
};
pub use breadth::{check_breadth, Breadth, BroadPattern};
pub use claims::{
    clamp_ttl, ClaimsError, Subject, SubjectError, SubjectField, WorkloadClaims, DEFAULT_AUDIENCE,
    DEFAULT_TTL_SECS, MAX_TTL_SECS, MIN_TTL_SECS,
};
pub use documents::{DiscoveryDocument, DiscoveryError, IssuerUrl, IssuerUrlError, Jwks};
pub use explain::{Check, CheckOutcome, Explanation, Verdict};
pub use glob::{Glob, GlobError};
pub use inspect::{inspect, peek_claims, InspectError, KidLookup, UnverifiedToken};
pub use ip::{classify, is_public, AddressClass, AddressPolicy, CidrError, IpCidr, Refused};
pub use keys::{Algorithm, Jwk, JwkError, KeyError, KeyMaterial, PublicKey, SigningKeyPair};
pub use mint::{MintError, Minter};
pub use names::{
    check_app_name, check_claim_name, check_name, ClaimNameError, NameError, NameKind,
};
pub use used_states::{StateRefusal, UsedStates};
pub use verify::{
    KeySet, KeySetError, MalformedToken, VerifiedToken, Verifier, VerifyError, DEFAULT_LEEWAY_SECS,
    MAX_TOKEN_BYTES,
};
