//! A sandbox's output, captured and bounded.
//!
//! A sandbox's stdout and stderr are pipes to the runner; nothing the
//! sandbox can name on disk is ever opened for its logs. What it prints is
//! cut into lines of at most [`MAX_LINE`] bytes (longer lines are cut and
//! marked), written to `output.log` in the sandbox's runner-private `logs/`
//! dir, which rotates to `output.log.1` at half the per-sandbox budget, so a
//! sandbox never holds more than [`LOG_BUDGET`] bytes of disk. Reading is
//! paced by a byte-rate bucket: a sandbox that floods its output is slowed
//! (its writes block on the full pipe), not the runner and the other
//! sandboxes on it.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Longest line kept; the rest of a longer line is dropped and the line is
/// marked with [`CUT_MARK`].
pub const MAX_LINE: usize = 16 * 1024;
/// What ends a line that was cut.
pub const CUT_MARK: &str = " [line cut at 16 KiB]";
/// Disk a sandbox's logs may hold: the current file and one rotated file
/// of half this size each.
pub const LOG_BUDGET: u64 = 10 * 1024 * 1024;
/// Lines kept in memory for `app status` (the last lines before a crash).
pub const TAIL_LINES: usize = 20;
/// Most bytes of those lines sent with a report.
pub const TAIL_BYTES: usize = 8 * 1024;
/// Output a sandbox may produce per second before the runner slows its
/// reading (and so the sandbox's writes), and the burst allowed above it.
pub const BYTES_PER_SEC: f64 = 16.0 * 1024.0 * 1024.0;
pub const BURST_BYTES: f64 = 16.0 * 1024.0 * 1024.0;
/// What each line costs against that rate at least: a flood of empty lines
/// is paced by its lines, not only its bytes.
pub const LINE_COST: usize = 256;
/// The file names in a sandbox's logs dir.
pub const CURRENT: &str = "output.log";
pub const ROTATED: &str = "output.log.1";

/// Cuts a byte stream into lines of at most [`MAX_LINE`] bytes.
#[derive(Debug, Default)]
pub struct LineCutter {
    partial: Vec<u8>,
    /// Inside a line that was already cut: drop bytes up to its newline.
    dropping: bool,
}

impl LineCutter {
    /// Feeds `bytes`; calls `line` for each complete line (without its
    /// newline; invalid UTF-8 replaced).
    pub fn feed(&mut self, mut bytes: &[u8], mut line: impl FnMut(String)) {
        while !bytes.is_empty() {
            let newline = bytes.iter().position(|&b| b == b'\n');
            let (chunk, rest, ends) = match newline {
                Some(i) => (&bytes[..i], &bytes[i + 1..], true),
                None => (bytes, &[][..], false),
            };
            bytes = rest;
            if self.dropping {
                if ends {
                    self.dropping = false;
                }
                continue;
            }
            let room = MAX_LINE - self.partial.len();
            if chunk.len() > room {
                self.partial.extend_from_slice(&chunk[..room]);
                let mut text = lossy(&std::mem::take(&mut self.partial));
                text.push_str(CUT_MARK);
                line(text);
                self.dropping = !ends;
                continue;
            }
            self.partial.extend_from_slice(chunk);
            if ends {
                line(lossy(&std::mem::take(&mut self.partial)));
            }
        }
    }

    /// The unterminated rest, when the stream ends.
    pub fn finish(&mut self) -> Option<String> {
        self.dropping = false;
        (!self.partial.is_empty()).then(|| lossy(&std::mem::take(&mut self.partial)))
    }
}

fn lossy(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    // A cut may split a character: the replacement char marks it.
    text.into_owned()
}

/// A token bucket of bytes, `now` in seconds passed in.
#[derive(Debug, Clone)]
pub struct ByteRate {
    rate: f64,
    burst: f64,
    level: f64,
    at: f64,
}

impl ByteRate {
    pub fn new(rate: f64, burst: f64, now: f64) -> Self {
        ByteRate {
            rate,
            burst,
            level: burst,
            at: now,
        }
    }

    /// Takes `bytes`; returns how long to wait (seconds) before reading on.
    pub fn take(&mut self, bytes: usize, now: f64) -> f64 {
        let elapsed = (now - self.at).max(0.0);
        self.at = now;
        self.level = (self.level + elapsed * self.rate).min(self.burst) - bytes as f64;
        if self.level >= 0.0 {
            0.0
        } else {
            -self.level / self.rate
        }
    }
}

