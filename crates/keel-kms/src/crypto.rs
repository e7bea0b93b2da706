//! AES-256-GCM with a random 96-bit nonce, through ring: `nonce ‖
//! ciphertext ‖ tag`. Every key here encrypts few messages (a data key
//! one secret, a master key the data keys it wraps), far below the
//! birthday bound of random nonces.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::KmsError;

pub(crate) fn random_key() -> Result<Zeroizing<[u8; 32]>, KmsError> {
    let mut key = Zeroizing::new([0u8; 32]);
    SystemRandom::new()
        .fill(key.as_mut())
        .map_err(|_| KmsError::Random)?;
    Ok(key)
}

fn cipher(key: &[u8; 32]) -> Result<LessSafeKey, KmsError> {
    UnboundKey::new(&AES_256_GCM, key)
        .map(LessSafeKey::new)
        .map_err(|_| KmsError::Decrypt)
}

pub(crate) fn seal(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, KmsError> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| KmsError::Random)?;
    let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + AES_256_GCM.tag_len());
    out.extend_from_slice(&nonce);
    let mut body = plaintext.to_vec();
    cipher(key)?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut body,
        )
        .map_err(|_| KmsError::Seal)?;
    out.extend_from_slice(&body);
    Ok(out)
}

pub(crate) fn open(
    key: &[u8; 32],
    aad: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, KmsError> {
    if sealed.len() < NONCE_LEN + AES_256_GCM.tag_len() {
        return Err(KmsError::Decrypt);
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| KmsError::Decrypt)?;
    let mut body = Zeroizing::new(body.to_vec());
    let len = cipher(key)?
        .open_in_place(nonce, Aad::from(aad), body.as_mut_slice())
        .map_err(|_| KmsError::Decrypt)?
        .len();
    body.truncate(len);
    Ok(body)
}
