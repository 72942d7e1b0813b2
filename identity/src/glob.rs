//! Glob patterns for CI bindings: `*`, `?` and literal characters.
//!
//! Operators pin CI callers with patterns such as `repo:acme/web:*` or
//! `refs/tags/v*`, and the coordinator matches every presented OIDC token
//! against them. The patterns come from an admin but the text comes from a
//! token, so matching must stay cheap whatever either side holds: a matcher
//! that backtracks can be driven into exponential time by a pattern like
//! `a*a*a*a*b`. This module is the one place that defines the syntax, so the
//! CLI's validation and the coordinator's matching cannot disagree.
//!
//! # Syntax
//!
//! * `*` matches any run of characters, empty included, **including `/`**;
//! * `?` matches exactly one character (one Unicode scalar value);
//! * every other character matches itself; there are no escapes, classes or
//!   braces, so `.`, `[`, `\` and `{` are ordinary characters;
//! * the whole text must match (not a substring), case-sensitively.
//!
//! A pattern must be non-empty, at most [`MAX_PATTERN_CHARS`] characters long
//! and free of control characters and invisible formatting characters (such
//! as bidirectional overrides), which would make a binding read differently
//! from what it matches.
//!
//! # Complexity
//!
//! The pattern is split on `*` into segments of fixed length. The first
//! segment must match at the start of the text and the last at its end; the
//! segments between them are searched for left to right, each at its leftmost
//! occurrence after the previous one. Taking the leftmost occurrence is always
//! safe (it leaves the most text for the segments that follow), so the
//! matcher never revisits a decision and never backtracks.
//!
//! Each character of the text is examined by at most one search. A segment
//! without `?` is searched with the standard library's substring search
//! (two-way, linear); a segment with `?` runs a bit-parallel shift-and
//! automaton costing `⌈len/64⌉` machine words per text character, at most 8
//! because a pattern holds at most 512 characters. Matching therefore takes
//! `O(pattern + text)` time with a small bounded constant, and compiling a
//! pattern takes time linear in it. No allocation happens while matching.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest accepted pattern, in characters.
pub const MAX_PATTERN_CHARS: usize = 512;

/// Machine words needed for the longest possible segment.
const MAX_WORDS: usize = MAX_PATTERN_CHARS.div_ceil(64);

/// Why a pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    /// The pattern is the empty string.
    #[error("glob pattern is empty")]
    Empty,
    /// The pattern is longer than [`MAX_PATTERN_CHARS`].
    #[error("glob pattern is {len} characters long; at most {max} are allowed")]
    TooLong {
        /// Length of the pattern, in characters.
        len: usize,
        /// The limit, [`MAX_PATTERN_CHARS`].
        max: usize,
    },
    /// The pattern holds a control or invisible formatting character.
    #[error(
        "glob pattern {pattern:?} contains the control or invisible character {ch:?} \
         at position {position}"
    )]
    ControlChar {
        /// The refused pattern.
        pattern: String,
        /// The first offending character.
        ch: char,
        /// Its position, counted in characters from 0.
        position: usize,
    },
}

/// One position of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Atom {
    /// This exact character.
    Literal(char),
    /// `?`: any one character.
    AnyOne,
}

impl Atom {
    fn matches(self, c: char) -> bool {
        match self {
            Atom::Literal(l) => l == c,
            Atom::AnyOne => true,
        }
    }
}

/// How a segment between two `*` is searched for.
#[derive(Debug, Clone)]
enum Search {
    /// No `?`: plain substring search.
    Literal(String),
    /// Has `?`: bit-parallel shift-and.
    Wild(ShiftAnd),
}

impl Search {
    fn compile(atoms: &[Atom]) -> Search {
        if atoms.iter().all(|a| matches!(a, Atom::Literal(_))) {
            let s = atoms
                .iter()
                .filter_map(|a| match a {
                    Atom::Literal(c) => Some(*c),
                    Atom::AnyOne => None,
                })
                .collect();
            Search::Literal(s)
        } else {
            Search::Wild(ShiftAnd::new(atoms))
        }
    }

