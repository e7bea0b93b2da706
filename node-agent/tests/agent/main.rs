//! End-to-end tests of the node agent: one test binary (so the workspace
//! links it once) with a module per concern.

// Clippy exempts `#[test]` functions from `unwrap_used`, but not the fixture
// and stand-in servers they share; in test code a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod cli;
mod enrolment;
mod isolation;
mod report_delivery;
mod support;
mod task_channel;
mod terminal;
mod workloads;
