//! Resource limits of a sandbox: how they are written, checked and filled in.
//!
//! Why a module of pure rules: the same limits arrive from several places
//! (the runner's `--sandbox-*` flags, an app's `app.toml`, the coordinator's
//! record of a sandbox) and must be refused the same way everywhere, before
//! anything reaches a cgroup. [`LimitPolicy::resolve`] checks every value
//! again, floors included, so a record that never went through the parsers
//! (it came over the wire) is still bounded.
//!
//! Decisions:
//! - **Memory** is a whole number of bytes, bare or with one unit: `KiB`,
//!   `MiB`, `GiB`, `TiB` (powers of 1024) or `B`, `KB`, `MB`, `GB`, `TB`
//!   (powers of 1000, as SI says), case-insensitive, an optional space between.
//!   Single letters (`512M`, `1g`) and Kubernetes' `Mi` are refused: `M`
//!   means 1024² to Docker and 1000² to Kubernetes, and a limit is not the
//!   place to guess. Fractions are refused (`1.5GiB`: write `1536MiB`).
//! - **Floors**: 16 MiB of memory and 16 pids, below which the sandbox's own
//!   first processes (bubblewrap, `miren sandbox-shim`, a shell) cannot start,
//!   so the sandbox would crash-loop instead of saying why; 0.01 cpu, the
//!   smallest CFS quota the kernel takes (1 ms per 100 ms period).
//! - **Ceilings**: 1024 cpus, 4,194,304 pids (the kernel's `PID_MAX_LIMIT`);
//!   a runner's own maximum ([`LimitPolicy::max`]) is usually far lower:
//!   its RAM, its usable cores, 32,768 pids.
//! - `pids` counts tasks, threads included, as the kernel's pids controller
//!   does.

use serde::{Deserialize, Serialize};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;

/// Smallest memory limit: the sandbox's first processes need about this.
pub const MIN_MEMORY_BYTES: u64 = 16 * MIB;
/// Smallest CPU limit, in thousandths of a CPU (0.01 cpu).
pub const MIN_CPU_MILLIS: u32 = 10;
/// Largest CPU limit, in thousandths of a CPU (1024 cpus).
pub const MAX_CPU_MILLIS: u32 = 1_024_000;
/// Smallest pids limit.
pub const MIN_PIDS: u32 = 16;
/// Largest pids limit: the kernel's `PID_MAX_LIMIT`.
pub const MAX_PIDS: u32 = 4_194_304;
/// The most pids a runner grants one sandbox unless told otherwise.
pub const DEFAULT_MAX_PIDS: u32 = 32_768;
/// What a sandbox gets when neither it nor the runner's flags ask otherwise.
pub const BUILTIN_DEFAULTS: Resolved = Resolved {
    memory_bytes: 512 * MIB,
    cpu_millis: 1000,
    pids: 512,
};

/// How the accepted memory forms are told to a user.
const MEMORY_FORMS: &str = "write a whole number of bytes, alone or with a unit: \
    KiB, MiB, GiB, TiB (powers of 1024) or B, KB, MB, GB, TB (powers of 1000), \
    e.g. 512MiB or 2GiB";

/// Resource limits of one sandbox; None = not asked (the runner's default applies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    /// Thousandths of a CPU: 500 is half a CPU.
    pub cpu_millis: Option<u32>,
    pub pids: Option<u32>,
}

/// Limits with every value decided: what a sandbox's cgroup gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolved {
    pub memory_bytes: u64,
    /// Thousandths of a CPU: 500 is half a CPU.
    pub cpu_millis: u32,
    pub pids: u32,
}

/// Which limit a message is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Memory,
    Cpus,
    Pids,
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Resource::Memory => "memory",
            Resource::Cpus => "cpus",
            Resource::Pids => "pids",
        })
    }
}

/// What is wrong with a memory size's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoryProblem {
    #[error("it is empty")]
    Empty,
    #[error("it does not start with a number")]
    NotANumber,
    #[error("fractions are not accepted")]
    Fraction,
    #[error("unknown unit {0:?}")]
    UnknownUnit(String),
    #[error("it is too large")]
    Overflow,
    #[error("it is zero")]
    Zero,
}

