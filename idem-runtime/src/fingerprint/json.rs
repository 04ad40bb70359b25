//! The canonical form of a JSON body, for the JSON fingerprint (`fingerprint = "json"`).
//!
//! One strict RFC 8259 parser that writes the canonical form as it reads, in one pass, with no
//! tree: the form follows RFC 8785 (JCS) for structure and strings, and keeps numbers exact.
//!
//! - **Whitespace** between tokens is dropped.
//! - **Objects**: members sorted by the bytes of their canonical name (below), which is a total
//!   order of the names' values; two members with one name (after unescaping: `"a"` and
//!   `"\u0061"` are one name) make the body ambiguous, since parsers disagree on which one counts.
//! - **Strings** by their value: an escape and the character it stands for are one string
//!   (`"\u0041"` is `"A"`, `"\/"` is `"/"`), written back as JCS writes them (§3.2.2.2): `"` and
//!   `\` escaped, the controls below U+0020 as `\b \t \n \f \r` or `\u00xx`, every other
//!   character as its UTF-8 bytes. A lone surrogate escape (`"\ud800"`) is no Unicode string:
//!   the body is not JSON.
//! - **Numbers** by their text, as written. JSON's grammar already writes an integer one way only
//!   (no `+`, no leading zeros), so `100` is always `100`. JCS reads numbers as IEEE-754 doubles,
//!   which would make `9007199254740993` and `9007199254740992` one number: two different
//!   amounts in minor units would meet. And `1.0` and `1`, or `1e2` and `100`, are not always the
//!   same to a handler (an integer field refuses `1.0`, a decimal keeps its scale), so they stay
//!   different requests.
//! - `true`, `false` and `null` as they are.
//!
//! Nesting deeper than [`MAX_DEPTH`] objects and arrays is refused (serde_json, the handler's own
//! parser, refuses it too). Time and memory are linear in the body: every byte is read once, and
//! an object whose members arrive out of order moves its canonical bytes once, so a body is moved
//! at most [`MAX_DEPTH`] times; the output is never longer than the input.

use std::cmp::Ordering;

/// The deepest nesting of objects and arrays canonicalised: serde_json's default recursion
/// limit, so a body the handler's own parser reads is canonicalised.
pub(crate) const MAX_DEPTH: usize = 128;

/// A JSON pointer (RFC 6901), as its unescaped reference tokens: `/trace/id` is
/// `["trace", "id"]`, `/a~1b` is `["a/b"]`.
pub(crate) type Pointer<'p> = &'p [&'p str];

/// Why a body has no canonical form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotCanonical {
    /// Not one JSON text (RFC 8259) in UTF-8.
    Invalid,
    /// An object names one member twice.
    DuplicateMember,
    /// Nested deeper than [`MAX_DEPTH`].
    TooDeep,
}

/// Writes the canonical form of `body` into `out` (cleared first), leaving out the values that
/// `ignore` names: an object member it names is left out whether or not it is there; an array
/// element it names is kept in place as `~` (a byte no canonical value starts with), so that the
/// other elements keep their positions.
pub(crate) fn canonicalise(
    body: &[u8],
    ignore: &[Pointer<'_>],
    out: &mut Vec<u8>,
) -> Result<(), NotCanonical> {
    out.clear();
    if std::str::from_utf8(body).is_err() {
        return Err(NotCanonical::Invalid);
    }
    let mut canon = Canon {
        input: body,
        pos: 0,
        out,
        members: Vec::new(),
        scratch: Vec::new(),
        token: Vec::new(),
    };
    canon.whitespace();
    canon.value(0, ignore)?;
    canon.whitespace();
    if canon.pos == body.len() {
        Ok(())
    } else {
        Err(NotCanonical::Invalid)
    }
}

/// One member of an open object, as positions in the output: `"name"` spans `start..name_end`,
/// the whole `"name":value` `start..end`.
#[derive(Clone, Copy)]
struct Member {
    start: usize,
    name_end: usize,
    end: usize,
}

impl Member {
    /// The canonical name, without its quotes.
    fn name(self, out: &[u8]) -> &[u8] {
        &out[self.start + 1..self.name_end - 1]
    }
}

struct Canon<'a> {
    input: &'a [u8],
    pos: usize,
    out: &'a mut Vec<u8>,
    /// The members of every open object, innermost last.
    members: Vec<Member>,
    /// Where an object's members are copied while they are put in order.
    scratch: Vec<u8>,
    /// A pointer token in canonical form, to compare with a member name.
    token: Vec<u8>,
}

