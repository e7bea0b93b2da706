//! Which task-signing keys the agent trusts, and how it learns new ones.
//!
//! The control plane publishes every task-signing key it ever made
//! (`GET /v1/agent/signing-keys`, over the authenticated channel, and in
//! the enrolment answer), but that list comes out of its database, and
//! signed tasks exist precisely so that a database an attacker can write to
//! cannot command a node. So the agent takes a key — or a change to its
//! retirement — only with the control-plane CA's signature over the key,
//! the time it starts signing and the time it retires
//! (`keel_task::key_statement`). That CA is the one the operator pinned
//! when the node joined, and its private key stays sealed by the KMS.
//! Retirement only ever moves earlier: a list that un-retires a key, or
//! retires it later, changes nothing. Keys are never forgotten; they are
//! trusted for tasks only until their `retires_at` by the agent's clock.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use keel_task::{KEY_STATEMENT_DOMAIN, key_id_of, key_statement, verifying_key_from_base64};
use serde::Deserialize;

use crate::state::SigningKeyRecord;

/// One key as the control plane lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PublishedKey {
    pub key_id: String,
    pub public_key: String,
    pub signs_from: i64,
    #[serde(default)]
    pub retires_at: Option<i64>,
    /// Base64 of the control-plane CA's signature (DER ECDSA).
    pub ca_signature: String,
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

/// Checks one published key: a real key, under its own id, with the
/// control-plane CA's signature over exactly these times.
fn vouched_for(key: &PublishedKey, control_plane_ca_der: &[u8]) -> Result<(), &'static str> {
    let public = verifying_key_from_base64(&key.public_key).map_err(|_| "not a public key")?;
    if key_id_of(&public) != key.key_id {
        return Err("listed under another key id");
    }
    let signature = BASE64
        .decode(&key.ca_signature)
        .map_err(|_| "signature is not base64")?;
    let statement = key_statement(&public, key.signs_from, key.retires_at);
    if !keel_pki::verify_statement(
        control_plane_ca_der,
        KEY_STATEMENT_DOMAIN,
        &statement,
        &signature,
    ) {
        return Err("not signed by the control-plane CA this node trusts");
    }
    Ok(())
}

/// Merges a published list into the agent's records. See the module docs.
pub fn merge(
    known: &[SigningKeyRecord],
    published: &[PublishedKey],
    control_plane_ca_der: &[u8],
) -> Merged {
    let mut merged = Merged {
        records: known.to_vec(),
        ..Merged::default()
    };
    let index: HashMap<String, usize> = merged
        .records
        .iter()
        .enumerate()
        .map(|(at, record)| (record.key_id.clone(), at))
        .collect();
    for key in published {
        if let Err(reason) = vouched_for(key, control_plane_ca_der) {
            merged.refused.push((key.key_id.clone(), reason));
            continue;
        }
        match index.get(&key.key_id) {
            Some(&at) => {
                let record = &mut merged.records[at];
                if let Some(new) = key.retires_at
                    && record.retires_at.is_none_or(|current| new < current)
                {
                    record.retires_at = Some(new);
                    record.ca_signature = Some(key.ca_signature.clone());
                    merged.retired.push(key.key_id.clone());
                }
            }
            None => {
                merged.records.push(SigningKeyRecord {
                    key_id: key.key_id.clone(),
                    public_key: key.public_key.clone(),
                    signs_from: Some(key.signs_from),
                    retires_at: key.retires_at,
                    ca_signature: Some(key.ca_signature.clone()),
                });
                merged.added.push(key.key_id.clone());
            }
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_pki::{CaKind, CertificateAuthority};
    use keel_task::{TaskSigner, verifying_key_to_base64};

    fn published(
        ca: &CertificateAuthority,
        key: &TaskSigner,
        signs_from: i64,
        retires_at: Option<i64>,
    ) -> PublishedKey {
        let statement = key_statement(&key.verifying_key(), signs_from, retires_at);
        PublishedKey {
            key_id: key.key_id().to_owned(),
            public_key: verifying_key_to_base64(&key.verifying_key()),
            signs_from,
            retires_at,
            ca_signature: BASE64
                .encode(ca.sign_statement(KEY_STATEMENT_DOMAIN, &statement).unwrap()),
        }
    }

    #[test]
    fn keys_the_ca_vouches_for_are_learned_and_retired_only_earlier() {
        let ca = CertificateAuthority::generate(CaKind::ControlPlane).unwrap();
        let (k1, k2) = (TaskSigner::generate(), TaskSigner::generate());
        let first = merge(&[], &[published(&ca, &k1, 0, None)], ca.cert_der());
        assert_eq!(first.added, [k1.key_id().to_owned()]);

        let rotated = [
            published(&ca, &k1, 0, Some(200)),
            published(&ca, &k2, 100, None),
        ];
        let second = merge(&first.records, &rotated, ca.cert_der());
        assert_eq!(second.added, [k2.key_id().to_owned()]);
        assert_eq!(second.retired, [k1.key_id().to_owned()]);
        assert!(second.records[0].is_live(199) && !second.records[0].is_live(200));
        assert!(!merge(&second.records, &rotated, ca.cert_der()).changed());

        // A later retirement, or none, even correctly signed, changes nothing.
        for list in [
            [published(&ca, &k1, 0, Some(500))],
            [published(&ca, &k1, 0, None)],
        ] {
            let merged = merge(&second.records, &list, ca.cert_der());
            assert!(!merged.changed());
            assert_eq!(merged.records[0].retires_at, Some(200));
        }
    }

    #[test]
    fn keys_a_database_writer_could_add_or_change_are_refused() {
        let ca = CertificateAuthority::generate(CaKind::ControlPlane).unwrap();
        let rogue_ca = CertificateAuthority::generate(CaKind::ControlPlane).unwrap();
        let (known, rogue) = (TaskSigner::generate(), TaskSigner::generate());
        let records = merge(&[], &[published(&ca, &known, 0, None)], ca.cert_der()).records;

        let by_another_ca = published(&rogue_ca, &rogue, 10, None);
        let mut moved_time = published(&ca, &rogue, 10, None);
        moved_time.signs_from = 11;
        let mut unretired = published(&ca, &known, 0, Some(50));
        unretired.retires_at = Some(40);
        let mut wrong_id = published(&ca, &rogue, 10, None);
        wrong_id.key_id = known.key_id().to_owned();
        let mut unsigned = published(&ca, &rogue, 10, None);
        unsigned.ca_signature = String::new();

        for key in [by_another_ca, moved_time, unretired, wrong_id, unsigned] {
            let merged = merge(&records, std::slice::from_ref(&key), ca.cert_der());
            assert!(!merged.changed(), "{key:?} was taken");
            assert_eq!(merged.refused.len(), 1);
        }
    }
}
