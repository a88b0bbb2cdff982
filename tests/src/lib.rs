//! Shared helpers for nomoat's test suites.
pub mod support;
