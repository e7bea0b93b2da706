//! Which task-signing keys the agent trusts, and how it learns new ones.
//!
//! The control plane publishes every task-signing key it ever made
//! (`GET /v1/agent/signing-keys`, over the authenticated channel), but that
//! list comes out of its database, and signed tasks exist precisely so that
//! a database an attacker can write to cannot command a node. So the agent
//! takes a key it does not know yet only when a key it already knows
//! endorsed it (`keel_task::endorsement_is_valid`), and only if the
//! endorser had not retired before the new key's time — the chain leads
//! back to the keys received at enrolment. Retirement only ever moves
//! earlier: a list that un-retires a key, or retires it later, changes
//! nothing. Keys are never forgotten (a retired key still verifies the
//! endorsements of its successors); they are trusted for tasks only until
//! their `retires_at` by the agent's own clock.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use keel_task::{VerifyingKey, endorsement_is_valid, key_id_of, verifying_key_from_base64};
use serde::Deserialize;

use crate::state::SigningKeyRecord;

/// One key as `GET /v1/agent/signing-keys` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PublishedKey {
    pub key_id: String,
    pub public_key: String,
    pub signs_from: i64,
    #[serde(default)]
    pub retires_at: Option<i64>,
    #[serde(default)]
    pub endorsed_by: Option<String>,
    #[serde(default)]
    pub endorsement: Option<String>,
}

/// The body of `GET /v1/agent/signing-keys`.
#[derive(Debug, Clone, Deserialize)]
pub struct PublishedKeys {
    pub keys: Vec<PublishedKey>,
}

/// What [`merge`] made of a published list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Merged {
    /// The agent's records after the merge.
    pub records: Vec<SigningKeyRecord>,
    /// Key ids learned now.
    pub added: Vec<String>,
    /// Key ids whose retirement moved earlier now.
    pub retired: Vec<String>,
    /// Keys refused, with why.
    pub refused: Vec<(String, &'static str)>,
}

impl Merged {
    /// Whether anything changed (and must be saved).
    pub fn changed(&self) -> bool {
        !self.added.is_empty() || !self.retired.is_empty()
    }
}

/// Merges a published list into the agent's records. See the module docs.
pub fn merge(known: &[SigningKeyRecord], published: &[PublishedKey]) -> Merged {
    let mut records = known.to_vec();
    let mut merged = Merged::default();
    let mut by_id: HashMap<String, (VerifyingKey, Option<i64>)> = HashMap::new();
    for record in &records {
        if let Ok(key) = verifying_key_from_base64(&record.public_key) {
            by_id.insert(record.key_id.clone(), (key, record.retires_at));
        }
    }

    // Oldest first, so a chain K1 → K2 → K3 is walked in one pass.
    let mut published: Vec<&PublishedKey> = published.iter().collect();
    published.sort_by_key(|key| (key.signs_from, key.key_id.clone()));
    for key in published {
        if let Some(record) = records
            .iter_mut()
            .find(|record| record.key_id == key.key_id)
        {
            // Known: only an earlier retirement is taken.
            if let Some(new) = key.retires_at
                && record.retires_at.is_none_or(|current| new < current)
            {
                record.retires_at = Some(new);
                merged.retired.push(key.key_id.clone());
                if let Some(entry) = by_id.get_mut(&key.key_id) {
                    entry.1 = Some(new);
                }
            }
            continue;
        }
        match endorsed(key, &by_id) {
            Ok(public) => {
                by_id.insert(key.key_id.clone(), (public, key.retires_at));
                records.push(SigningKeyRecord {
                    key_id: key.key_id.clone(),
                    public_key: key.public_key.clone(),
                    signs_from: Some(key.signs_from),
                    retires_at: key.retires_at,
                    endorsed_by: key.endorsed_by.clone(),
                    endorsement: key.endorsement.clone(),
                });
                merged.added.push(key.key_id.clone());
            }
            Err(reason) => merged.refused.push((key.key_id.clone(), reason)),
        }
    }
    merged.records = records;
    merged
}