/// Why a limit was refused. Every message names the value and the rule.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LimitError {
    #[error("invalid memory size {text:?}: {problem}; {MEMORY_FORMS}")]
    BadMemory {
        /// The text as given, cut to 64 characters.
        text: String,
        problem: MemoryProblem,
    },
    #[error(
        "memory {}: below the smallest limit a sandbox can start with, {}",
        format_memory(*bytes),
        format_memory(MIN_MEMORY_BYTES)
    )]
    MemoryTooSmall { bytes: u64 },
    #[error("invalid cpus {value}: {problem}")]
    BadCpus { value: f64, problem: &'static str },
    #[error("invalid cpus {}: must be between {} and {}", format_cpus(*millis), format_cpus(MIN_CPU_MILLIS), format_cpus(MAX_CPU_MILLIS))]
    CpuMillisOutOfRange { millis: u32 },
    #[error("invalid pids {value}: must be between {MIN_PIDS} and {MAX_PIDS}")]
    BadPids { value: i64 },
    #[error("{resource} {asked} is over this runner's maximum of {max}")]
    OverMax {
        resource: Resource,
        asked: String,
        max: String,
    },
    #[error("the runner's default {resource} {default} is over its maximum of {max}")]
    DefaultOverMax {
        resource: Resource,
        default: String,
        max: String,
    },
    #[error("could not learn this host's {what}: {detail}")]
    Host { what: &'static str, detail: String },
}

/// Parses a memory size (see the module doc for the accepted forms).
pub fn parse_memory(text: &str) -> Result<u64, LimitError> {
    let bad = |problem| LimitError::BadMemory {
        text: text.chars().take(64).collect(),
        problem,
    };
    let t = text.trim();
    if t.is_empty() {
        return Err(bad(MemoryProblem::Empty));
    }
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(bad(MemoryProblem::NotANumber));
    }
    let (number, rest) = t.split_at(digits);
    if rest.starts_with(['.', ',']) {
        return Err(bad(MemoryProblem::Fraction));
    }
    let unit = rest.trim_start();
    let scale = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => KIB,
        "mib" => MIB,
        "gib" => GIB,
        "tib" => TIB,
        "kb" => 1000,
        "mb" => 1000u64.pow(2),
        "gb" => 1000u64.pow(3),
        "tb" => 1000u64.pow(4),
        _ => {
            return Err(bad(MemoryProblem::UnknownUnit(
                unit.chars().take(16).collect(),
            )))
        }
    };
    let n: u64 = number.parse().map_err(|_| bad(MemoryProblem::Overflow))?;
    let bytes = n
        .checked_mul(scale)
        .ok_or_else(|| bad(MemoryProblem::Overflow))?;
    check_memory(bytes).map_err(|e| match e {
        LimitError::MemoryTooSmall { bytes: 0 } => bad(MemoryProblem::Zero),
        other => other,
    })?;
    Ok(bytes)
}

/// Turns a number of CPUs (0.5, 2) into thousandths of a CPU.
pub fn parse_cpus(value: f64) -> Result<u32, LimitError> {
    let bad = |problem| Err(LimitError::BadCpus { value, problem });
    if !value.is_finite() {
        return bad("not a number");
    }
    if value <= 0.0 {
        return bad("must be above 0");
    }
    if value < f64::from(MIN_CPU_MILLIS) / 1000.0 {
        return bad("below 0.01, the smallest CPU limit");
    }
    if value > f64::from(MAX_CPU_MILLIS) / 1000.0 {
        return bad("above 1024, the largest CPU limit");
    }
    // In range, so the product fits a u32 after rounding.
    Ok((value * 1000.0).round() as u32)
}

/// Checks a pids limit (tasks, threads included).
pub fn parse_pids(value: i64) -> Result<u32, LimitError> {
    match u32::try_from(value) {
        Ok(v) if (MIN_PIDS..=MAX_PIDS).contains(&v) => Ok(v),
        _ => Err(LimitError::BadPids { value }),
    }
}

/// Writes a memory size exactly, in the largest binary unit that divides it
/// (`256MiB`, `1GiB`, `1536KiB`, `1000B`); [`parse_memory`] reads it back.
// `is_multiple_of` needs Rust 1.87; the workspace says 1.85.
#[allow(clippy::manual_is_multiple_of)]
pub fn format_memory(bytes: u64) -> String {
    for (unit, scale) in [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
        if bytes != 0 && bytes % scale == 0 {
            return format!("{}{unit}", bytes / scale);
        }
    }
    format!("{bytes}B")
}

