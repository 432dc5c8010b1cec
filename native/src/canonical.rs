//! JSON text of parsed values, in two forms. The digest's: compact, keys sorted by code point,
//! only ASCII characters, byte for byte what producer/canonical.py's `ascii_text` writes (its
//! property test holds the two equal), and its SHA-256. The stored one (a jsonb column's):
//! compact, keys in the record's order, UTF-8, as producer/canonical.py's `text` writes a
//! value (escaping only the quote, the backslash and control characters).

use sha2::{Digest, Sha256};

use crate::json::Value;
use crate::scan::plain_run;

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Which text: the digest's (sorted, ASCII) or the stored one (as parsed, UTF-8).
#[derive(Clone, Copy, PartialEq)]
pub enum Form {
    Digest,
    Stored,
}

pub fn digest(value: &Value<'_>) -> [u8; 32] {
    Sha256::digest(ascii_text(value)).into()
}

pub fn ascii_text(value: &Value<'_>) -> Vec<u8> {
    let mut text = Vec::with_capacity(1024);
    write(value, Form::Digest, &mut text);
    text
}

pub fn write(value: &Value<'_>, form: Form, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Int(number) => write_int(*number, out),
        Value::Str(text) => write_str(text, form, out),
        Value::Uuid(uuid) => {
            out.push(b'"');
            write_uuid(*uuid, out);
            out.push(b'"');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (at, item) in items.iter().enumerate() {
                if at > 0 {
                    out.push(b',');
                }
                write(item, form, out);
            }
            out.push(b']');
        }
        Value::Object(entries) => {
            let mut order: Vec<usize> = (0..entries.len()).collect();
            if form == Form::Digest {
                order.sort_unstable_by(|a, b| entries[*a].0.cmp(&entries[*b].0));
            }
            out.push(b'{');
            for (at, index) in order.into_iter().enumerate() {
                if at > 0 {
                    out.push(b',');
                }
                let (key, item) = &entries[index];
                write_str(key, form, out);
                out.push(b':');
                write(item, form, out);
            }
            out.push(b'}');
        }
    }
}

pub fn write_int(number: i64, out: &mut Vec<u8>) {
    out.extend_from_slice(decimal(number, &mut [0u8; 20]).as_bytes());
}

/// A signed integer's decimal text, written into `digits` (no allocation): at most 19 digits
/// and a sign.
pub fn decimal(number: i64, digits: &mut [u8; 20]) -> &str {
    let mut at = digits.len();
    let mut rest = number.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if number < 0 {
        at -= 1;
        digits[at] = b'-';
    }
    // ASCII digits and a sign only.
    std::str::from_utf8(&digits[at..]).unwrap_or_default()
}

/// The hyphenated lowercase text of a UUID, as `str(uuid.UUID)` writes it.
pub fn write_uuid(uuid: u128, out: &mut Vec<u8>) {
    for nibble in 0..32 {
        if matches!(nibble, 8 | 12 | 16 | 20) {
            out.push(b'-');
        }
        out.push(HEX[((uuid >> (124 - 4 * nibble)) & 0xF) as usize]);
    }
}

fn escape_unit(unit: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(b"\\u");
    for shift in [12, 8, 4, 0] {
        out.push(HEX[((unit >> shift) & 0xF) as usize]);
    }
}

pub fn write_str(text: &str, form: Form, out: &mut Vec<u8>) {
    out.push(b'"');
    let bytes = text.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        // A run written as it is: printable ASCII (any UTF-8 past it too, in the stored form)
        // but the quote and the backslash.
        let start = at;
        at = plain_run(bytes, at, form == Form::Digest);
        out.extend_from_slice(&bytes[start..at]);
        let Some(character) = text[at..].chars().next() else {
            break;
        };
        at += character.len_utf8();
        match character {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            _ => {
                let code = character as u32;
                if code < 0x10000 {
                    escape_unit(code, out);
                } else {
                    let code = code - 0x10000;
                    escape_unit(0xD800 | (code >> 10), out);
                    escape_unit(0xDC00 | (code & 0x3FF), out);
                }
            }
        }
    }
    out.push(b'"');
}