    /// Byte offset just past the leftmost occurrence in `text`.
    fn find_end(&self, text: &str) -> Option<usize> {
        match self {
            Search::Literal(s) => text.find(s.as_str()).map(|start| start + s.len()),
            Search::Wild(automaton) => automaton.find_end(text),
        }
    }
}

/// A shift-and automaton for one segment of 1..=[`MAX_PATTERN_CHARS`]
/// positions: bit `i` of the state says "the last `i + 1` characters match
/// the first `i + 1` positions of the segment".
#[derive(Debug, Clone)]
struct ShiftAnd {
    /// Positions in the segment.
    len: usize,
    /// Words per mask: `⌈len / 64⌉`.
    words: usize,
    /// Distinct literal characters of the segment, sorted.
    chars: Vec<char>,
    /// `chars.len() + 1` masks of `words` words: the mask of `chars[i]`,
    /// then the mask of any other character (the `?` positions only).
    masks: Vec<u64>,
}

impl ShiftAnd {
    fn new(atoms: &[Atom]) -> ShiftAnd {
        let len = atoms.len();
        let words = len.div_ceil(64);
        let mut chars: Vec<char> = atoms
            .iter()
            .filter_map(|a| match a {
                Atom::Literal(c) => Some(*c),
                Atom::AnyOne => None,
            })
            .collect();
        chars.sort_unstable();
        chars.dedup();
        let mut masks = vec![0u64; (chars.len() + 1) * words];
        for (i, atom) in atoms.iter().enumerate() {
            let (word, bit) = (i / 64, 1u64 << (i % 64));
            match atom {
                Atom::AnyOne => {
                    // A `?` position accepts every character, listed or not.
                    for block in masks.chunks_mut(words) {
                        block[word] |= bit;
                    }
                }
                Atom::Literal(c) => {
                    if let Ok(k) = chars.binary_search(c) {
                        masks[k * words + word] |= bit;
                    }
                }
            }
        }
        ShiftAnd {
            len,
            words,
            chars,
            masks,
        }
    }

    fn mask(&self, c: char) -> &[u64] {
        let k = self.chars.binary_search(&c).unwrap_or(self.chars.len());
        &self.masks[k * self.words..(k + 1) * self.words]
    }

    fn find_end(&self, text: &str) -> Option<usize> {
        let mut state = [0u64; MAX_WORDS];
        let last_word = (self.len - 1) / 64;
        let last_bit = 1u64 << ((self.len - 1) % 64);
        for (i, c) in text.char_indices() {
            let mask = self.mask(c);
            // Shift the whole multi-word state left by one, feeding a 1 in
            // at bit 0 (a match may start at this character).
            let mut carry = 1u64;
            for (word, m) in state.iter_mut().zip(mask) {
                let next_carry = *word >> 63;
                *word = ((*word << 1) | carry) & m;
                carry = next_carry;
            }
            if state[last_word] & last_bit != 0 {
                return Some(i + c.len_utf8());
            }
        }
        None
    }
}

/// A compiled glob pattern; see the module documentation for the syntax.
///
/// Equality, ordering, display and serde all use the pattern string.
#[derive(Debug, Clone)]
pub struct Glob {
    pattern: String,
    /// Atoms before the first `*` (all of them when there is no `*`).
    head: Vec<Atom>,
    /// Non-empty segments strictly between the first and last `*`.
    middle: Vec<Search>,
    /// Atoms after the last `*`; `None` when the pattern has no `*`.
    tail: Option<Vec<Atom>>,
}

/// Characters refused in patterns: C0/C1 controls, DEL, and invisible
/// formatting characters (zero-width and bidirectional controls, BOM).
fn is_refused_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200B}'..='\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{2069}'
                | '\u{FEFF}'
        )
}

fn atoms(segment: &str) -> Vec<Atom> {
    segment
        .chars()
        .map(|c| match c {
            '?' => Atom::AnyOne,
            c => Atom::Literal(c),
        })
        .collect()
}

