//! A transaction opened before the handler runs and committed after it
//! answered: what idempotency keys need, so that the key, the change and
//! the response commit together or not at all.
//!
//! The idempotency layer opens the transaction, records the key in it and
//! puts a [`DeferredCommit`] in the request's extensions. The handler's
//! first `Ctx::begin` takes that transaction instead of opening one; its
//! `WriteTx::commit` writes audit and outbox rows as always but parks the
//! transaction here instead of committing. The layer then stores the
//! response in it and commits. A handler that fails (or never commits)
//! leaves nothing parked, and the transaction rolls back when dropped.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::{PgTransaction, WriteTx};

enum Slot {
    Ready(Box<WriteTx>),
    Lent,
    Parked(PgTransaction),
    Done,
}

#[derive(Clone)]
pub struct DeferredCommit {
    slot: Arc<Mutex<Slot>>,
}

impl std::fmt::Debug for DeferredCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &*self.lock() {
            Slot::Ready(_) => "ready",
            Slot::Lent => "lent",
            Slot::Parked(_) => "parked",
            Slot::Done => "done",
        };
        f.debug_struct("DeferredCommit")
            .field("state", &state)
            .finish()
    }
}

impl DeferredCommit {
    pub fn new(tx: WriteTx) -> Self {
        Self {
            slot: Arc::new(Mutex::new(Slot::Ready(Box::new(tx)))),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Slot> {
        // The lock is never held across an await or a panic point; a
        // poisoned lock still holds a consistent slot.
        self.slot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The transaction, the first time it is asked for; `None` after.
    pub fn take(&self) -> Option<WriteTx> {
        let mut slot = self.lock();
        match std::mem::replace(&mut *slot, Slot::Lent) {
            Slot::Ready(tx) => {
                let mut tx = *tx;
                tx.defer_commit_to(self.clone());
                Some(tx)
            }
            other => {
                *slot = other;
                None
            }
        }
    }

    pub(crate) fn park(&self, tx: PgTransaction) {
        *self.lock() = Slot::Parked(tx);
    }

    /// After the handler: the transaction if the handler committed it,
    /// else `None` (an untaken transaction is dropped, i.e. rolled back).
    pub fn into_parked(&self) -> Option<PgTransaction> {
        match std::mem::replace(&mut *self.lock(), Slot::Done) {
            Slot::Parked(tx) => Some(tx),
            Slot::Ready(_) | Slot::Lent | Slot::Done => None,
        }
    }
}
