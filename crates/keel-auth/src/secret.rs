//! Opaque bearer secrets: refresh tokens, invitation tokens and, later,
//! service-account keys and personal API tokens.
//!
//! A token reads `{prefix}_{id}_…_{secret}`: a short prefix that says what it
//! is (so a leaked one is recognisable by secret scanners), the ids that
//! find its row, and 256 random bits. Only the SHA-256 of the secret is
//! stored; the token itself is shown once.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// A freshly made token: what to hand out and what to store.
pub struct NewSecret {
    /// The whole token, shown to its owner once.
    pub token: String,
    /// SHA-256 of the secret part, the only thing stored.
    pub digest: Vec<u8>,
}

/// Makes a token `{prefix}_{ids…}_{secret}`.
pub fn generate(prefix: &str, ids: &[Uuid]) -> NewSecret {
    let mut bytes = [0_u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let secret = URL_SAFE_NO_PAD.encode(bytes);
    let mut token = prefix.to_owned();
    for id in ids {
        token.push('_');
        token.push_str(&id.simple().to_string());
    }
    token.push('_');
    token.push_str(&secret);
    NewSecret {
        digest: digest(&secret),
        token,
    }
}

fn digest(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// A presented token split into its ids and secret. Anything malformed is
/// `None`: the caller answers it exactly like a wrong secret.
#[derive(Debug)]
pub struct Presented<'a, const N: usize> {
    pub ids: [Uuid; N],
    secret: &'a str,
}

impl<const N: usize> Presented<'_, N> {
    /// Whether the secret hashes to `stored`. Compares every byte, so the
    /// time taken does not depend on where a mismatch is.
    pub fn matches(&self, stored: &[u8]) -> bool {
        let presented = digest(self.secret);
        presented.len() == stored.len()
            && presented
                .iter()
                .zip(stored)
                .fold(0_u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

/// Parses `{prefix}_{N ids}_{secret}`.
pub fn parse<'a, const N: usize>(prefix: &str, token: &'a str) -> Option<Presented<'a, N>> {
    let rest = token.strip_prefix(prefix)?.strip_prefix('_')?;
    let mut ids = [Uuid::nil(); N];
    let mut rest = rest;
    for slot in &mut ids {
        let (id, tail) = rest.split_once('_')?;
        if id.len() != 32 {
            return None;
        }
        *slot = Uuid::try_parse(id).ok()?;
        rest = tail;
    }
    // The secret is 43 base64url characters; refuse anything else before
    // hashing it.
    if rest.len() != 43
        || !rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return None;
    }
    Some(Presented { ids, secret: rest })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_token_parses_back_to_its_ids_and_matches_its_digest() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let made = generate("krt", &[a, b]);
        let presented = parse::<2>("krt", &made.token).unwrap();
        assert_eq!(presented.ids, [a, b]);
        assert!(presented.matches(&made.digest));
        assert!(!presented.matches(&generate("krt", &[a, b]).digest));
    }

    #[test]
    fn malformed_tokens_do_not_parse() {
        let made = generate("krt", &[Uuid::now_v7()]);
        assert!(parse::<1>("kit", &made.token).is_none());
        assert!(parse::<2>("krt", &made.token).is_none());
        assert!(parse::<1>("krt", &format!("{}x", made.token)).is_none());
        assert!(parse::<1>("krt", "krt_zz_secret").is_none());
        assert!(parse::<1>("krt", "").is_none());
    }
}
