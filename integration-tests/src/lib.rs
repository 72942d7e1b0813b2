//! Helpers for driving the real `miren` binary from tests.
