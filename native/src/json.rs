//! A strict JSON parser for the shapes producers write. It answers only when it is sure: text
//! that is not JSON, and JSON that the slower paths must decide (a non-integer number, an
//! integer past i64, a NUL, a lone surrogate, a key written twice), are `None`.

use std::borrow::Cow;

use crate::scan::plain_run;

#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Str(Cow<'a, str>),
    /// Only in a payload built from a document: a UUID, written as its hyphenated text.
    Uuid(u128),
    Array(Vec<Value<'a>>),
    Object(Vec<(Cow<'a, str>, Value<'a>)>),
}

impl<'a> Value<'a> {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(text) => Some(text),
            _ => None,
        }
    }
}

/// The deepest nesting parsed whatever a caller asks: the parser recurses, and its stack must
/// hold on any thread. Twice the contract's bound (producer/decoding.py's MAX_NESTING).
pub const DEEPEST: usize = 256;

/// The value of `text`, or None (see the module's docs): also for arrays and objects nested
/// deeper than `max_depth` (or DEEPEST).
pub fn parse(text: &[u8], max_depth: usize) -> Option<Value<'_>> {
    let text = std::str::from_utf8(text).ok()?;
    let mut parser = Parser {
        text,
        bytes: text.as_bytes(),
        at: 0,
        depth: max_depth.min(DEEPEST),
    };
    let value = parser.value()?;
    parser.skip_whitespace();
    (parser.at == parser.bytes.len()).then_some(value)
}

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
    /// How many more levels of arrays and objects may open.
    depth: usize,
}

/// Whether a key repeats: pairwise for the few keys an object usually has, sorted past that
/// (a flat object of many keys must not cost their square).
fn repeats(entries: &[(Cow<'_, str>, Value<'_>)]) -> bool {
    if entries.len() <= 16 {
        return entries
            .iter()
            .enumerate()
            .any(|(at, (key, _))| entries[..at].iter().any(|(seen, _)| seen == key));
    }
    let mut keys: Vec<&str> = entries.iter().map(|(key, _)| key.as_ref()).collect();
    keys.sort_unstable();
    keys.windows(2).any(|pair| pair[0] == pair[1])
}

impl<'a> Parser<'a> {
    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    fn literal(&mut self, word: &[u8], value: Value<'a>) -> Option<Value<'a>> {
        if self.bytes[self.at..].starts_with(word) {
            self.at += word.len();
            Some(value)
        } else {
            None
        }
    }

    fn value(&mut self) -> Option<Value<'a>> {
        self.skip_whitespace();
        match *self.bytes.get(self.at)? {
            b'{' | b'[' => {
                self.depth = self.depth.checked_sub(1)?;
                let nested = if self.bytes[self.at] == b'{' {
                    self.object()
                } else {
                    self.array()
                };
                self.depth += 1;
                nested
            }
            b'"' => self.string().map(Value::Str),
            b't' => self.literal(b"true", Value::Bool(true)),
            b'f' => self.literal(b"false", Value::Bool(false)),
            b'n' => self.literal(b"null", Value::Null),
            b'-' | b'0'..=b'9' => self.integer(),
            _ => None,
        }
    }

    fn object(&mut self) -> Option<Value<'a>> {
        self.at += 1;
        let mut entries: Vec<(Cow<'a, str>, Value<'a>)> = Vec::new();
        self.skip_whitespace();
        if self.bytes.get(self.at) == Some(&b'}') {
            self.at += 1;
            return Some(Value::Object(entries));
        }
        loop {
            self.skip_whitespace();
            if self.bytes.get(self.at) != Some(&b'"') {
                return None;
            }
            let key = self.string()?;
            self.skip_whitespace();
            if self.bytes.get(self.at) != Some(&b':') {
                return None;
            }
            self.at += 1;
            let value = self.value()?;
            entries.push((key, value));
            self.skip_whitespace();
            match self.bytes.get(self.at)? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    // Which copy of a repeated key wins is the slower paths' rule.
                    return (!repeats(&entries)).then_some(Value::Object(entries));
                }
                _ => return None,
            }
        }
    }

    fn array(&mut self) -> Option<Value<'a>> {
        self.at += 1;
        let mut items = Vec::new();
        self.skip_whitespace();
        if self.bytes.get(self.at) == Some(&b']') {
            self.at += 1;
            return Some(Value::Array(items));
        }
        loop {
            items.push(self.value()?);
            self.skip_whitespace();
            match self.bytes.get(self.at)? {
                b',' => self.at += 1,
                b']' => {
                    self.at += 1;
                    return Some(Value::Array(items));
                }
                _ => return None,
            }
        }
    }

    /// An integer within i64; a fraction or an exponent is left to the slower paths.
    fn integer(&mut self) -> Option<Value<'a>> {
        let start = self.at;
        let negative = self.bytes[self.at] == b'-';
        if negative {
            self.at += 1;
        }
        let digits = self.at;
        while let Some(b'0'..=b'9') = self.bytes.get(self.at) {
            self.at += 1;
        }
        let run = &self.bytes[digits..self.at];
        if run.is_empty() || (run.len() > 1 && run[0] == b'0') {
            return None;
        }
        if let Some(b'.' | b'e' | b'E') = self.bytes.get(self.at) {
            return None;
        }
        // "-0" is 0, as Python reads it.
        self.text[start..self.at]
            .parse::<i64>()
            .ok()
            .map(Value::Int)
    }

    fn string(&mut self) -> Option<Cow<'a, str>> {
        self.at += 1;
        let start = self.at;
        self.at = plain_run(self.bytes, self.at, false);
        match *self.bytes.get(self.at)? {
            b'"' => {
                let text = &self.text[start..self.at];
                self.at += 1;
                return Some(Cow::Borrowed(text));
            }
            b'\\' => {}
            _ => return None, // a control character
        }
        let mut owned = String::from(&self.text[start..self.at]);
        loop {
            match *self.bytes.get(self.at)? {
                b'"' => {
                    self.at += 1;
                    return Some(Cow::Owned(owned));
                }
                b'\\' => {
                    let escape = *self.bytes.get(self.at + 1)?;
                    self.at += 2;
                    owned.push(match escape {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => self.unicode_escape()?,
                        _ => return None,
                    });
                }
                0..=0x1F => return None,
                _ => {
                    let run = self.at;
                    self.at = plain_run(self.bytes, self.at, false);
                    owned.push_str(&self.text[run..self.at]);
                }
            }
        }
    }

    /// After `\u`: the character of one escape, or of a surrogate pair. A NUL or a lone
    /// surrogate is None.
    fn unicode_escape(&mut self) -> Option<char> {
        let high = self.hex4()?;
        let code = match high {
            0 => return None,
            0xD800..=0xDBFF => {
                if !self.bytes[self.at..].starts_with(b"\\u") {
                    return None;
                }
                self.at += 2;
                let low = self.hex4()?;
                if !(0xDC00..=0xDFFF).contains(&low) {
                    return None;
                }
                0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)
            }
            0xDC00..=0xDFFF => return None,
            _ => high,
        };
        char::from_u32(code)
    }

    /// The four hex digits at `at`, consumed.
    fn hex4(&mut self) -> Option<u32> {
        let digits = self.bytes.get(self.at..self.at + 4)?;
        let mut code = 0u32;
        for &digit in digits {
            code = code * 16 + (digit as char).to_digit(16)?;
        }
        self.at += 4;
        Some(code)
    }
}