/// The runner-private log files of one sandbox, rotated to stay within
/// [`LOG_BUDGET`].
pub struct SandboxLog {
    dir: PathBuf,
    budget: u64,
    file: Option<std::io::BufWriter<File>>,
    size: u64,
}

/// Opens `name` in `dir` for appending, never through a symlink.
fn open_append(dir: &Path, name: &str) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir.join(name))
}

impl SandboxLog {
    /// The logs of the sandbox whose runner-private log dir is `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self::with_budget(dir, LOG_BUDGET)
    }

    pub fn with_budget(dir: PathBuf, budget: u64) -> Self {
        SandboxLog {
            dir,
            budget,
            file: None,
            size: 0,
        }
    }

    /// Appends one line, rotating first when the current file is full.
    pub fn append(&mut self, line: &str) -> std::io::Result<()> {
        let len = line.len() as u64 + 1;
        if self.file.is_none() {
            let f = open_append(&self.dir, CURRENT)?;
            self.size = f.metadata()?.len();
            self.file = Some(std::io::BufWriter::with_capacity(64 * 1024, f));
        }
        if self.size + len > self.budget / 2 && self.size > 0 {
            if let Some(mut f) = self.file.take() {
                f.flush()?;
            }
            std::fs::rename(self.dir.join(CURRENT), self.dir.join(ROTATED))?;
            self.file = Some(std::io::BufWriter::with_capacity(
                64 * 1024,
                open_append(&self.dir, CURRENT)?,
            ));
            self.size = 0;
        }
        if let Some(f) = self.file.as_mut() {
            f.write_all(line.as_bytes())?;
            f.write_all(b"\n")?;
            self.size += len;
        }
        Ok(())
    }

    /// Writes what is buffered (after each read from the pipes, so `logs`
    /// sees lines at once without one system call per line).
    pub fn flush(&mut self) -> std::io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

/// The last `n` lines of a sandbox's logs, at most `max_bytes` of them.
pub fn tail(dir: &Path, n: usize, max_bytes: usize) -> std::io::Result<Vec<String>> {
    let mut lines: VecDeque<String> = VecDeque::new();
    let mut bytes = 0usize;
    // Newest first: the current file, then the rotated one.
    for name in [CURRENT, ROTATED] {
        if lines.len() >= n || bytes >= max_bytes {
            break;
        }
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dir.join(name))
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let text = read_end(file, (max_bytes - bytes) as u64 + MAX_LINE as u64 + 64)?;
        let mut found: Vec<&str> = text.lines().collect();
        // The first line may be partial when we did not read from the start.
        if text.len() as u64 > (max_bytes - bytes) as u64 && !found.is_empty() {
            found.remove(0);
        }
        for line in found.into_iter().rev() {
            if lines.len() >= n || bytes + line.len() > max_bytes {
                break;
            }
            bytes += line.len();
            lines.push_front(line.to_string());
        }
    }
    Ok(lines.into())
}

