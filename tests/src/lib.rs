//! Shared helpers for nomoat's test suites.
pub mod refdata;
pub mod gpu;
pub mod support;
