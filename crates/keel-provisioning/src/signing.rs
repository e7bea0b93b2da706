//! The worker's task-signing keys: every live key from the trust store
//! (`keel_inventory::trust`), reloaded periodically so that a rotation
//! made by `api keys rotate-task-signing` reaches every worker before the
//! new key's `signs_from` (the rotation overlap is much longer than the
//! reload period), with no restart.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use keel_db::Db;
use keel_inventory::trust::{self, LoadedSigner, TrustError};
use keel_kms::AnyKms;
use keel_task::{TaskError, TaskPayload};
use time::OffsetDateTime;

/// How often the worker re-reads the task-signing keys.
pub const RELOAD_PERIOD: Duration = Duration::from_secs(30);

/// The live task-signing keys, shared by the provisioning consumer.
pub struct SignerRing {
    signers: RwLock<Arc<Vec<LoadedSigner>>>,
}

/// Why a task could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("no task-signing key is live now (all retired, or none yet)")]
    NoLiveKey,
    #[error(transparent)]
    Task(#[from] TaskError),
}

impl SignerRing {
    /// Loads the live keys; fails if there is none at all.
    pub async fn load(db: &Db, kms: &AnyKms) -> Result<Self, TrustError> {
        let signers = trust::signers(db, kms).await?;
        if signers.is_empty() {
            return Err(TrustError::NoSigningKey);
        }
        Ok(Self {
            signers: RwLock::new(Arc::new(signers)),
        })
    }

    /// Re-reads the keys. Keeps the old set if the new one is empty.
    pub async fn reload(&self, db: &Db, kms: &AnyKms) -> Result<(), TrustError> {
        let signers = trust::signers(db, kms).await?;
        if signers.is_empty() {
            return Err(TrustError::NoSigningKey);
        }
        let signers = Arc::new(signers);
        match self.signers.write() {
            Ok(mut guard) => *guard = signers,
            Err(poisoned) => *poisoned.into_inner() = signers,
        }
        Ok(())
    }

    fn snapshot(&self) -> Arc<Vec<LoadedSigner>> {
        match self.signers.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// How many live keys the ring holds.
    pub fn len(&self) -> usize {
        self.snapshot().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Signs with the key that is current now.
    pub fn sign(&self, payload: &TaskPayload) -> Result<Vec<u8>, SignError> {
        let signers = self.snapshot();
        let signer = trust::current_signer(&signers, OffsetDateTime::now_utc())
            .ok_or(SignError::NoLiveKey)?;
        Ok(signer.sign_to_bytes(payload)?)
    }

    /// Reloads every [`RELOAD_PERIOD`] until `stopped` says stop. A failed
    /// reload is logged and the previous keys stay in use.
    pub async fn reload_until_stopped(
        self: Arc<Self>,
        db: Db,
        kms: Arc<AnyKms>,
        mut stopped: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut ticks = tokio::time::interval(RELOAD_PERIOD);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stopped.wait_for(|stop| *stop) => return,
            }
            if let Err(error) = self.reload(&db, &kms).await {
                tracing::warn!(error = %error, "reloading the task-signing keys failed");
            }
        }
    }
}
