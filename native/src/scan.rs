//! Runs of string bytes that JSON text holds as they are, found eight bytes at a time: chat
//! text is most of a record, and the parser and both writers walk all of it.

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// Non-zero when a byte of `word` is zero (exact as a yes or no).
fn has_zero(word: u64) -> u64 {
    word.wrapping_sub(ONES) & !word & HIGH
}

/// Non-zero when a byte of `word` ends the run: a quote, a backslash, a control character, and
/// with `ascii` any byte past `~` (DEL and every byte of a multi-byte character).
fn has_special(word: u64, ascii: bool) -> u64 {
    // A byte below 0x20 (exact for bounds up to 0x80: bytes with the high bit never count).
    let control = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
    let quote = has_zero(word ^ (ONES * u64::from(b'"')));
    let backslash = has_zero(word ^ (ONES * u64::from(b'\\')));
    let past_tilde = if ascii {
        (word & HIGH) | has_zero(word ^ (ONES * 0x7f))
    } else {
        0
    };
    control | quote | backslash | past_tilde
}

fn special(byte: u8, ascii: bool) -> bool {
    byte == b'"' || byte == b'\\' || byte < 0x20 || (ascii && byte > b'~')
}

/// The end of the run of plain bytes from `at`: the first quote, backslash or control
/// character (with `ascii`, or byte past `~`), or the end of `bytes`.
pub fn plain_run(bytes: &[u8], mut at: usize, ascii: bool) -> usize {
    while let Some(chunk) = bytes.get(at..at + 8) {
        let word = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        if has_special(word, ascii) != 0 {
            break;
        }
        at += 8;
    }
    while at < bytes.len() && !special(bytes[at], ascii) {
        at += 1;
    }
    at
}