impl Canon<'_> {
    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn whitespace(&mut self) {
        let rest = &self.input[self.pos..];
        self.pos += rest
            .iter()
            .position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
            .unwrap_or(rest.len());
    }

    fn expect(&mut self, byte: u8) -> Result<(), NotCanonical> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(NotCanonical::Invalid)
        }
    }

    /// One value; `ignore` holds what is left of the pointers that reach into it.
    fn value(&mut self, depth: usize, ignore: &[Pointer<'_>]) -> Result<(), NotCanonical> {
        match self.peek() {
            Some(b'{') => self.object(depth + 1, ignore),
            Some(b'[') => self.array(depth + 1, ignore),
            Some(b'"') => self.string(),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            _ => Err(NotCanonical::Invalid),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), NotCanonical> {
        if self.input[self.pos..].starts_with(word) {
            self.pos += word.len();
            self.out.extend_from_slice(word);
            Ok(())
        } else {
            Err(NotCanonical::Invalid)
        }
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`, copied as written.
    fn number(&mut self) -> Result<(), NotCanonical> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(NotCanonical::Invalid),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            self.some_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            self.some_digits()?;
        }
        self.out.extend_from_slice(&self.input[start..self.pos]);
        Ok(())
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
    }

    fn some_digits(&mut self) -> Result<(), NotCanonical> {
        let start = self.pos;
        self.digits();
        if self.pos == start {
            Err(NotCanonical::Invalid)
        } else {
            Ok(())
        }
    }

    /// A string, written in canonical form. The input is valid UTF-8 (checked once, up front),
    /// so runs of plain characters are copied as they are.
    fn string(&mut self) -> Result<(), NotCanonical> {
        self.expect(b'"')?;
        self.out.push(b'"');
        loop {
            let rest = &self.input[self.pos..];
            let run = rest
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
                .unwrap_or(rest.len());
            self.out.extend_from_slice(&rest[..run]);
            self.pos += run;
            match self.peek() {
                Some(b'"') => {
                    self.pos += 1;
                    self.out.push(b'"');
                    return Ok(());
                }
                Some(b'\\') => {
                    self.pos += 1;
                    let c = self.escape()?;
                    write_char(self.out, c);
                }
                // The end of the body, or a raw control character.
                _ => return Err(NotCanonical::Invalid),
            }
        }
    }

    /// The character an escape (after its `\`) stands for.
    fn escape(&mut self) -> Result<char, NotCanonical> {
        let c = match self.peek() {
            Some(b'"') => '"',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                self.pos += 1;
                let unit = self.hex4()?;
                let code = match unit {
                    0xd800..=0xdbff => {
                        // A high surrogate: only with a low one is it a character.
                        if !self.input[self.pos..].starts_with(b"\\u") {
                            return Err(NotCanonical::Invalid);
                        }
                        self.pos += 2;
                        let low = self.hex4()?;
                        if !(0xdc00..=0xdfff).contains(&low) {
                            return Err(NotCanonical::Invalid);
                        }
                        0x10000 + ((unit - 0xd800) << 10) + (low - 0xdc00)
                    }
                    0xdc00..=0xdfff => return Err(NotCanonical::Invalid),
                    unit => unit,
                };
                return char::from_u32(code).ok_or(NotCanonical::Invalid);
            }
            _ => return Err(NotCanonical::Invalid),
        };
        self.pos += 1;
        Ok(c)
    }

    fn hex4(&mut self) -> Result<u32, NotCanonical> {
        let digits = self
            .input
            .get(self.pos..self.pos + 4)
            .ok_or(NotCanonical::Invalid)?;
        let mut value = 0;
        for &d in digits {
            let v = char::from(d).to_digit(16).ok_or(NotCanonical::Invalid)?;
            value = value * 16 + v;
        }
        self.pos += 4;
        Ok(value)
    }

    fn array(&mut self, depth: usize, ignore: &[Pointer<'_>]) -> Result<(), NotCanonical> {
        if depth > MAX_DEPTH {
            return Err(NotCanonical::TooDeep);
        }
        self.expect(b'[')?;
        self.out.push(b'[');
        self.whitespace();
        if self.peek() == Some(b']') {
            self.pos += 1;
            self.out.push(b']');
            return Ok(());
        }
        let mut index = 0;
        loop {
            if index > 0 {
                self.out.push(b',');
            }
            let start = self.out.len();
            let (skip, inner) = if ignore.is_empty() {
                (false, Vec::new())
            } else {
                descend(ignore, |token| is_index(token, index))
            };
            self.value(depth, &inner)?;
            if skip {
                self.out.truncate(start);
                self.out.push(b'~');
            }
            self.whitespace();
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    self.whitespace();
                    index += 1;
                }
                Some(b']') => {
                    self.pos += 1;
                    self.out.push(b']');
                    return Ok(());
                }
                _ => return Err(NotCanonical::Invalid),
            }
        }
    }

    fn object(&mut self, depth: usize, ignore: &[Pointer<'_>]) -> Result<(), NotCanonical> {
        if depth > MAX_DEPTH {
            return Err(NotCanonical::TooDeep);
        }
        self.expect(b'{')?;
        self.out.push(b'{');
        let open = self.out.len();
        let base = self.members.len();
        self.whitespace();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            self.out.push(b'}');
            return Ok(());
        }
        loop {
            if self.members.len() > base {
                self.out.push(b',');
            }
            let start = self.out.len();
            self.string()?;
            let name_end = self.out.len();
            self.whitespace();
            self.expect(b':')?;
            self.out.push(b':');
            self.whitespace();
            let (skip, inner) = if ignore.is_empty() {
                (false, Vec::new())
            } else {
                let (out, token) = (&*self.out, &mut self.token);
                let name = &out[start + 1..name_end - 1];
                descend(ignore, |pointer_token| {
                    token.clear();
                    for c in pointer_token.chars() {
                        write_char(token, c);
                    }
                    token.as_slice() == name
                })
            };
            self.value(depth, &inner)?;
            if skip {
                // Left out, with the comma written before it.
                let comma = usize::from(self.members.len() > base);
                self.out.truncate(start - comma);
            } else {
                self.members.push(Member {
                    start,
                    name_end,
                    end: self.out.len(),
                });
            }
            self.whitespace();
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    self.whitespace();
                }
                Some(b'}') => {
                    self.pos += 1;
                    break;
                }
                _ => return Err(NotCanonical::Invalid),
            }
        }
        let result = self.close_object(open, base);
        self.members.truncate(base);
        result
    }

    /// Puts the members of the object that opened at `open` (its members from `base` on) in
    /// canonical order, and closes it.
    fn close_object(&mut self, open: usize, base: usize) -> Result<(), NotCanonical> {
        let out = &*self.out;
        let members = &mut self.members[base..];
        let in_order = members.windows(2).all(|w| w[0].name(out) < w[1].name(out));
        if !in_order {
            members.sort_unstable_by(|a, b| a.name(out).cmp(b.name(out)));
            if members
                .windows(2)
                .any(|w| w[0].name(out).cmp(w[1].name(out)) == Ordering::Equal)
            {
                return Err(NotCanonical::DuplicateMember);
            }
            self.scratch.clear();
            self.scratch.extend_from_slice(&self.out[open..]);
            self.out.truncate(open);
            for (n, member) in members.iter().enumerate() {
                if n > 0 {
                    self.out.push(b',');
                }
                self.out
                    .extend_from_slice(&self.scratch[member.start - open..member.end - open]);
            }
        }
        self.out.push(b'}');
        Ok(())
    }
}

/// Which of `ignore` pass through the child whose token `matches`: whether one ends there (the
/// child is left out), and the rest of those that go on below it.
fn descend<'p>(
    ignore: &[Pointer<'p>],
    mut matches: impl FnMut(&str) -> bool,
) -> (bool, Vec<Pointer<'p>>) {
    let mut skip = false;
    let mut inner = Vec::new();
    for pointer in ignore {
        if let Some((first, rest)) = pointer.split_first() {
            if matches(first) {
                if rest.is_empty() {
                    skip = true;
                } else {
                    inner.push(rest);
                }
            }
        }
    }
    (skip, inner)
}

/// Whether a reference token names array element `index` (RFC 6901: decimal, no leading zero).
fn is_index(token: &str, index: usize) -> bool {
    let canonical = token == "0" || (!token.starts_with('0') && !token.is_empty());
    canonical && token.bytes().all(|b| b.is_ascii_digit()) && token.parse() == Ok(index)
}

/// Writes one character of a string's value as JCS does.
fn write_char(out: &mut Vec<u8>, c: char) {
    match c {
        '"' => out.extend_from_slice(b"\\\""),
        '\\' => out.extend_from_slice(b"\\\\"),
        '\u{8}' => out.extend_from_slice(b"\\b"),
        '\t' => out.extend_from_slice(b"\\t"),
        '\n' => out.extend_from_slice(b"\\n"),
        '\u{c}' => out.extend_from_slice(b"\\f"),
        '\r' => out.extend_from_slice(b"\\r"),
        c if u32::from(c) < 0x20 => {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let v = u32::from(c) as usize;
            out.extend_from_slice(b"\\u00");
            out.push(HEX[v >> 4]);
            out.push(HEX[v & 0xf]);
        }
        c => {
            let mut buf = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(body: &str) -> Result<String, NotCanonical> {
        canon_ignoring(body, &[])
    }

    fn canon_ignoring(body: &str, ignore: &[Pointer<'_>]) -> Result<String, NotCanonical> {
        let mut out = Vec::new();
        canonicalise(body.as_bytes(), ignore, &mut out)?;
        Ok(String::from_utf8(out).expect("the canonical form is UTF-8"))
    }

    #[test]
    fn the_canonical_form() {
        for (body, canonical) in [
            (
                " { \"b\" : 1 ,\n\t\"a\" : [ true , false , null ] } ",
                r#"{"a":[true,false,null],"b":1}"#,
            ),
            (
                r#"{"z":{"y":1,"x":2},"a":{}}"#,
                r#"{"a":{},"z":{"x":2,"y":1}}"#,
            ),
            ("[3,1,2]", "[3,1,2]"),
            ("[ ]", "[]"),
            ("{ }", "{}"),
            ("\"x\"", "\"x\""),
            ("  7  ", "7"),
            // Strings by their value, written back as JCS writes them.
            (r#""\u0041\/\u00e9\uD83D\uDE00""#, "\"A/é😀\""),
            (
                r#""\"\\\b\f\n\r\t\u0001\u001F""#,
                r#""\"\\\b\f\n\r\t\u0001\u001f""#,
            ),
            ("\"\u{7f}\u{2028}\"", "\"\u{7f}\u{2028}\""),
            // Numbers as written.
            (
                "[0,-0,1.0,1e2,1E+2,-1.5e-3,9007199254740993]",
                "[0,-0,1.0,1e2,1E+2,-1.5e-3,9007199254740993]",
            ),
            // Names sorted by their canonical bytes, escapes unescaped first.
            (
                r#"{"b":1,"\u0061":2,"B":3,"":4,"é":5}"#,
                r#"{"":4,"B":3,"a":2,"b":1,"é":5}"#,
            ),
        ] {
            assert_eq!(canon(body).as_deref(), Ok(canonical), "{body}");
        }
    }

    #[test]
    fn a_member_named_twice_is_ambiguous() {
        for body in [
            r#"{"a":1,"a":2}"#,
            r#"{"a":1,"a":1}"#,
            r#"{"a":1,"\u0061":1}"#,
            r#"{"b":0,"a":1,"c":0,"a":2}"#,
            r#"[{"x":{"k":1,"k":2}}]"#,
        ] {
            assert_eq!(canon(body), Err(NotCanonical::DuplicateMember), "{body}");
        }
        // One name in two objects is no duplicate.
        assert!(canon(r#"{"a":{"a":1},"b":{"a":2}}"#).is_ok());
    }

    #[test]
    fn what_is_not_json_is_refused() {
        for body in [
            &b""[..],
            b" ",
            b"{",
            b"}",
            b"[1,]",
            b"[,1]",
            b"{\"a\":1,}",
            b"{\"a\" 1}",
            b"{a:1}",
            b"{1:1}",
            b"01",
            b"+1",
            b"1.",
            b".5",
            b"-",
            b"1e",
            b"1e+",
            b"tru",
            b"nul",
            b"True",
            b"\"abc",
            b"\"\\x\"",
            b"\"\\u12\"",
            b"\"\\u12G4\"",
            b"\"\\ud800\"",
            b"\"\\ud800\\u0041\"",
            b"\"\\udc00\"",
            b"\"a\nb\"",
            b"\"\xff\"",
            b"\xef\xbb\xbf{}",
            b"{} {}",
            b"1 2",
            b"[1] x",
            b"NaN",
            b"'a'",
        ] {
            let mut out = Vec::new();
            assert_eq!(
                canonicalise(body, &[], &mut out),
                Err(NotCanonical::Invalid),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn nesting_is_bounded() {
        let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(canon(&nested(MAX_DEPTH)).is_ok());
        assert_eq!(canon(&nested(MAX_DEPTH + 1)), Err(NotCanonical::TooDeep));
        let objects = |depth: usize| format!("{}{}", "{\"a\":".repeat(depth), "}".repeat(depth));
        assert_eq!(canon(&objects(MAX_DEPTH + 1)), Err(NotCanonical::TooDeep));
        // Refused before it is read: a megabyte of `[` costs no stack.
        assert_eq!(canon(&"[".repeat(1 << 20)), Err(NotCanonical::TooDeep));
    }

    #[test]
    fn ignored_members_are_left_out_whether_there_or_not() {
        let ts: &[Pointer<'_>] = &[&["client_ts"], &["trace", "id"]];
        let canonical = r#"{"amount":100,"trace":{"span":"s"}}"#;
        for body in [
            r#"{"amount":100,"client_ts":1,"trace":{"id":"x","span":"s"}}"#,
            r#"{"client_ts":2,"amount":100,"trace":{"span":"s","id":"y"}}"#,
            r#"{"trace":{"span":"s"},"amount":100}"#,
            r#"{"amount":100,"trace":{"span":"s","id":{"deep":[1,2]}},"client_ts":null}"#,
        ] {
            assert_eq!(canon_ignoring(body, ts).as_deref(), Ok(canonical), "{body}");
        }
        assert_eq!(
            canon_ignoring(r#"{"client_ts":1}"#, ts).as_deref(),
            Ok("{}")
        );
        // A pointer reaches only what it names.
        assert_eq!(
            canon_ignoring(r#"{"x":{"client_ts":1},"trace":"id"}"#, ts).as_deref(),
            Ok(r#"{"trace":"id","x":{"client_ts":1}}"#)
        );
        // An ignored value must still be JSON.
        assert_eq!(
            canon_ignoring(r#"{"client_ts":01}"#, ts),
            Err(NotCanonical::Invalid)
        );
    }

    #[test]
    fn pointers_name_array_elements_and_escaped_names() {
        let first: &[Pointer<'_>] = &[&["items", "0", "ts"], &["tags", "1"]];
        assert_eq!(
            canon_ignoring(
                r#"{"items":[{"ts":1,"n":1},{"ts":2,"n":2}],"tags":["a","b","c"]}"#,
                first
            )
            .as_deref(),
            Ok(r#"{"items":[{"n":1},{"n":2,"ts":2}],"tags":["a",~,"c"]}"#)
        );
        // `01` is a member name, never an index.
        let leading_zero: &[Pointer<'_>] = &[&["01"]];
        assert_eq!(
            canon_ignoring("[5,6]", leading_zero).as_deref(),
            Ok("[5,6]")
        );
        assert_eq!(
            canon_ignoring(r#"{"01":1,"1":2}"#, leading_zero).as_deref(),
            Ok(r#"{"1":2}"#)
        );
        // `-` names no array element (RFC 6901's element after the end), but a member `-`.
        let dash: &[Pointer<'_>] = &[&["-"]];
        assert_eq!(canon_ignoring(r#"["a"]"#, dash).as_deref(), Ok(r#"["a"]"#));
        assert_eq!(
            canon_ignoring(r#"{"-":1,"b":2}"#, dash).as_deref(),
            Ok(r#"{"b":2}"#)
        );
        // Names compared by their value: `/` and `"` in a name, however escaped.
        let odd: &[Pointer<'_>] = &[&["a/b"], &["q\""]];
        assert_eq!(
            canon_ignoring(r#"{"a\/b":1,"q\u0022":2,"c":3}"#, odd).as_deref(),
            Ok(r#"{"c":3}"#)
        );
    }

    #[test]
    fn index_tokens() {
        assert!(is_index("0", 0));
        assert!(is_index("12", 12));
        assert!(!is_index("012", 12));
        assert!(!is_index("+1", 1));
        assert!(!is_index("", 0));
        assert!(!is_index("1a", 1));
        assert!(!is_index("-", 0));
    }
}

/// Property tests: documents that mean the same meet, whatever their member order, whitespace
/// and escapes; documents that differ in any value never do; no input panics.
#[cfg(test)]
mod properties {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    /// A JSON document as data: members by name (so no duplicates, and order does not count),
    /// numbers by their text (the canonical rule).
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Doc {
        Null,
        Bool(bool),
        Number(String),
        Text(String),
        Array(Vec<Doc>),
        Object(BTreeMap<String, Doc>),
    }

    /// Characters where escaping and order bite: escapes, controls, non-ASCII, astral.
    fn text() -> impl Strategy<Value = String> {
        let chars = prop::sample::select(vec![
            'a', 'b', 'A', '/', '"', '\\', '\n', '\t', '\u{1}', '\u{1f}', '\u{7f}', 'é',
            '\u{2028}', '😀', '~', ' ',
        ]);
        prop::collection::vec(chars, 0..5).prop_map(|c| c.into_iter().collect())
    }

    fn number() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "0",
                "-0",
                "1",
                "10",
                "1.0",
                "1.00",
                "1e2",
                "1E2",
                "100",
                "-1",
                "0.1",
                "1e-2",
                "9007199254740992",
                "9007199254740993",
            ])
            .prop_map(str::to_owned),
            any::<i64>().prop_map(|n| n.to_string()),
        ]
    }

    fn doc() -> impl Strategy<Value = Doc> {
        let leaf = prop_oneof![
            Just(Doc::Null),
            any::<bool>().prop_map(Doc::Bool),
            number().prop_map(Doc::Number),
            text().prop_map(Doc::Text),
        ];
        leaf.prop_recursive(4, 48, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Doc::Array),
                prop::collection::btree_map(text(), inner, 0..5).prop_map(Doc::Object),
            ]
        })
    }

    /// A small pseudo-random source, so that one seed is one way of writing a document.
    struct Style(u64);

    impl Style {
        fn next(&mut self, n: u64) -> u64 {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }

        fn whitespace(&mut self, out: &mut String) {
            out.push_str(["", "", " ", "\n", "\t", "\r\n  "][self.next(6) as usize]);
        }

        fn unicode_escape(&mut self, out: &mut String, c: char) {
            let mut units = [0; 2];
            for unit in c.encode_utf16(&mut units) {
                if self.next(2) == 0 {
                    out.push_str(&format!("\\u{unit:04x}"));
                } else {
                    out.push_str(&format!("\\u{unit:04X}"));
                }
            }
        }

        fn string(&mut self, out: &mut String, s: &str) {
            out.push('"');
            for c in s.chars() {
                let short = match c {
                    '"' => Some("\\\""),
                    '\\' => Some("\\\\"),
                    '/' => Some("\\/"),
                    '\u{8}' => Some("\\b"),
                    '\u{c}' => Some("\\f"),
                    '\n' => Some("\\n"),
                    '\r' => Some("\\r"),
                    '\t' => Some("\\t"),
                    _ => None,
                };
                let must_escape = c == '"' || c == '\\' || u32::from(c) < 0x20;
                match (self.next(3), short) {
                    (0, Some(short)) => out.push_str(short),
                    (1, _) => self.unicode_escape(out, c),
                    _ if must_escape => match short {
                        Some(short) => out.push_str(short),
                        None => self.unicode_escape(out, c),
                    },
                    _ => out.push(c),
                }
            }
            out.push('"');
        }

        fn write(&mut self, out: &mut String, doc: &Doc) {
            self.whitespace(out);
            match doc {
                Doc::Null => out.push_str("null"),
                Doc::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
                Doc::Number(n) => out.push_str(n),
                Doc::Text(s) => self.string(out, s),
                Doc::Array(items) => {
                    out.push('[');
                    for (n, item) in items.iter().enumerate() {
                        if n > 0 {
                            self.whitespace(out);
                            out.push(',');
                        }
                        self.write(out, item);
                    }
                    self.whitespace(out);
                    out.push(']');
                }
                Doc::Object(members) => {
                    let mut members: Vec<_> = members.iter().collect();
                    for i in (1..members.len()).rev() {
                        let j = self.next(i as u64 + 1) as usize;
                        members.swap(i, j);
                    }
                    out.push('{');
                    for (n, (name, value)) in members.into_iter().enumerate() {
                        if n > 0 {
                            self.whitespace(out);
                            out.push(',');
                        }
                        self.whitespace(out);
                        self.string(out, name);
                        self.whitespace(out);
                        out.push(':');
                        self.write(out, value);
                    }
                    self.whitespace(out);
                    out.push('}');
                }
            }
            self.whitespace(out);
        }
    }

    fn written(doc: &Doc, seed: u64) -> String {
        let mut out = String::new();
        Style(seed | 1).write(&mut out, doc);
        out
    }

    fn canonical(body: &str, ignore: &[Pointer<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        canonicalise(body.as_bytes(), ignore, &mut out).unwrap_or_else(|e| panic!("{e:?}: {body}"));
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn equivalent_documents_meet(doc in doc(), a in any::<u64>(), b in any::<u64>()) {
            let (first, second) = (written(&doc, a), written(&doc, b));
            let canonical_first = canonical(&first, &[]);
            prop_assert_eq!(&canonical_first, &canonical(&second, &[]), "{} / {}", first, second);
            // The canonical form is its own canonical form, and means what the body meant.
            let again = String::from_utf8(canonical_first.clone()).expect("utf-8");
            prop_assert_eq!(&canonical(&again, &[]), &canonical_first);
            let parsed: serde_json::Value = serde_json::from_str(&first).expect("serde_json reads it");
            prop_assert_eq!(serde_json::from_slice::<serde_json::Value>(&canonical_first).ok(), Some(parsed));
            prop_assert!(canonical_first.len() <= first.len());
        }

        #[test]
        fn different_documents_never_meet(
            one in doc(),
            other in doc(),
            a in any::<u64>(),
            b in any::<u64>(),
        ) {
            let same = canonical(&written(&one, a), &[]) == canonical(&written(&other, b), &[]);
            prop_assert_eq!(same, one == other);
        }

        #[test]
        fn a_value_changed_anywhere_never_meets(doc in doc(), seed in any::<u64>(), pick in any::<u64>()) {
            let mut changed = doc.clone();
            let mut leaves = 0;
            count_leaves(&changed, &mut leaves);
            let mut target = pick % leaves.max(1);
            change_leaf(&mut changed, &mut target);
            prop_assume!(changed != doc);
            prop_assert_ne!(canonical(&written(&doc, seed), &[]), canonical(&written(&changed, seed ^ pick), &[]));
        }

        #[test]
        fn ignored_members_never_count(
            doc in doc(),
            one in doc(),
            other in doc(),
            a in any::<u64>(),
            b in any::<u64>(),
        ) {
            let with = |ts: &Doc| {
                let mut members = match &doc {
                    Doc::Object(members) => members.clone(),
                    doc => BTreeMap::from([("body".to_owned(), doc.clone())]),
                };
                members.insert("client_ts".to_owned(), ts.clone());
                Doc::Object(members)
            };
            let ignore: &[Pointer<'_>] = &[&["client_ts"]];
            prop_assert_eq!(
                canonical(&written(&with(&one), a), ignore),
                canonical(&written(&with(&other), b), ignore)
            );
        }

        #[test]
        fn any_bytes_are_answered_without_panic(body in prop::collection::vec(any::<u8>(), 0..256)) {
            let mut out = Vec::new();
            if canonicalise(&body, &[&["a"]], &mut out).is_ok() {
                prop_assert!(out.len() <= body.len());
            }
        }

        #[test]
        fn near_json_is_answered_without_panic(doc in doc(), seed in any::<u64>(), cut in any::<usize>(), byte in any::<u8>()) {
            let mut body = written(&doc, seed).into_bytes();
            let at = cut % (body.len() + 1);
            body.insert(at, byte);
            let mut out = Vec::new();
            let _ = canonicalise(&body, &[], &mut out);
            body.truncate(at);
            let _ = canonicalise(&body, &[], &mut out);
        }
    }

    fn count_leaves(doc: &Doc, n: &mut u64) {
        match doc {
            Doc::Array(items) => items.iter().for_each(|d| count_leaves(d, n)),
            Doc::Object(members) => members.values().for_each(|d| count_leaves(d, n)),
            _ => *n += 1,
        }
    }

    /// Changes the `target`-th leaf (counting down) to another value of its kind.
    fn change_leaf(doc: &mut Doc, target: &mut u64) {
        match doc {
            Doc::Array(items) => items.iter_mut().for_each(|d| change_leaf(d, target)),
            Doc::Object(members) => members.values_mut().for_each(|d| change_leaf(d, target)),
            leaf => {
                if *target == 0 {
                    *leaf = match leaf {
                        Doc::Null => Doc::Bool(false),
                        Doc::Bool(b) => Doc::Bool(!*b),
                        Doc::Number(n) => Doc::Number(match n.strip_prefix('-') {
                            Some(positive) => positive.to_owned(),
                            None => format!("-{n}"),
                        }),
                        Doc::Text(s) => Doc::Text(format!("{s}a")),
                        _ => unreachable!("a leaf"),
                    };
                }
                *target = target.wrapping_sub(1);
            }
        }
    }
}
