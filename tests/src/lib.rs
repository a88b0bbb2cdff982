//! Shared helpers for nomoat's test suites.
pub mod gpu;
pub mod refdata;
pub mod support;
