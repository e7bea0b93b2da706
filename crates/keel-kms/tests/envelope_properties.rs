//! Property tests of the sealed-secret decoder: arbitrary or altered
//! envelopes never open and never panic; what was sealed opens under its
//! context only. Bounded so CI runs them on every push.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use keel_kms::{LocalKms, envelope};
use proptest::prelude::*;

fn kms() -> LocalKms {
    let path = std::env::temp_dir().join(format!(
        "keel-kms-prop-{}-{}.json",
        std::process::id(),
        rand_suffix()
    ));
    let kms = LocalKms::open_or_create(&path).unwrap();
    // The keys stay in memory; the file is not needed any more.
    let _ = std::fs::remove_file(&path);
    kms
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or(0)
}

fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(future)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_open(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let kms = kms();
        prop_assert!(block_on(envelope::open(&kms, "keel/ca/node", &bytes)).is_err());
        let _ = envelope::master_key_id(&bytes);
    }

    #[test]
    fn a_sealed_secret_opens_only_unchanged_and_under_its_context(
        secret in proptest::collection::vec(any::<u8>(), 0..256),
        position in any::<prop::sample::Index>(),
        mask in 1u8..=255,
    ) {
        let kms = kms();
        let sealed = block_on(envelope::seal(&kms, "keel/ca/node", &secret)).unwrap();
        let opened = block_on(envelope::open(&kms, "keel/ca/node", &sealed)).unwrap();
        prop_assert_eq!(opened.as_slice(), secret.as_slice());
        prop_assert!(block_on(envelope::open(&kms, "keel/ca/control-plane", &sealed)).is_err());
        let mut altered = sealed.clone();
        let at = position.index(altered.len());
        altered[at] ^= mask;
        prop_assert!(block_on(envelope::open(&kms, "keel/ca/node", &altered)).is_err());
    }
}
