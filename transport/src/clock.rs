//! The one place the edges read the wall clock as Unix seconds.
//!
//! `identity` takes `now` as an argument and never reads a clock; the
//! coordinator, the runner and the CLI pass it this.

/// Seconds since the Unix epoch, from the system clock (0 if the clock is
/// before 1970).
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
