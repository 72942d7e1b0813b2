//! Human tables and `-o json` for every listing, and the one rule for
//! printing text that came from the cluster ([`terminal_safe`]).

use std::borrow::Cow;
use std::fmt::Write as _;

use clap::ValueEnum;
use serde::Serialize;

/// Output format of listings.
#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
pub enum Format {
    #[default]
    Table,
    Json,
}

/// Makes one line of text that came from the cluster safe to print on a
/// terminal.
///
/// Why: what the CLI prints is written by others. Log lines come from
/// sandboxes, which are hostile (DESIGN.md); names, labels, messages and
/// error texts come from whoever could reach the coordinator. Printed raw,
/// an ESC or CSI sequence could set the window title, move the cursor,
/// clear or recolour the screen (or, in some terminals, answer back into the
/// operator's shell); a CR or backspaces overwrite what was printed before;
/// bidi overrides reorder what the operator reads. So every such character
/// is shown as a visible escape instead, and the text stays readable:
///
/// - newline and CR as `\n` and `\r`: a log line or a cell stays one line;
/// - other C0 controls and DEL as `\xNN` (ESC is `\x1b`, BEL `\x07`);
/// - C1 controls (U+0080–U+009F, e.g. the one-character CSI U+009B) as
///   `\u{9b}`;
/// - bidi embeddings, overrides, isolates and marks (U+202A–U+202E,
///   U+2066–U+2069, U+200E, U+200F, U+061C) and the line and paragraph
///   separators U+2028, U+2029 as `\u{202e}` and so on.
///
/// Tabs stay: a tab only moves the cursor forward to the next tab stop (the
/// sequence that would set tab stops starts with ESC, which is escaped), and
/// log lines use them (Java stack traces). Table cells escape them too,
/// since columns are aligned by counting characters. Every other character,
/// non-ASCII text included ("héllo 日本"), is left as it is, and so is the
/// backslash: `\x1b` in the output may have been those four characters,
/// never an ESC. Escaping is idempotent, so text escaped twice (a message
/// printed again inside an error) reads the same.
///
/// `-o json` output does not go through this: it is JSON, and [`json`]
/// escapes the same characters the JSON way (`\u001b`, `\u202e`).
pub fn terminal_safe(s: &str) -> Cow<'_, str> {
    escape(s, Tabs::Keep)
}

/// [`terminal_safe`] for text of several lines (error chains, a rollout's
/// failure message with the last log lines): each line is escaped and the
/// newlines between them are kept.
pub fn terminal_safe_lines(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c != '\n' && needs_escape(c, Tabs::Keep)) {
        return Cow::Borrowed(s);
    }
    let lines: Vec<Cow<'_, str>> = s.split('\n').map(terminal_safe).collect();
    Cow::Owned(lines.join("\n"))
}

/// At most the first `n` characters of `s` (never splits a character, so a
/// short id of a multi-byte string cannot panic the way `&s[..n]` would).
pub fn short(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((end, _)) => &s[..end],
        None => s,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tabs {
    Keep,
    Escape,
}

/// The one classification behind [`terminal_safe`] and [`json`].
fn needs_escape(c: char, tabs: Tabs) -> bool {
    match c {
        '\t' => tabs == Tabs::Escape,
        // Bidi marks, embeddings, overrides and isolates; line and
        // paragraph separators.
        '\u{061c}'
        | '\u{200e}'
        | '\u{200f}'
        | '\u{202a}'..='\u{202e}'
        | '\u{2066}'..='\u{2069}' => true,
        '\u{2028}' | '\u{2029}' => true,
        // C0, DEL and C1.
        c => c.is_control(),
    }
}

fn escape(s: &str, tabs: Tabs) -> Cow<'_, str> {
    if !s.chars().any(|c| needs_escape(c, tabs)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if !needs_escape(c, tabs) {
            out.push(c);
            continue;
        }
        // Writing to a String cannot fail.
        let _ = match c {
            '\n' => out.write_str("\\n"),
            '\r' => out.write_str("\\r"),
            '\t' => out.write_str("\\t"),
            c if c.is_ascii() => write!(out, "\\x{:02x}", c as u32),
            c => write!(out, "\\u{{{:x}}}", c as u32),
        };
    }
    Cow::Owned(out)
}

/// Prints rows under a header with aligned columns. Every cell is escaped
/// ([`terminal_safe`], tabs included), so callers pass server data as is.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    print!("{}", render_table(header, rows));
}

fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let cell = |c: &str| escape(c, Tabs::Escape).into_owned();
    let header: Vec<String> = header.iter().map(|h| cell(h)).collect();
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| cell(c)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    for cells in std::iter::once(&header).chain(rows.iter()) {
        let mut line = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                line.push_str(c);
            } else {
                let w = widths.get(i).copied().unwrap_or(0);
                let _ = write!(line, "{c:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Prints rows without a header (what `-f` adds under a table), every
/// cell escaped like [`table`]'s.
pub fn table_rows(rows: &[Vec<String>]) {
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .map(|c| escape(c, Tabs::Escape).into_owned())
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
}

/// One JSON value on one line (JSON Lines), escaped like [`json`].
pub fn json_line(value: &serde_json::Value) -> anyhow::Result<String> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, SafeCompactJson);
    value.serialize(&mut ser)?;
    Ok(String::from_utf8(out)?)
}

/// serde_json's compact formatter with [`SafeJson`]'s string escaping.
struct SafeCompactJson;

impl serde_json::ser::Formatter for SafeCompactJson {
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        SafeJson(serde_json::ser::PrettyFormatter::new()).write_string_fragment(w, fragment)
    }
}

/// Prints a value as JSON, pretty, its object keys in alphabetical order
/// (every `-o json` has always printed them so, whatever the Rust field
/// order). Output stays JSON (the same value parses back), but the
/// characters [`terminal_safe`] escapes and serde_json leaves raw (DEL, C1
/// controls, bidi controls, U+2028/U+2029) are written as `\uXXXX`, so
/// `-o json` on a terminal is as safe as a table.
pub fn json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", json_string(&serde_json::to_value(value)?)?);
    Ok(())
}

fn json_string(value: &serde_json::Value) -> anyhow::Result<String> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(
        &mut out,
        SafeJson(serde_json::ser::PrettyFormatter::new()),
    );
    value.serialize(&mut ser)?;
    Ok(String::from_utf8(out)?)
}

/// serde_json's pretty formatter, with [`needs_escape`] characters in
/// strings written as `\uXXXX` (serde_json already escapes C0 itself).
struct SafeJson<'a>(serde_json::ser::PrettyFormatter<'a>);

impl serde_json::ser::Formatter for SafeJson<'_> {
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if needs_escape(c, Tabs::Keep) {
                w.write_all(&fragment.as_bytes()[start..i])?;
                // Every escaped character is in the BMP: one \uXXXX each.
                write!(w, "\\u{:04x}", c as u32)?;
                start = i + c.len_utf8();
            }
        }
        w.write_all(&fragment.as_bytes()[start..])
    }

    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_array(w)
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_array(w)
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.0.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_array_value(w)
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_object(w)
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_object(w)
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.0.begin_object_key(w, first)
    }
    fn end_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_object_key(w)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_object_value(w)
    }
}