/// Byte offset just past `atoms` matched at the start of `text`.
fn match_prefix(atoms: &[Atom], text: &str) -> Option<usize> {
    let mut chars = text.char_indices();
    for atom in atoms {
        let (_, c) = chars.next()?;
        if !atom.matches(c) {
            return None;
        }
    }
    Some(chars.offset())
}

/// Byte offset where `atoms` matched at the end of `text` begin.
fn match_suffix(atoms: &[Atom], text: &str) -> Option<usize> {
    let mut start = text.len();
    let mut chars = text.char_indices().rev();
    for atom in atoms.iter().rev() {
        let (i, c) = chars.next()?;
        if !atom.matches(c) {
            return None;
        }
        start = i;
    }
    Some(start)
}

impl Glob {
    /// Checks and compiles `pattern`.
    pub fn parse(pattern: &str) -> Result<Glob, GlobError> {
        if pattern.is_empty() {
            return Err(GlobError::Empty);
        }
        let len = pattern.chars().count();
        if len > MAX_PATTERN_CHARS {
            return Err(GlobError::TooLong {
                len,
                max: MAX_PATTERN_CHARS,
            });
        }
        if let Some((position, ch)) = pattern
            .chars()
            .enumerate()
            .find(|(_, c)| is_refused_char(*c))
        {
            return Err(GlobError::ControlChar {
                pattern: pattern.to_string(),
                ch,
                position,
            });
        }
        let parts: Vec<&str> = pattern.split('*').collect();
        let (head, middle, tail) = match parts.as_slice() {
            [only] => (atoms(only), Vec::new(), None),
            [first, inner @ .., last] => (
                atoms(first),
                inner
                    .iter()
                    .filter(|s| !s.is_empty())
                    .map(|s| Search::compile(&atoms(s)))
                    .collect(),
                Some(atoms(last)),
            ),
            // `split` always yields at least one part.
            [] => (Vec::new(), Vec::new(), None),
        };
        Ok(Glob {
            pattern: pattern.to_string(),
            head,
            middle,
            tail,
        })
    }

    /// Whether the whole of `text` matches the pattern.
    pub fn matches(&self, text: &str) -> bool {
        let Some(after_head) = match_prefix(&self.head, text) else {
            return false;
        };
        let rest = &text[after_head..];
        let Some(tail) = &self.tail else {
            return rest.is_empty();
        };
        let Some(tail_start) = match_suffix(tail, rest) else {
            return false;
        };
        let mut window = &rest[..tail_start];
        for segment in &self.middle {
            match segment.find_end(window) {
                Some(end) => window = &window[end..],
                None => return false,
            }
        }
        true
    }

    /// The pattern, exactly as given.
    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Whether the pattern holds no literal character (only `*` and `?`),
    /// so that it accepts any text of a suitable length: such a pattern
    /// pins nothing.
    pub fn is_wildcard_only(&self) -> bool {
        self.pattern.chars().all(|c| c == '*' || c == '?')
    }

    /// The literal text every match starts with: the pattern up to its
    /// first `*` or `?` (the whole pattern when it has neither).
    pub fn literal_prefix(&self) -> &str {
        let end = self.pattern.find(['*', '?']).unwrap_or(self.pattern.len());
        &self.pattern[..end]
    }
}

impl PartialEq for Glob {
    fn eq(&self, other: &Glob) -> bool {
        self.pattern == other.pattern
    }
}

impl Eq for Glob {}

impl std::hash::Hash for Glob {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.pattern.hash(state);
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pattern)
    }
}

impl FromStr for Glob {
    type Err = GlobError;

    fn from_str(s: &str) -> Result<Glob, GlobError> {
        Glob::parse(s)
    }
}

impl Serialize for Glob {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.pattern)
    }
}

impl<'de> Deserialize<'de> for Glob {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Glob, D::Error> {
        let s = String::deserialize(d)?;
        Glob::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(p: &str) -> Glob {
        Glob::parse(p).expect("valid pattern")
    }

