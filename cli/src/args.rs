//! Parsers of command-line values (clap `value_parser`s) shared by the
//! commands, each refusing with a typed [`ArgError`] that clap shows after
//! the flag's name.

use std::time::Duration;

use runner::sandbox::IsolationMode;

/// Why a command-line value was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArgError {
    /// A count of 0 where at least one is needed.
    #[error("must be at least 1")]
    ZeroCount,
    /// A duration of 0 where time must pass.
    #[error("must be more than zero")]
    ZeroDuration,
    /// Not a whole number.
    #[error(transparent)]
    Count(#[from] std::num::ParseIntError),
    /// Not a duration (`10s`, `500ms`).
    #[error(transparent)]
    Duration(#[from] humantime::DurationError),
    /// Not a number of CPUs.
    #[error("{0:?} is not a number of CPUs (e.g. 0.5 or 2)")]
    NotCpus(String),
    /// Not a number of processes.
    #[error("{0:?} is not a whole number of processes")]
    NotPids(String),
    /// A sandbox limit outside what the runner takes.
    #[error(transparent)]
    Limit(#[from] runner::limits::LimitError),
    /// A label without `=` or without a key.
    #[error("label {0:?} must be key=value")]
    Label(String),
}

/// A whole number above zero.
pub fn positive_count(text: &str) -> Result<usize, ArgError> {
    match text.parse::<usize>()? {
        0 => Err(ArgError::ZeroCount),
        n => Ok(n),
    }
}

/// A duration above zero, in humantime form (`10s`, `500ms`).
pub fn positive_duration(text: &str) -> Result<Duration, ArgError> {
    match humantime::parse_duration(text)? {
        d if d.is_zero() => Err(ArgError::ZeroDuration),
        d => Ok(d),
    }
}

/// `KEY=VALUE` with a non-empty key.
pub fn label(s: &str) -> Result<(String, String), ArgError> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| ArgError::Label(s.to_string()))
}

/// `--sandbox-memory`: a size with a unit (`512MiB`).
pub fn sandbox_memory(text: &str) -> Result<u64, ArgError> {
    Ok(runner::limits::parse_memory(text)?)
}

/// `--sandbox-cpus`: a number of CPUs (`0.5`, `2`).
pub fn sandbox_cpus(text: &str) -> Result<u32, ArgError> {
    let cpus: f64 = text
        .parse()
        .map_err(|_| ArgError::NotCpus(text.to_string()))?;
    Ok(runner::limits::parse_cpus(cpus)?)
}

/// `--sandbox-pids`: a whole number of processes.
pub fn sandbox_pids(text: &str) -> Result<u32, ArgError> {
    let pids: i64 = text
        .parse()
        .map_err(|_| ArgError::NotPids(text.to_string()))?;
    Ok(runner::limits::parse_pids(pids)?)
}

/// `--isolation auto|bwrap|none`, listed in `--help`.
pub fn isolation() -> impl clap::builder::TypedValueParser<Value = IsolationMode> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(IsolationMode::ALL.map(IsolationMode::as_str))
        .try_map(|s| s.parse::<IsolationMode>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_durations_must_be_positive() {
        assert_eq!(positive_count("3").ok(), Some(3));
        assert!(matches!(positive_count("0"), Err(ArgError::ZeroCount)));
        assert!(matches!(positive_count("x"), Err(ArgError::Count(_))));
        assert_eq!(
            positive_duration("500ms").ok(),
            Some(Duration::from_millis(500))
        );
        assert!(matches!(
            positive_duration("0s"),
            Err(ArgError::ZeroDuration)
        ));
        assert!(matches!(
            positive_duration("soon"),
            Err(ArgError::Duration(_))
        ));
    }

    #[test]
    fn labels_and_limits() {
        assert_eq!(label("a=b=c").ok(), Some(("a".into(), "b=c".into())));
        assert!(matches!(label("=b"), Err(ArgError::Label(_))));
        assert!(matches!(label("ab"), Err(ArgError::Label(_))));
        assert!(matches!(sandbox_cpus("lots"), Err(ArgError::NotCpus(_))));
        assert!(matches!(sandbox_pids("1.5"), Err(ArgError::NotPids(_))));
        assert!(matches!(sandbox_memory("512M"), Err(ArgError::Limit(_))));
        assert_eq!(sandbox_cpus("0.5").ok(), Some(500));
    }
}
