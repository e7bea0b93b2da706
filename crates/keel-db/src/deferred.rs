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
    /// The handler dropped it without committing.
    Returned(PgTransaction),
    Done,
}

/// What became of the transaction once the handler is done.
pub enum Outcome {
    /// The handler committed: store the response and commit.
    Committed(PgTransaction),
    /// The handler never took it, or dropped it: roll it back.
    Unused(PgTransaction),
    /// Nothing to finish (already finished, or still held elsewhere).
    Gone,
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
            Slot::Returned(_) => "returned",
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

    pub(crate) fn give_back(&self, tx: PgTransaction) {
        *self.lock() = Slot::Returned(tx);
    }

    /// After the handler: the transaction to commit or to roll back.
    pub fn finish(&self) -> Outcome {
        let slot = std::mem::replace(&mut *self.lock(), Slot::Done);
        match slot {
            Slot::Parked(tx) => Outcome::Committed(tx),
            Slot::Returned(tx) => Outcome::Unused(tx),
            Slot::Ready(mut tx) => match tx.tx.take() {
                Some(inner) => Outcome::Unused(inner),
                None => Outcome::Gone,
            },
            Slot::Lent | Slot::Done => Outcome::Gone,
        }
    }
}
