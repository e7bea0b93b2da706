//! End-to-end tests live in `tests/`; this crate has no library code. They
//! need the binaries built first (`scripts/test.sh` does that).
