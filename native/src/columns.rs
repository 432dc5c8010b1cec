//! A batch's rows as PostgreSQL array literals, one text per column (consumer/ledger/arrays.py):
//! the statements unnest `$n::text::<type>[]`, so asyncpg sends one string a column instead
//! of encoding every element in its own call.
//!
//! Each element is written as PostgreSQL's array input reads it: NULL for None, numbers and
//! UUIDs bare, everything else double-quoted with `"` and `\` escaped. A timestamp is its
//! microseconds since the epoch (the statements turn them back, exactly): PostgreSQL parses a
//! number in a fraction of the time its timestamp text takes.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{
    PyBytes, PyDateTime, PyDelta, PyDeltaAccess, PyList, PyString, PyTimeAccess, PyTzInfoAccess,
};
use pyo3::types::{PyDateAccess, PyInt};

#[derive(Clone, Copy)]
enum Kind {
    Integer,
    Text,
    Uuid,
    Timestamp,
    Bytes,
    Json,
}

impl Kind {
    fn of(name: &str) -> Option<Kind> {
        Some(match name {
            "bigint" | "smallint" => Kind::Integer,
            "text" => Kind::Text,
            "uuid" => Kind::Uuid,
            "timestamptz" => Kind::Timestamp,
            "bytea" => Kind::Bytes,
            "jsonb" => Kind::Json,
            _ => return None,
        })
    }
}

struct Column {
    path: Vec<Py<PyString>>,
    kind: Kind,
}

#[pyclass(frozen)]
pub struct Columns {
    columns: Vec<Column>,
    // The UTF-8 JSON text of a jsonb column's value.
    json_text: Py<PyAny>,
}

#[pymethods]
impl Columns {
    /// `columns`: (attribute path, PostgreSQL type) of each column, e.g. ("claim.at",
    /// "timestamptz"); `json_text`: the writer of a jsonb value's UTF-8 JSON text.
    #[new]
    fn new(py: Python<'_>, columns: Vec<(String, String)>, json_text: Py<PyAny>) -> PyResult<Self> {
        let columns = columns
            .into_iter()
            .map(|(path, kind)| {
                let kind = Kind::of(&kind).ok_or_else(|| {
                    PyValueError::new_err(format!("no array literal for type {kind:?}"))
                })?;
                let path = path
                    .split('.')
                    .map(|name| PyString::intern(py, name).unbind())
                    .collect();
                Ok(Column { path, kind })
            })
            .collect::<PyResult<_>>()?;
        Ok(Columns { columns, json_text })
    }

    /// One array literal per column, in the order given, over `rows` in their order.
    fn __call__(&self, py: Python<'_>, rows: &Bound<'_, PyList>) -> PyResult<Vec<String>> {
        let mut literals: Vec<String> = self.columns.iter().map(|_| String::from("{")).collect();
        for (index, row) in rows.iter().enumerate() {
            if index == 1 {
                // The first row's length, for every row: one allocation a literal, mostly.
                for literal in &mut literals {
                    literal.reserve(literal.len() * rows.len());
                }
            }
            for (column, literal) in self.columns.iter().zip(literals.iter_mut()) {
                if index > 0 {
                    literal.push(',');
                }
                let mut value = row.clone();
                for name in &column.path {
                    value = value.getattr(name.bind(py))?;
                }
                self.element(&value, column.kind, literal)?;
            }
        }
        for literal in &mut literals {
            literal.push('}');
        }
        Ok(literals)
    }
}

impl Columns {
    /// Appends one element to a literal.
    fn element(&self, value: &Bound<'_, PyAny>, kind: Kind, out: &mut String) -> PyResult<()> {
        // A jsonb column holds JSON: None is its `null`, as the writer has it, not SQL's NULL.
        if value.is_none() && !matches!(kind, Kind::Json) {
            out.push_str("NULL");
            return Ok(());
        }
        match kind {
            Kind::Integer => {
                let number = value.cast::<PyInt>()?;
                match number.extract::<i64>() {
                    Ok(number) => integer(number, out),
                    Err(_) => out.push_str(number.str()?.to_str()?),
                }
            }
            Kind::Text => quoted(value.cast::<PyString>()?.to_str()?, out),
            Kind::Uuid => uuid(value.getattr(intern!(value.py(), "int"))?.extract()?, out),
            Kind::Timestamp => integer(micros(value.cast::<PyDateTime>()?)?, out),
            Kind::Bytes => {
                out.push_str("\"\\\\x");
                hex(value.cast::<PyBytes>()?.as_bytes(), out);
                out.push('"');
            }
            Kind::Json => {
                // msgspec's text (producer/canonical.py): the one writer of jsonb text, and
                // faster than walking the value from here.
                let text = self.json_text.bind(value.py()).call1((value,))?;
                let text = std::str::from_utf8(text.cast::<PyBytes>()?.as_bytes())?;
                quoted(text, out);
            }
        }
        Ok(())
    }
}

/// `"text"` with `"` and `\` escaped: every other character stands for itself inside quotes.
fn quoted(text: &str, out: &mut String) {
    out.reserve(text.len() + 2);
    out.push('"');
    let mut plain = 0;
    for (at, byte) in text.bytes().enumerate() {
        if byte == b'"' || byte == b'\\' {
            out.push_str(&text[plain..at]);
            out.push('\\');
            plain = at;
        }
    }
    out.push_str(&text[plain..]);
    out.push('"');
}

/// A UUID's canonical text: 32 hex digits, grouped 8-4-4-4-12.
fn uuid(value: u128, out: &mut String) {
    let bytes = value.to_be_bytes();
    for (group, range) in [0..4, 4..6, 6..8, 8..10, 10..16].into_iter().enumerate() {
        if group > 0 {
            out.push('-');
        }
        hex(&bytes[range], out);
    }
}

/// Microseconds since 1970-01-01T00:00:00Z of an aware datetime. A naive one has no instant:
/// an error, never a guess.
fn micros(at: &Bound<'_, PyDateTime>) -> PyResult<i64> {
    let tzinfo = at
        .get_tzinfo()
        .ok_or_else(|| PyTypeError::new_err("a naive datetime has no instant to store"))?;
    let offset = tzinfo.call_method1(intern!(at.py(), "utcoffset"), (at,))?;
    let offset = offset.cast::<PyDelta>()?;
    let offset = (i64::from(offset.get_days()) * 86_400 + i64::from(offset.get_seconds()))
        * 1_000_000
        + i64::from(offset.get_microseconds());
    let days = days_from_civil(
        i64::from(at.get_year()),
        i64::from(at.get_month()),
        i64::from(at.get_day()),
    );
    let seconds = days * 86_400
        + i64::from(at.get_hour()) * 3_600
        + i64::from(at.get_minute()) * 60
        + i64::from(at.get_second());
    Ok(seconds * 1_000_000 + i64::from(at.get_microsecond()) - offset)
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// A signed integer's decimal digits, written without an allocation.
pub fn integer(number: i64, out: &mut String) {
    let mut digits = [0u8; 20];
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
        out.push('-');
    }
    // The slice holds ASCII digits only.
    out.push_str(std::str::from_utf8(&digits[at..]).unwrap_or_default());
}

/// Lower-case hex digits of bytes, two a byte.
pub fn hex(bytes: &[u8], out: &mut String) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
}