    /// Reference matcher: dynamic programming over (pattern, text) prefixes.
    fn reference(pattern: &str, text: &str) -> bool {
        let p: Vec<char> = pattern.chars().collect();
        let t: Vec<char> = text.chars().collect();
        // row[j]: pattern[..i] matches text[..j]
        let mut row = vec![false; t.len() + 1];
        row[0] = true;
        for &pc in &p {
            let mut next = vec![false; t.len() + 1];
            if pc == '*' {
                let mut any = false;
                for j in 0..=t.len() {
                    any |= row[j];
                    next[j] = any;
                }
            } else {
                for j in 1..=t.len() {
                    next[j] = row[j - 1] && (pc == '?' || pc == t[j - 1]);
                }
            }
            row = next;
        }
        row[t.len()]
    }

    #[test]
    fn empty_pattern_is_refused() {
        assert_eq!(Glob::parse(""), Err(GlobError::Empty));
    }

    #[test]
    fn overlong_pattern_is_refused() {
        let ok = "a".repeat(MAX_PATTERN_CHARS);
        assert!(Glob::parse(&ok).is_ok());
        let long = "a".repeat(MAX_PATTERN_CHARS + 1);
        assert_eq!(
            Glob::parse(&long),
            Err(GlobError::TooLong {
                len: 513,
                max: MAX_PATTERN_CHARS
            })
        );
        // The limit counts characters, not bytes.
        assert!(Glob::parse(&"é".repeat(MAX_PATTERN_CHARS)).is_ok());
    }

    #[test]
    fn control_characters_are_refused() {
        for (pattern, ch, position) in [
            ("repo:a\nb", '\n', 6),
            ("\trepo", '\t', 0),
            ("a\u{7f}", '\u{7f}', 1),
            ("a\u{85}", '\u{85}', 1),
            ("repo:\u{202E}evil", '\u{202E}', 5),
            ("a\u{200B}b", '\u{200B}', 1),
        ] {
            assert_eq!(
                Glob::parse(pattern),
                Err(GlobError::ControlChar {
                    pattern: pattern.to_string(),
                    ch,
                    position
                }),
                "{pattern:?}"
            );
        }
        let msg = Glob::parse("a\nb").expect_err("refused").to_string();
        assert!(msg.contains("control"), "{msg}");
    }

    #[test]
    fn star_matches_any_run_including_slashes() {
        let g = glob("repo:acme/web:*");
        assert!(g.matches("repo:acme/web:ref:refs/heads/main"));
        assert!(g.matches("repo:acme/web:"));
        assert!(g.matches("repo:acme/web:environment:prod/eu"));
        assert!(!g.matches("repo:acme/web"));
        assert!(glob("refs/*").matches("refs/heads/feature/x/y"));
        assert!(glob("*").matches(""));
        assert!(glob("*").matches("a/b/c"));
        assert!(glob("**").matches(""));
    }

    #[test]
    fn question_mark_matches_exactly_one_character() {
        let g = glob("v?.0");
        assert!(g.matches("v1.0"));
        assert!(!g.matches("v.0"));
        assert!(!g.matches("v10.0"));
        assert!(g.matches("v/.0"));
        // One Unicode scalar, whatever its UTF-8 length.
        assert!(g.matches("vé.0"));
        assert!(g.matches("v🦀.0"));
        assert!(!glob("?").matches(""));
        assert!(!glob("??").matches("🦀"));
    }

    #[test]
    fn other_characters_are_literal() {
        assert!(glob("a.b").matches("a.b"));
        assert!(!glob("a.b").matches("axb"));
        assert!(glob("[ab]+{c}\\").matches("[ab]+{c}\\"));
        assert!(!glob("[ab]").matches("a"));
    }

    #[test]
    fn whole_string_must_match() {
        let g = glob("refs/heads/main");
        assert!(g.matches("refs/heads/main"));
        assert!(!g.matches("refs/heads/main2"));
        assert!(!g.matches("xrefs/heads/main"));
        assert!(!g.matches("refs/heads/mai"));
        assert!(!glob("a*b").matches("a-b-c"));
        assert!(!glob("a*b").matches("ca-b"));
    }