/// Writes thousandths of a CPU as a number of CPUs: `0.5`, `2`, `1.25`.
pub fn format_cpus(millis: u32) -> String {
    let whole = millis / 1000;
    let frac = millis % 1000;
    if frac == 0 {
        return whole.to_string();
    }
    let frac = format!("{frac:03}");
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

/// [`format_memory`], with a rounded reading when the exact form is in KiB or
/// bytes (a host's RAM: `24684084KiB (about 23.5GiB)`).
#[allow(clippy::manual_is_multiple_of)] // as in format_memory
fn describe_memory(bytes: u64) -> String {
    let exact = format_memory(bytes);
    if bytes < MIB || bytes % MIB == 0 {
        return exact;
    }
    let (unit, scale) = if bytes >= TIB {
        ("TiB", TIB)
    } else if bytes >= GIB {
        ("GiB", GIB)
    } else {
        ("MiB", MIB)
    };
    format!("{exact} (about {:.1}{unit})", bytes as f64 / scale as f64)
}

fn check_memory(bytes: u64) -> Result<(), LimitError> {
    if bytes < MIN_MEMORY_BYTES {
        return Err(LimitError::MemoryTooSmall { bytes });
    }
    Ok(())
}

fn check_cpu_millis(millis: u32) -> Result<(), LimitError> {
    if !(MIN_CPU_MILLIS..=MAX_CPU_MILLIS).contains(&millis) {
        return Err(LimitError::CpuMillisOutOfRange { millis });
    }
    Ok(())
}

fn check_pids(pids: u32) -> Result<(), LimitError> {
    parse_pids(i64::from(pids)).map(|_| ())
}

fn check_resolved(r: &Resolved) -> Result<(), LimitError> {
    check_memory(r.memory_bytes)?;
    check_cpu_millis(r.cpu_millis)?;
    check_pids(r.pids)
}

/// The runner's side of limits: what a sandbox gets when it asks nothing
/// (`--sandbox-memory`, `--sandbox-cpus`, `--sandbox-pids`) and the most it
/// may ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitPolicy {
    pub defaults: Resolved,
    pub max: Resolved,
}

impl LimitPolicy {
    /// A policy whose every value is within the floors and ceilings and whose
    /// defaults are at most its maxima.
    pub fn new(defaults: Resolved, max: Resolved) -> Result<LimitPolicy, LimitError> {
        check_resolved(&defaults)?;
        check_resolved(&max)?;
        let over = |resource, default: String, max: String| {
            Err(LimitError::DefaultOverMax {
                resource,
                default,
                max,
            })
        };
        if defaults.memory_bytes > max.memory_bytes {
            return over(
                Resource::Memory,
                format_memory(defaults.memory_bytes),
                describe_memory(max.memory_bytes),
            );
        }
        if defaults.cpu_millis > max.cpu_millis {
            return over(
                Resource::Cpus,
                format_cpus(defaults.cpu_millis),
                format_cpus(max.cpu_millis),
            );
        }
        if defaults.pids > max.pids {
            return over(
                Resource::Pids,
                defaults.pids.to_string(),
                max.pids.to_string(),
            );
        }
        Ok(LimitPolicy { defaults, max })
    }

    /// The policy from the runner's flags (None = flag not given): a flag
    /// over `max` is refused; a built-in default over `max` (a host with
    /// less RAM than 512 MiB) is lowered to `max`.
    pub fn with_flags(flags: Limits, max: Resolved) -> Result<LimitPolicy, LimitError> {
        let defaults = Resolved {
            memory_bytes: flags
                .memory_bytes
                .unwrap_or(BUILTIN_DEFAULTS.memory_bytes.min(max.memory_bytes)),
            cpu_millis: flags
                .cpu_millis
                .unwrap_or(BUILTIN_DEFAULTS.cpu_millis.min(max.cpu_millis)),
            pids: flags.pids.unwrap_or(BUILTIN_DEFAULTS.pids.min(max.pids)),
        };
        LimitPolicy::new(defaults, max)
    }

    /// [`LimitPolicy::with_flags`] with this host's maximum ([`host_max`]).
    pub fn for_this_host(flags: Limits) -> Result<LimitPolicy, LimitError> {
        LimitPolicy::with_flags(flags, host_max()?)
    }

