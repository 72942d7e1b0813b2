//! One-time codes for another coordinator to join the cluster
//! (`miren cluster coordinator-code`, redeemed by `miren server --join`).
//!
//! The code has the runner join code's format and rules
//! (`identity::join_token`) under its own kind (`mrenc_`) and its own store
//! records (`coordcode/<id>`), so neither kind of code is ever accepted for
//! the other. It carries every coordinator's address and the CA
//! fingerprint (the joining side dials pinned); the store keeps only the
//! secret's SHA-256. Redeeming is one compare-and-set on the record: a code
//! admits exactly one coordinator, even when two race with it. Codes exist
//! only on a shared store (`--etcd`): on the embedded store there is no
//! second coordinator to admit.

use identity::join_token::{
    check_coordinator_ttl, secret_hash, JoinRefusal, JoinToken, JoinTokenRecord,
};
use identity::ClusterAddress;

use crate::store::{decode, encode, Condition, Op, Outcome, Store, StoreError, Txn};

/// Store prefix of the codes' records.
pub const PREFIX: &str = "coordcode/";

/// Why a code could not be made or was refused.
#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    #[error("coordinator code refused: {0}")]
    Refused(#[from] JoinRefusal),
    #[error(transparent)]
    Ttl(#[from] identity::join_token::JoinTokenTtlError),
    #[error("the cluster address has no CA fingerprint to pin")]
    NoFingerprint,
    #[error("code id collision; try again")]
    IdCollision,
    /// The cluster does not share its state: there is nothing to join.
    #[error("this cluster keeps its state in the data dir's embedded store, so no other coordinator can join it; coordinators that share a cluster run with --etcd")]
    NotShared,
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn key(id: &str) -> String {
    format!("{PREFIX}{id}")
}

/// Makes a one-time code for `address` living `ttl_secs` (at most a day)
/// and stores its record; returns the code and the record.
pub fn create(
    store: &dyn Store,
    address: &ClusterAddress,
    ttl_secs: u64,
    now: i64,
) -> Result<(String, JoinTokenRecord), CodeError> {
    let ttl = check_coordinator_ttl(ttl_secs)?;
    crate::runners::forget_expired_codes(store, PREFIX, now)?;
    let mut secret = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let code = JoinToken::coordinator(id.clone(), address.clone(), secret)
        .ok_or(CodeError::NoFingerprint)?;
    let record = JoinTokenRecord {
        id: id.clone(),
        secret_sha256: secret_hash(&secret),
        created_unix: now,
        expires_unix: now + ttl as i64,
        reusable: false,
        uses: 0,
        revoked: false,
        name: String::new(),
        labels: vec![],
    };
    let outcome = store.commit(Txn {
        conditions: vec![Condition::Absent(key(&id))],
        ops: vec![Op::Put(key(&id), encode(&record))],
    })?;
    if outcome != Outcome::Applied {
        return Err(CodeError::IdCollision);
    }
    Ok((code.encode(), record))
}

/// Spends the code `id` with `secret` at `now`: refused when unknown, of a
/// wrong secret, used, revoked or expired (nothing changes then).
pub fn redeem(store: &dyn Store, id: &str, secret: &[u8], now: i64) -> Result<(), CodeError> {
    if !identity::join_token::valid_id(id) {
        return Err(JoinRefusal::BadFormat.into());
    }
    let secret: [u8; 32] = secret.try_into().map_err(|_| JoinRefusal::BadFormat)?;
    let key = key(id);
    for _attempt in 0..8 {
        let bytes = store.get(&key)?.ok_or(JoinRefusal::Unknown)?;
        let record: JoinTokenRecord = decode(&key, &bytes)?;
        let redeemed = record.redeem(&secret, now)?;
        let outcome = store.commit(Txn {
            conditions: vec![Condition::Equals(key.clone(), bytes)],
            ops: vec![Op::Put(key.clone(), encode(&redeemed))],
        })?;
        if outcome == Outcome::Applied {
            return Ok(());
        }
        // Another redeemed it meanwhile: decide again on the new record.
    }
    Err(JoinRefusal::UsedOrRevoked.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;

    fn setup() -> (tempfile::TempDir, std::sync::Arc<dyn Store>, ClusterAddress) {
        let d = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(RedbStore::open(&d.path().join("s.redb")).unwrap());
        let a = "c:1,d:2;sha1:0123456789abcdef0123456789abcdef01234567"
            .parse()
            .unwrap();
        (d, s, a)
    }

    #[test]
    fn a_code_admits_one_coordinator_once() {
        let (_d, store, addr) = setup();
        let (code, record) = create(&*store, &addr, 3600, 1000).unwrap();
        let parsed =
            JoinToken::parse_kind(&code, identity::join_token::JoinKind::Coordinator).unwrap();
        assert_eq!(parsed.address.to_string(), addr.to_string());
        assert!(
            !String::from_utf8_lossy(&store.get(&key(&record.id)).unwrap().unwrap())
                .contains(&hex::encode(parsed.secret))
        );
        redeem(&*store, &parsed.id, &parsed.secret, 1001).unwrap();
        assert!(matches!(
            redeem(&*store, &parsed.id, &parsed.secret, 1002),
            Err(CodeError::Refused(JoinRefusal::UsedOrRevoked))
        ));
    }

    #[test]
    fn codes_a_week_past_expiry_are_forgotten_when_the_next_is_made() {
        use identity::join_token::KEEP_EXPIRED_SECS;
        let (_d, store, addr) = setup();
        let (_, old) = create(&*store, &addr, 3600, 1000).unwrap();
        let (_, used) = create(&*store, &addr, 7200, 1000).unwrap();
        // A runner's join token under its own prefix is not this kind's.
        store
            .commit(Txn {
                conditions: vec![],
                ops: vec![Op::Put(
                    "jointoken/r1".into(),
                    encode(&JoinTokenRecord {
                        id: "r1".into(),
                        expires_unix: 0,
                        ..old.clone()
                    }),
                )],
            })
            .unwrap();
        // Within the week after its expiry the old one is still known...
        let (_, _) = create(
            &*store,
            &addr,
            3600,
            old.expires_unix + KEEP_EXPIRED_SECS - 1,
        )
        .unwrap();
        assert!(store.get(&key(&old.id)).unwrap().is_some());
        // ...then forgotten; the one expiring later stays until its week.
        let (_, newest) =
            create(&*store, &addr, 3600, old.expires_unix + KEEP_EXPIRED_SECS).unwrap();
        assert!(store.get(&key(&old.id)).unwrap().is_none());
        assert!(store.get(&key(&used.id)).unwrap().is_some());
        assert!(store.get(&key(&newest.id)).unwrap().is_some());
        assert!(store.get("jointoken/r1").unwrap().is_some());
        assert_eq!(store.scan(PREFIX).unwrap().len(), 3);
    }

    #[test]
    fn expired_wrong_and_runner_codes_are_refused_and_change_nothing() {
        let (_d, store, addr) = setup();
        let (code, record) = create(&*store, &addr, 60, 1000).unwrap();
        let parsed =
            JoinToken::parse_kind(&code, identity::join_token::JoinKind::Coordinator).unwrap();
        let before = store.get(&key(&record.id)).unwrap();
        assert!(matches!(
            redeem(&*store, &parsed.id, &parsed.secret, 1060),
            Err(CodeError::Refused(JoinRefusal::Expired))
        ));
        assert!(matches!(
            redeem(&*store, &parsed.id, &[1u8; 32], 1001),
            Err(CodeError::Refused(JoinRefusal::Unknown))
        ));
        assert_eq!(store.get(&key(&record.id)).unwrap(), before);
        // A runner join code's record is not a coordinator code's.
        let registry =
            crate::runners::Registry::new(store.clone(), std::time::Duration::from_secs(3600));
        let (runner_code, _) = registry
            .create_token(&addr, 60, false, "", vec![], 1000)
            .unwrap();
        let runner = JoinToken::parse(&runner_code).unwrap();
        assert!(matches!(
            redeem(&*store, &runner.id, &runner.secret, 1001),
            Err(CodeError::Refused(JoinRefusal::Unknown))
        ));
        assert!(matches!(
            create(&*store, &addr, 169 * 3600, 1000),
            Err(CodeError::Ttl(_))
        ));
    }
}