/// The last `limit` bytes of `file`, as text.
fn read_end(mut file: File, limit: u64) -> std::io::Result<String> {
    let size = file.metadata()?.len();
    let start = size.saturating_sub(limit);
    file.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    file.take(limit).read_to_end(&mut buf)?;
    if start > 0 {
        // Start after the first newline: never show half a line.
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            buf.drain(..=i);
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The last lines a sandbox printed, bounded in count and bytes, kept for
/// reports.
#[derive(Debug, Default)]
pub struct Tail {
    lines: VecDeque<String>,
}

impl Tail {
    pub fn push(&mut self, line: &str) {
        self.lines.push_back(line.to_string());
        while self.lines.len() > TAIL_LINES {
            self.lines.pop_front();
        }
    }

    /// The kept lines joined, at most [`TAIL_BYTES`] (the newest kept).
    pub fn text(&self) -> String {
        let joined = self.lines.iter().cloned().collect::<Vec<_>>().join("\n");
        if joined.len() <= TAIL_BYTES {
            return joined;
        }
        let mut cut = joined.len() - TAIL_BYTES;
        while !joined.is_char_boundary(cut) {
            cut += 1;
        }
        joined[cut..].to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(chunks: &[&[u8]]) -> Vec<String> {
        let mut c = LineCutter::default();
        let mut out = Vec::new();
        for chunk in chunks {
            c.feed(chunk, |l| out.push(l));
        }
        out.extend(c.finish());
        out
    }

    #[test]
    fn lines_across_chunks_are_joined() {
        assert_eq!(
            cut(&[b"he", b"llo\nwor", b"ld\n", b"tail"]),
            ["hello", "world", "tail"]
        );
    }

    #[test]
    fn a_long_line_is_cut_and_marked_and_the_next_line_survives() {
        let long = vec![b'x'; MAX_LINE * 3];
        let out = cut(&[&long[..MAX_LINE + 10], &long[MAX_LINE + 10..], b"\nnext\n"]);
        assert_eq!(
            out.len(),
            2,
            "{:?}",
            out.iter().map(|l| l.len()).collect::<Vec<_>>()
        );
        assert!(out[0].ends_with(CUT_MARK));
        assert_eq!(out[0].len(), MAX_LINE + CUT_MARK.len());
        assert_eq!(out[1], "next");
    }

    #[test]
    fn a_line_of_exactly_the_limit_is_whole() {
        let line = vec![b'y'; MAX_LINE];
        let out = cut(&[&line, b"\n"]);
        assert_eq!(out, [String::from_utf8(line).expect("ascii")]);
    }

    #[test]
    fn invalid_utf8_does_not_stop_the_stream() {
        assert_eq!(cut(&[b"a\xff\xfeb\nc\n"]), ["a\u{fffd}\u{fffd}b", "c"]);
    }

    #[test]
    fn the_byte_rate_waits_only_past_the_burst() {
        let mut r = ByteRate::new(100.0, 200.0, 0.0);
        assert_eq!(r.take(150, 0.0), 0.0);
        assert_eq!(r.take(50, 0.0), 0.0);
        // 100 bytes over: one second at 100 B/s.
        assert!((r.take(100, 0.0) - 1.0).abs() < 1e-9);
        // After the wait the debt is paid.
        assert_eq!(r.take(0, 1.0), 0.0);
        // A clock that steps back refills nothing and takes no credit.
        assert!(r.take(10, 0.5) > 0.0);
    }

    #[test]
    fn the_log_rotates_within_its_budget_and_tail_reads_across_files() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut log = SandboxLog::with_budget(d.path().to_path_buf(), 1000);
        for i in 0..500 {
            log.append(&format!("line {i:04}")).expect("append");
        }
        log.flush().expect("flush");
        let size = |n: &str| {
            std::fs::metadata(d.path().join(n))
                .map(|m| m.len())
                .unwrap_or(0)
        };
        assert!(
            size(CURRENT) <= 500 && size(ROTATED) <= 500,
            "{} {}",
            size(CURRENT),
            size(ROTATED)
        );
        let last = tail(d.path(), 60, 1 << 20).expect("tail");
        assert_eq!(last.len(), 60);
        assert_eq!(last.last().map(String::as_str), Some("line 0499"));
        // Consecutive across the rotation boundary.
        for w in last.windows(2) {
            let a: u32 = w[0][5..].parse().expect("num");
            let b: u32 = w[1][5..].parse().expect("num");
            assert_eq!(a + 1, b);
        }
        // A byte cap keeps the newest lines.
        let few = tail(d.path(), 1000, 40).expect("tail");
        assert_eq!(few.len(), 4);
        assert_eq!(few.last().map(String::as_str), Some("line 0499"));
    }

    #[test]
    fn a_symlink_planted_as_a_log_file_is_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"secret\n").expect("victim");
        std::os::unix::fs::symlink(&victim, d.path().join(CURRENT)).expect("link");
        let mut log = SandboxLog::new(d.path().to_path_buf());
        assert!(log.append("evil").is_err());
        assert!(tail(d.path(), 10, 1000).is_err());
        assert_eq!(std::fs::read(&victim).expect("victim"), b"secret\n");
    }

    #[test]
    fn the_tail_is_bounded_in_lines_and_bytes() {
        let mut t = Tail::default();
        for i in 0..100 {
            t.push(&format!("{i}"));
        }
        assert_eq!(t.text().lines().count(), TAIL_LINES);
        assert!(t.text().ends_with("99"));
        let mut t = Tail::default();
        for _ in 0..5 {
            t.push(&"é".repeat(MAX_LINE / 2));
        }
        assert!(t.text().len() <= TAIL_BYTES);
    }
}