    /// What a sandbox that asked `asked` gets: its values where given (each
    /// checked against the floors and this runner's maximum), the runner's
    /// defaults elsewhere.
    pub fn resolve(&self, asked: Limits) -> Result<Resolved, LimitError> {
        let over = |resource, asked: String, max: String| {
            Err(LimitError::OverMax {
                resource,
                asked,
                max,
            })
        };
        let memory_bytes = asked.memory_bytes.unwrap_or(self.defaults.memory_bytes);
        check_memory(memory_bytes)?;
        if memory_bytes > self.max.memory_bytes {
            return over(
                Resource::Memory,
                format_memory(memory_bytes),
                describe_memory(self.max.memory_bytes),
            );
        }
        let cpu_millis = asked.cpu_millis.unwrap_or(self.defaults.cpu_millis);
        check_cpu_millis(cpu_millis)?;
        if cpu_millis > self.max.cpu_millis {
            return over(
                Resource::Cpus,
                format_cpus(cpu_millis),
                format_cpus(self.max.cpu_millis),
            );
        }
        let pids = asked.pids.unwrap_or(self.defaults.pids);
        check_pids(pids)?;
        if pids > self.max.pids {
            return over(Resource::Pids, pids.to_string(), self.max.pids.to_string());
        }
        Ok(Resolved {
            memory_bytes,
            cpu_millis,
            pids,
        })
    }
}

