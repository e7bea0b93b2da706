//! A secret in its envelope, as stored:
//!
//! ```text
//! "KEV1" ‖ u8 len ‖ master key id ‖ u16 len ‖ wrapped data key ‖ nonce ‖ ciphertext ‖ tag
//! ```
//!
//! Each seal asks the KMS for a new data key, so a master-key rotation
//! applies to every write after it, and every envelope names the master
//! key that opens it. The context (e.g. `keel/pki/node-ca.key`) is the
//! AES-GCM associated data and is bound to the wrapped data key by the KMS
//! too: an envelope opened under another context fails, so one stored
//! secret cannot be swapped in for another.

use zeroize::Zeroizing;

use crate::{Kms, KmsError, WrappedKey, crypto};

const MAGIC: &[u8; 4] = b"KEV1";

/// Encrypts `secret` under a new data key and returns the envelope.
pub async fn seal<K: Kms>(kms: &K, context: &str, secret: &[u8]) -> Result<Vec<u8>, KmsError> {
    let data_key = kms.generate_data_key(context).await?;
    let key_id = data_key.wrapped.key_id.as_bytes();
    let key_id_len = u8::try_from(key_id.len()).map_err(|_| KmsError::Malformed("key id"))?;
    let blob = &data_key.wrapped.blob;
    let blob_len = u16::try_from(blob.len()).map_err(|_| KmsError::Malformed("wrapped key"))?;
    let body = crypto::seal(&data_key.plaintext, context.as_bytes(), secret)?;
    let mut out = Vec::with_capacity(MAGIC.len() + 3 + key_id.len() + blob.len() + body.len());
    out.extend_from_slice(MAGIC);
    out.push(key_id_len);
    out.extend_from_slice(key_id);
    out.extend_from_slice(&blob_len.to_be_bytes());
    out.extend_from_slice(blob);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Opens an envelope made by [`seal`] under the same context.
pub async fn open<K: Kms>(
    kms: &K,
    context: &str,
    envelope: &[u8],
) -> Result<Zeroizing<Vec<u8>>, KmsError> {
    let (wrapped, body) = parse(envelope)?;
    let data_key = kms.decrypt_data_key(&wrapped, context).await?;
    crypto::open(&data_key, context.as_bytes(), body)
}

/// The master key an envelope was sealed under (to find envelopes still
/// under a retired master key).
pub fn master_key_id(envelope: &[u8]) -> Result<String, KmsError> {
    parse(envelope).map(|(wrapped, _)| wrapped.key_id)
}

fn parse(envelope: &[u8]) -> Result<(WrappedKey, &[u8]), KmsError> {
    let rest = envelope
        .strip_prefix(MAGIC)
        .ok_or(KmsError::Malformed("no KEV1 header"))?;
    let (&key_id_len, rest) = rest.split_first().ok_or(KmsError::Malformed("truncated"))?;
    let (key_id, rest) = split(rest, usize::from(key_id_len))?;
    let (blob_len, rest) = split(rest, 2)?;
    let blob_len = u16::from_be_bytes([blob_len[0], blob_len[1]]);
    let (blob, body) = split(rest, usize::from(blob_len))?;
    let key_id = std::str::from_utf8(key_id).map_err(|_| KmsError::Malformed("key id"))?;
    Ok((
        WrappedKey {
            key_id: key_id.to_owned(),
            blob: blob.to_vec(),
        },
        body,
    ))
}

fn split(bytes: &[u8], at: usize) -> Result<(&[u8], &[u8]), KmsError> {
    if bytes.len() < at {
        return Err(KmsError::Malformed("truncated"));
    }
    Ok(bytes.split_at(at))
}