/// A unix time as RFC 3339 (UTC), or `-` when unknown. A time the format
/// cannot show (after the year 9999) is printed as the number, not a panic.
pub fn time(t: Option<i64>) -> String {
    let Some(t) = t.filter(|t| *t > 0) else {
        return "-".to_string();
    };
    let Some(at) =
        std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(t.unsigned_abs()))
    else {
        return t.to_string();
    };
    let mut out = String::new();
    match write!(out, "{}", humantime::format_rfc3339_seconds(at)) {
        Ok(()) => out,
        Err(_) => t.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_are_shown_not_run() {
        // Window title (OSC ... BEL), colour (CSI), clear screen.
        assert_eq!(terminal_safe("\x1b]0;pwned\x07ok"), "\\x1b]0;pwned\\x07ok");
        assert_eq!(terminal_safe("\x1b[31mred\x1b[2J"), "\\x1b[31mred\\x1b[2J");
        // The one-character C1 CSI, and the rest of C1.
        assert_eq!(terminal_safe("\u{9b}31mred"), "\\u{9b}31mred");
        assert_eq!(terminal_safe("\u{80}\u{9f}"), "\\u{80}\\u{9f}");
        // Backspace, NUL, DEL.
        assert_eq!(
            terminal_safe("ab\x08\x08xy\0\x7f"),
            "ab\\x08\\x08xy\\x00\\x7f"
        );
        let out = terminal_safe("\x1b]0;t\x07\u{9b}1m\x08\x7f");
        assert!(!out.chars().any(|c| c.is_control()), "{out}");
    }

    #[test]
    fn a_line_cannot_overwrite_itself_or_others() {
        // The CR trick: "innocent" would be overwritten by "EVIL".
        assert_eq!(terminal_safe("innocent\rEVIL"), "innocent\\rEVIL");
        // A log line stays one line.
        assert_eq!(terminal_safe("one\nerror: forged"), "one\\nerror: forged");
        assert_eq!(terminal_safe("crlf\r\n"), "crlf\\r\\n");
    }

    #[test]
    fn bidi_controls_are_visible() {
        assert_eq!(terminal_safe("file\u{202e}fdp.exe"), "file\\u{202e}fdp.exe");
        for c in [
            '\u{202a}', '\u{202d}', '\u{2066}', '\u{2069}', '\u{200f}', '\u{2028}',
        ] {
            let s = c.to_string();
            assert_eq!(terminal_safe(&s), format!("\\u{{{:x}}}", c as u32));
        }
    }

    #[test]
    fn ordinary_text_is_untouched_and_borrowed() {
        for s in [
            "héllo 日本",
            "plain ascii",
            "emoji 🦀 ok",
            "tab\tkept",
            "back\\slash",
            "",
        ] {
            assert!(matches!(terminal_safe(s), Cow::Borrowed(_)), "{s}");
            assert_eq!(terminal_safe(s), s);
        }
        // Non-ASCII next to escapes survives too.
        assert_eq!(terminal_safe("日本\x1b[0m語"), "日本\\x1b[0m語");
    }

    #[test]
    fn escaping_is_idempotent() {
        let hostile = "a\x1b[2J\r\u{9b}\u{202e}\n\tz";
        let once = terminal_safe(hostile).into_owned();
        assert_eq!(terminal_safe(&once), once);
        let once = terminal_safe_lines(hostile).into_owned();
        assert_eq!(terminal_safe_lines(&once), once);
    }

    #[test]
    fn several_lines_keep_their_newlines_only() {
        assert_eq!(
            terminal_safe_lines("v2 failed\nbooting\x1b]0;x\x07\nlast\rline"),
            "v2 failed\nbooting\\x1b]0;x\\x07\nlast\\rline"
        );
        assert!(matches!(terminal_safe_lines("a\nb"), Cow::Borrowed(_)));
    }

    #[test]
    fn short_counts_characters_not_bytes() {
        assert_eq!(short("0123456789abcdef", 8), "01234567");
        assert_eq!(short("abc", 8), "abc");
        assert_eq!(short("", 8), "");
        // `&s[..8]` would panic here: byte 8 is inside a character.
        let id = "ééééé-runner";
        assert_eq!(short(id, 8), "ééééé-ru");
        assert_eq!(short("日本語のランナー識別子", 8), "日本語のランナー");
        assert_eq!(short("🦀🦀🦀", 2), "🦀🦀");
    }

    #[test]
    fn a_hostile_cell_stays_in_its_cell() {
        let rows = vec![
            vec!["r1".to_string(), "ok".to_string(), "x".to_string()],
            vec![
                "r2\x1b]0;pwned\x07".to_string(),
                "hidden\rshown\nnext\tcol".to_string(),
                "\u{202e}abc".to_string(),
            ],
        ];
        let out = render_table(&["ID", "NAME", "LABELS"], &rows);
        assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "{out:?}");
        assert!(!out.contains('\u{202e}'), "{out:?}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        // Columns line up on the escaped text.
        let col = |line: &str, word: &str| line.find(word).map(|b| line[..b].chars().count());
        assert_eq!(col(lines[0], "NAME"), Some(20), "{out}");
        assert_eq!(col(lines[1], "ok"), Some(20), "{out}");
        assert_eq!(col(lines[2], "hidden"), Some(20), "{out}");
        assert_eq!(col(lines[0], "LABELS"), Some(46), "{out}");
        assert_eq!(col(lines[1], "x"), Some(46), "{out}");
        assert_eq!(
            lines[2],
            "r2\\x1b]0;pwned\\x07  hidden\\rshown\\nnext\\tcol  \\u{202e}abc"
        );
    }

    #[test]
    fn json_stays_json_and_hides_no_controls() {
        let v = serde_json::json!({
            "line": "\x1b]0;pwned\x07\r\u{9b}31m\u{202e}\u{7f}\u{2028} héllo 日本",
            "k\u{202e}": ["a\tb"],
        });
        let s = json_string(&v).unwrap();
        assert!(!s.chars().any(|c| c.is_control() && c != '\n'), "{s:?}");
        for c in ['\u{202e}', '\u{2028}'] {
            assert!(!s.contains(c), "{s:?}");
        }
        assert!(
            s.contains("\\u001b]0;pwned\\u0007\\r\\u009b31m\\u202e\\u007f\\u2028 héllo 日本"),
            "{s}"
        );
        let back: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(back, v);
        // Still pretty.
        assert!(s.starts_with("{\n  \""), "{s}");
    }

    #[test]
    fn times_out_of_range_do_not_panic() {
        assert_eq!(time(None), "-");
        assert_eq!(time(Some(0)), "-");
        assert_eq!(time(Some(-5)), "-");
        assert_eq!(time(Some(1_700_000_000)), "2023-11-14T22:13:20Z");
        assert_eq!(time(Some(253_402_300_800)), "253402300800");
        assert_eq!(time(Some(i64::MAX)), i64::MAX.to_string());
    }
}