/// The most one sandbox may have on this host: its RAM (`MemTotal`), the
/// CPUs this process may use (affinity and its own cgroup's quota, as
/// [`std::thread::available_parallelism`] sees them), [`DEFAULT_MAX_PIDS`].
pub fn host_max() -> Result<Resolved, LimitError> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(|e| LimitError::Host {
        what: "memory",
        detail: format!("/proc/meminfo: {e}"),
    })?;
    let memory_bytes = parse_meminfo_total(&meminfo).ok_or(LimitError::Host {
        what: "memory",
        detail: "no MemTotal line in /proc/meminfo".into(),
    })?;
    let cpus = std::thread::available_parallelism().map_err(|e| LimitError::Host {
        what: "CPU count",
        detail: e.to_string(),
    })?;
    let cpu_millis = u32::try_from(cpus.get())
        .unwrap_or(u32::MAX)
        .saturating_mul(1000)
        .min(MAX_CPU_MILLIS);
    Ok(Resolved {
        memory_bytes,
        cpu_millis,
        pids: DEFAULT_MAX_PIDS,
    })
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
pub fn parse_meminfo_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad_memory(text: &str) -> MemoryProblem {
        match parse_memory(text) {
            Err(LimitError::BadMemory { problem, .. }) => problem,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    #[test]
    fn memory_units() {
        assert_eq!(parse_memory("256MiB").unwrap(), 256 * MIB);
        assert_eq!(parse_memory("1GiB").unwrap(), GIB);
        assert_eq!(parse_memory("1gib").unwrap(), GIB);
        assert_eq!(parse_memory(" 2 GiB ").unwrap(), 2 * GIB);
        assert_eq!(parse_memory("1TiB").unwrap(), TIB);
        assert_eq!(parse_memory("65536KiB").unwrap(), 64 * MIB);
        assert_eq!(parse_memory("1073741824").unwrap(), GIB);
        assert_eq!(parse_memory("1073741824B").unwrap(), GIB);
        assert_eq!(parse_memory("512MB").unwrap(), 512_000_000);
        assert_eq!(parse_memory("20000KB").unwrap(), 20_000_000);
        assert_eq!(parse_memory("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_memory("1TB").unwrap(), 1_000_000_000_000);
        assert_eq!(parse_memory("16MiB").unwrap(), MIN_MEMORY_BYTES);
    }

    #[test]
    fn memory_refusals() {
        assert_eq!(bad_memory(""), MemoryProblem::Empty);
        assert_eq!(bad_memory("   "), MemoryProblem::Empty);
        assert_eq!(bad_memory("MiB"), MemoryProblem::NotANumber);
        assert_eq!(bad_memory("-1GiB"), MemoryProblem::NotANumber);
        assert_eq!(bad_memory("+1GiB"), MemoryProblem::NotANumber);
        assert_eq!(bad_memory("1.5GiB"), MemoryProblem::Fraction);
        assert_eq!(bad_memory("1,5GiB"), MemoryProblem::Fraction);
        for ambiguous in ["512M", "1g", "512Mi", "1Gi", "1k", "1 GiBs", "1GiB1", "1 2"] {
            assert!(
                matches!(bad_memory(ambiguous), MemoryProblem::UnknownUnit(_)),
                "{ambiguous}"
            );
        }
        assert_eq!(bad_memory("0"), MemoryProblem::Zero);
        assert_eq!(bad_memory("0GiB"), MemoryProblem::Zero);
        assert_eq!(
            bad_memory("99999999999999999999999"),
            MemoryProblem::Overflow
        );
        assert_eq!(bad_memory("17179869184GiB"), MemoryProblem::Overflow);
        assert_eq!(
            parse_memory("15MiB"),
            Err(LimitError::MemoryTooSmall { bytes: 15 * MIB })
        );
        assert_eq!(
            parse_memory("16777215"),
            Err(LimitError::MemoryTooSmall {
                bytes: 16 * MIB - 1
            })
        );
    }

    #[test]
    fn memory_errors_say_the_accepted_forms_and_cut_long_input() {
        let e = parse_memory("512M").unwrap_err().to_string();
        assert!(e.contains("\"512M\""), "{e}");
        assert!(e.contains("unknown unit \"M\""), "{e}");
        assert!(e.contains("KiB, MiB, GiB, TiB"), "{e}");
        assert!(e.contains("e.g. 512MiB"), "{e}");
        let long = format!("1{}", "x".repeat(10_000));
        let e = parse_memory(&long).unwrap_err().to_string();
        assert!(e.len() < 400, "{e}");
        let e = parse_memory("1MiB").unwrap_err().to_string();
        assert_eq!(
            e,
            "memory 1MiB: below the smallest limit a sandbox can start with, 16MiB"
        );
    }

    #[test]
    fn memory_format_is_exact_and_reads_back() {
        assert_eq!(format_memory(256 * MIB), "256MiB");
        assert_eq!(format_memory(GIB), "1GiB");
        assert_eq!(format_memory(1536 * MIB), "1536MiB");
        assert_eq!(format_memory(2 * TIB), "2TiB");
        assert_eq!(format_memory(1536 * KIB), "1536KiB");
        assert_eq!(format_memory(512_000_000), "500000KiB");
        assert_eq!(format_memory(1000), "1000B");
        assert_eq!(format_memory(0), "0B");
        for bytes in [
            16 * MIB,
            16 * MIB + 1,
            512_000_000,
            3 * GIB + 5 * KIB,
            u64::MAX,
        ] {
            assert_eq!(parse_memory(&format_memory(bytes)).unwrap(), bytes);
        }
        assert_eq!(
            describe_memory(24684084 * KIB),
            "24684084KiB (about 23.5GiB)"
        );
        assert_eq!(describe_memory(8 * GIB), "8GiB");
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_cpus(0.5).unwrap(), 500);
        assert_eq!(parse_cpus(1.0).unwrap(), 1000);
        assert_eq!(parse_cpus(2.25).unwrap(), 2250);
        assert_eq!(parse_cpus(0.01).unwrap(), 10);
        assert_eq!(parse_cpus(1024.0).unwrap(), MAX_CPU_MILLIS);
        assert_eq!(parse_cpus(0.1 + 0.2).unwrap(), 300);
        for v in [
            0.0,
            -0.0,
            -1.0,
            0.009,
            1024.001,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            assert!(
                matches!(parse_cpus(v), Err(LimitError::BadCpus { .. })),
                "{v}"
            );
        }
        assert_eq!(
            parse_cpus(0.001).unwrap_err().to_string(),
            "invalid cpus 0.001: below 0.01, the smallest CPU limit"
        );
        assert_eq!(format_cpus(500), "0.5");
        assert_eq!(format_cpus(1000), "1");
        assert_eq!(format_cpus(1250), "1.25");
        assert_eq!(format_cpus(10), "0.01");
        assert_eq!(format_cpus(2001), "2.001");
    }

    #[test]
    fn pids() {
        assert_eq!(parse_pids(16).unwrap(), 16);
        assert_eq!(parse_pids(512).unwrap(), 512);
        assert_eq!(parse_pids(4_194_304).unwrap(), MAX_PIDS);
        for v in [15, 0, -1, 4_194_305, i64::MAX, i64::MIN] {
            assert_eq!(parse_pids(v), Err(LimitError::BadPids { value: v }));
        }
        assert_eq!(
            parse_pids(4).unwrap_err().to_string(),
            "invalid pids 4: must be between 16 and 4194304"
        );
    }

    fn host() -> Resolved {
        Resolved {
            memory_bytes: 24684084 * KIB,
            cpu_millis: 2000,
            pids: DEFAULT_MAX_PIDS,
        }
    }

    #[test]
    fn resolve_fills_defaults_and_keeps_asked_values() {
        let p = LimitPolicy::with_flags(Limits::default(), host()).unwrap();
        assert_eq!(p.defaults, BUILTIN_DEFAULTS);
        assert_eq!(p.resolve(Limits::default()).unwrap(), BUILTIN_DEFAULTS);
        let asked = Limits {
            memory_bytes: Some(GIB),
            cpu_millis: None,
            pids: Some(64),
        };
        assert_eq!(
            p.resolve(asked).unwrap(),
            Resolved {
                memory_bytes: GIB,
                cpu_millis: 1000,
                pids: 64
            }
        );
        // Asking exactly the maximum is fine.
        let all = Limits {
            memory_bytes: Some(host().memory_bytes),
            cpu_millis: Some(2000),
            pids: Some(DEFAULT_MAX_PIDS),
        };
        assert_eq!(p.resolve(all).unwrap(), host());
    }

    #[test]
    fn resolve_refuses_over_the_maximum_naming_both() {
        let p = LimitPolicy::with_flags(Limits::default(), host()).unwrap();
        let e = p
            .resolve(Limits {
                memory_bytes: Some(32 * GIB),
                ..Limits::default()
            })
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "memory 32GiB is over this runner's maximum of 24684084KiB (about 23.5GiB)"
        );
        let e = p
            .resolve(Limits {
                cpu_millis: Some(2500),
                ..Limits::default()
            })
            .unwrap_err();
        assert_eq!(e.to_string(), "cpus 2.5 is over this runner's maximum of 2");
        let e = p
            .resolve(Limits {
                pids: Some(40_000),
                ..Limits::default()
            })
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "pids 40000 is over this runner's maximum of 32768"
        );
    }

    #[test]
    fn resolve_checks_floors_of_values_from_the_wire() {
        let p = LimitPolicy::with_flags(Limits::default(), host()).unwrap();
        for asked in [
            Limits {
                memory_bytes: Some(0),
                ..Limits::default()
            },
            Limits {
                cpu_millis: Some(0),
                ..Limits::default()
            },
            Limits {
                cpu_millis: Some(9),
                ..Limits::default()
            },
            Limits {
                pids: Some(1),
                ..Limits::default()
            },
        ] {
            assert!(p.resolve(asked).is_err(), "{asked:?}");
        }
    }

    #[test]
    fn flags_over_the_maximum_are_refused_and_builtin_defaults_lowered() {
        let e = LimitPolicy::with_flags(
            Limits {
                memory_bytes: Some(64 * GIB),
                ..Limits::default()
            },
            host(),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the runner's default memory 64GiB is over its maximum of 24684084KiB (about 23.5GiB)"
        );
        let e = LimitPolicy::with_flags(
            Limits {
                cpu_millis: Some(4000),
                ..Limits::default()
            },
            host(),
        )
        .unwrap_err();
        assert!(matches!(
            e,
            LimitError::DefaultOverMax {
                resource: Resource::Cpus,
                ..
            }
        ));
        let tiny = Resolved {
            memory_bytes: 256 * MIB,
            cpu_millis: 500,
            pids: 100,
        };
        let p = LimitPolicy::with_flags(Limits::default(), tiny).unwrap();
        assert_eq!(p.defaults, tiny);
        // A maximum below the floors is no policy at all.
        assert!(LimitPolicy::new(BUILTIN_DEFAULTS, Resolved { pids: 1, ..host() }).is_err());
    }

    #[test]
    fn meminfo() {
        let text = "MemTotal:       24684084 kB\nMemFree:          950352 kB\n";
        assert_eq!(parse_meminfo_total(text), Some(24684084 * 1024));
        assert_eq!(parse_meminfo_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_meminfo_total("MemTotal: x kB\n"), None);
        assert_eq!(parse_meminfo_total("MemTotal: 12\n"), None);
        assert_eq!(
            parse_meminfo_total("MemTotal: 99999999999999999999 kB"),
            None
        );
    }

    #[test]
    fn this_host_has_a_policy() {
        let max = host_max().unwrap();
        assert!(max.memory_bytes >= MIN_MEMORY_BYTES);
        assert!(max.cpu_millis >= 1000);
        let p = LimitPolicy::for_this_host(Limits::default()).unwrap();
        assert_eq!(p.max, max);
    }

    #[test]
    fn limits_serde_round_trip_and_missing_fields() {
        let l = Limits {
            memory_bytes: Some(GIB),
            cpu_millis: None,
            pids: Some(100),
        };
        let json = serde_json::to_string(&l).unwrap();
        assert_eq!(serde_json::from_str::<Limits>(&json).unwrap(), l);
        assert_eq!(
            serde_json::from_str::<Limits>("{}").unwrap(),
            Limits::default()
        );
    }
}