fn endorsed(
    key: &PublishedKey,
    known: &HashMap<String, (VerifyingKey, Option<i64>)>,
) -> Result<VerifyingKey, &'static str> {
    let public = verifying_key_from_base64(&key.public_key).map_err(|_| "not a public key")?;
    if key_id_of(&public) != key.key_id {
        return Err("listed under another key id");
    }
    let (Some(endorser_id), Some(signature)) = (&key.endorsed_by, &key.endorsement) else {
        return Err("not endorsed");
    };
    let Some((endorser, endorser_retires)) = known.get(endorser_id) else {
        return Err("endorsed by a key this node does not know");
    };
    if endorser_retires.is_some_and(|retires| key.signs_from >= retires) {
        return Err("endorsed by a key that had retired by then");
    }
    let signature = BASE64
        .decode(signature)
        .map_err(|_| "endorsement is not base64")?;
    if !endorsement_is_valid(endorser, &public, key.signs_from, &signature) {
        return Err("endorsement does not verify");
    }
    Ok(public)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_task::{TaskSigner, verifying_key_to_base64};

    fn record(signer: &TaskSigner) -> SigningKeyRecord {
        SigningKeyRecord {
            key_id: signer.key_id().to_owned(),
            public_key: verifying_key_to_base64(&signer.verifying_key()),
            ..SigningKeyRecord::default()
        }
    }

    fn published(new: &TaskSigner, by: &TaskSigner, signs_from: i64) -> PublishedKey {
        PublishedKey {
            key_id: new.key_id().to_owned(),
            public_key: verifying_key_to_base64(&new.verifying_key()),
            signs_from,
            retires_at: None,
            endorsed_by: Some(by.key_id().to_owned()),
            endorsement: Some(BASE64.encode(by.endorse(&new.verifying_key(), signs_from))),
        }
    }

    #[test]
    fn a_chain_of_endorsements_from_a_known_key_is_learned_in_one_pass() {
        let (k1, k2, k3) = (
            TaskSigner::generate(),
            TaskSigner::generate(),
            TaskSigner::generate(),
        );
        let mut old = published(&k1, &k1, 0);
        old.retires_at = Some(200);
        let mut middle = published(&k2, &k1, 100);
        middle.retires_at = Some(300);
        let list = [published(&k3, &k2, 250), middle, old];
        let merged = merge(&[record(&k1)], &list);
        assert_eq!(
            merged.added,
            [k2.key_id().to_owned(), k3.key_id().to_owned()]
        );
        assert_eq!(merged.retired, [k1.key_id().to_owned()]);
        assert!(merged.refused.is_empty());
        assert!(merged.records[0].is_live(199) && !merged.records[0].is_live(200));
        // Merging the same list again changes nothing.
        assert!(!merge(&merged.records, &list).changed());
    }

    #[test]
    fn keys_a_database_writer_could_add_are_refused() {
        let known = TaskSigner::generate();
        let rogue = TaskSigner::generate();
        let stranger = TaskSigner::generate();

        let mut unendorsed = published(&rogue, &known, 10);
        unendorsed.endorsed_by = None;
        unendorsed.endorsement = None;
        let self_endorsed = published(&rogue, &rogue, 10);
        let by_a_stranger = published(&rogue, &stranger, 10);
        let mut wrong_time = published(&rogue, &known, 10);
        wrong_time.signs_from = 11;
        let mut wrong_id = published(&rogue, &known, 10);
        wrong_id.key_id = known.key_id().to_owned() + "x";

        for key in [
            unendorsed,
            self_endorsed,
            by_a_stranger,
            wrong_time,
            wrong_id,
        ] {
            let merged = merge(&[record(&known)], &[key]);
            assert!(merged.added.is_empty(), "{merged:?}");
            assert_eq!(merged.refused.len(), 1);
        }
    }

    #[test]
    fn a_retired_endorser_endorses_nothing_after_its_retirement() {
        let (old, new) = (TaskSigner::generate(), TaskSigner::generate());
        let mut known = record(&old);
        known.retires_at = Some(100);
        let merged = merge(&[known], &[published(&new, &old, 150)]);
        assert_eq!(
            merged.refused,
            [(
                new.key_id().to_owned(),
                "endorsed by a key that had retired by then"
            )]
        );
    }

    #[test]
    fn retirement_only_moves_earlier() {
        let key = TaskSigner::generate();
        let mut known = record(&key);
        known.retires_at = Some(100);
        let mut later = published(&key, &key, 0);
        later.retires_at = Some(500);
        let mut never = later.clone();
        never.retires_at = None;
        for list in [[later], [never]] {
            let merged = merge(std::slice::from_ref(&known), &list);
            assert!(!merged.changed());
            assert_eq!(merged.records[0].retires_at, Some(100));
        }
    }
}