    #[test]
    fn matching_is_case_sensitive() {
        assert!(!glob("repo:Acme/*").matches("repo:acme/web"));
        assert!(!glob("PUSH").matches("push"));
        assert!(glob("push").matches("push"));
    }

    #[test]
    fn stars_and_segments_combine() {
        let g = glob("refs/*/v?.*-rc*");
        assert!(g.matches("refs/tags/v1.2-rc1"));
        assert!(g.matches("refs/x/y/v9.-rc"));
        assert!(!g.matches("refs/tags/v12.2-rc1"));
        // Head and tail may not overlap.
        assert!(!glob("ab*ba").matches("aba"));
        assert!(glob("ab*ba").matches("abba"));
        // Middle segments are searched in order.
        assert!(glob("*b*a*").matches("xbxax"));
        assert!(!glob("*b*a*").matches("xaxbx"));
    }

    #[test]
    fn long_wild_segments_span_several_words() {
        let mut seg = "x".repeat(70);
        seg.replace_range(3..4, "?");
        seg.replace_range(65..66, "?");
        let g = glob(&format!("*{seg}*"));
        let mut text = "y".repeat(10);
        text.push_str(&"x".repeat(70));
        text.push('y');
        assert!(g.matches(&text));
        assert!(!g.matches(&"x".repeat(69)));
    }

    #[test]
    fn agrees_with_a_reference_matcher() {
        // Deterministic pseudo-random patterns and texts over a tiny
        // alphabet, so that matches and near misses are both common.
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move |n: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        };
        let pattern_alphabet = ['a', 'b', 'é', '*', '?', '/'];
        let text_alphabet = ['a', 'b', 'é', '/'];
        for _ in 0..20_000 {
            let plen = 1 + next(8) as usize;
            let pattern: String = (0..plen)
                .map(|_| pattern_alphabet[next(6) as usize])
                .collect();
            let tlen = next(10) as usize;
            let text: String = (0..tlen).map(|_| text_alphabet[next(4) as usize]).collect();
            assert_eq!(
                glob(&pattern).matches(&text),
                reference(&pattern, &text),
                "pattern {pattern:?} text {text:?}"
            );
        }
    }

    #[test]
    fn hostile_patterns_do_not_blow_up() {
        // A backtracking matcher needs exponential time on these.
        let text = "a".repeat(50_000);
        let failing = format!("{}b", "a*".repeat(30));
        assert!(!glob(&failing).matches(&text));
        let failing_middle = format!("*{}b*", "a*".repeat(30));
        assert!(!glob(&failing_middle).matches(&text));
        let matching = format!("{}a", "*a".repeat(30));
        assert!(glob(&matching).matches(&text));
        let wild = format!("*{}*", "a?".repeat(200) + "b");
        assert!(!glob(&wild).matches(&text));
        let long_literal = format!("*{}b*", "a".repeat(500));
        assert!(!glob(&long_literal).matches(&text));
    }

    #[test]
    fn helpers_describe_the_pattern() {
        assert!(glob("*").is_wildcard_only());
        assert!(glob("*?*").is_wildcard_only());
        assert!(!glob("repo:*").is_wildcard_only());
        assert_eq!(glob("repo:acme/*:x").literal_prefix(), "repo:acme/");
        assert_eq!(glob("v?.*").literal_prefix(), "v");
        assert_eq!(glob("exact").literal_prefix(), "exact");
        assert_eq!(glob("*x").literal_prefix(), "");
    }

    #[test]
    fn serde_and_display_use_the_pattern() {
        let g = glob("repo:acme/*");
        assert_eq!(g.to_string(), "repo:acme/*");
        let json = serde_json::to_string(&g).expect("json");
        assert_eq!(json, "\"repo:acme/*\"");
        let back: Glob = serde_json::from_str(&json).expect("back");
        assert_eq!(back, g);
        assert!(serde_json::from_str::<Glob>("\"\"").is_err());
        assert_eq!("a*".parse::<Glob>().expect("parse"), glob("a*"));
    }
}
