//! A batch's rows as the arguments of set-based statements, one a column (consumer/ledger/
//! arrays.py), read from the rows' attributes in one pass.
//!
//! Numbers, text and timestamps become one PostgreSQL array literal a column: the statement
//! reads `$n::text::<type>[]`, so asyncpg sends one string instead of encoding every element in
//! its own call. Each element is written as PostgreSQL's array input reads it: NULL for None,
//! numbers bare, text double-quoted with `"` and `\` escaped. A timestamp is its microseconds
//! since the epoch (the statement turns them back, exactly): PostgreSQL reads a number in a
//! fraction of the time its timestamp text takes. UUIDs, bytes and JSON text cost PostgreSQL
//! more to read as text than asyncpg saves, so they stay lists of values, sent in binary.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{
    PyDateAccess, PyDateTime, PyDelta, PyDeltaAccess, PyInt, PyList, PyString, PyTimeAccess,
    PyTzInfoAccess,
};

use crate::canonical::decimal;
use crate::time::days_from_civil;

#[derive(Clone, Copy)]
enum Kind {
    Integer,
    Text,
    Timestamp,
    Uuid,
    Bytes,
    /// A value to write as JSON text (jsonb).
    Json,
    /// JSON text already (json: stored as jsonb).
    JsonText,
}

impl Kind {
    fn of(name: &str) -> Option<Kind> {
        Some(match name {
            "bigint" | "smallint" => Kind::Integer,
            "text" => Kind::Text,
            "timestamptz" => Kind::Timestamp,
            "uuid" => Kind::Uuid,
            "bytea" => Kind::Bytes,
            "jsonb" => Kind::Json,
            "json" => Kind::JsonText,
            _ => return None,
        })
    }

    fn is_literal(self) -> bool {
        matches!(self, Kind::Integer | Kind::Text | Kind::Timestamp)
    }
}

struct Column {
    path: Vec<Py<PyString>>,
    kind: Kind,
}

/// A column's argument as it is built.
enum Argument<'py> {
    Literal(String),
    Values(Bound<'py, PyList>),
}

#[pyclass(frozen)]
pub struct Columns {
    columns: Vec<Column>,
    // The JSON text of a jsonb column's value.
    json_text: Py<PyAny>,
}

#[pymethods]
impl Columns {
    /// `columns`: (attribute path, PostgreSQL type) of each column, e.g. ("claim.at",
    /// "timestamptz"); `json_text`: the writer of a jsonb value's JSON text.
    #[new]
    fn new(py: Python<'_>, columns: Vec<(String, String)>, json_text: Py<PyAny>) -> PyResult<Self> {
        let columns = columns
            .into_iter()
            .map(|(path, kind)| {
                let kind = Kind::of(&kind).ok_or_else(|| {
                    PyValueError::new_err(format!("no array argument for type {kind:?}"))
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

    /// One argument per column, in the order given, over `rows` in their order: an array
    /// literal (str) or a list of values.
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        rows: &Bound<'py, PyList>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let mut arguments: Vec<Argument<'py>> = self
            .columns
            .iter()
            .map(|column| {
                if column.kind.is_literal() {
                    Argument::Literal(String::from("{"))
                } else {
                    Argument::Values(PyList::empty(py))
                }
            })
            .collect();
        for (index, row) in rows.iter().enumerate() {
            if index == 1 {
                // The first row's length, for every row: one allocation a literal, mostly.
                for argument in &mut arguments {
                    if let Argument::Literal(literal) = argument {
                        literal.reserve(literal.len() * rows.len());
                    }
                }
            }
            for (column, argument) in self.columns.iter().zip(arguments.iter_mut()) {
                let mut value = row.clone();
                for name in &column.path {
                    value = value.getattr(name.bind(py))?;
                }
                match argument {
                    Argument::Literal(literal) => {
                        if index > 0 {
                            literal.push(',');
                        }
                        element(&value, column.kind, literal)?;
                    }
                    Argument::Values(values) => match column.kind {
                        // JSON text, not SQL's NULL, for None too: a jsonb column holds `null`.
                        Kind::Json => values.append(self.json_text.bind(py).call1((value,))?)?,
                        Kind::JsonText if !value.is_instance_of::<PyString>() => {
                            return Err(PyTypeError::new_err("JSON text must be a str"));
                        }
                        _ => values.append(value)?,
                    },
                }
            }
        }
        arguments
            .into_iter()
            .map(|argument| match argument {
                Argument::Literal(mut literal) => {
                    literal.push('}');
                    Ok(PyString::new(py, &literal).into_any())
                }
                Argument::Values(values) => Ok(values.into_any()),
            })
            .collect()
    }
}

/// Appends one element to an array literal.
fn element(value: &Bound<'_, PyAny>, kind: Kind, out: &mut String) -> PyResult<()> {
    if value.is_none() {
        out.push_str("NULL");
        return Ok(());
    }
    match kind {
        // Past 64 bits an OverflowError: no column of ours holds more, and an int subclass's
        // own text is never trusted into a literal.
        Kind::Integer => out.push_str(decimal(
            value.cast::<PyInt>()?.extract::<i64>()?,
            &mut [0; 20],
        )),
        Kind::Text => quoted(value.cast::<PyString>()?.to_str()?, out),
        Kind::Timestamp => {
            out.push_str(decimal(micros(value.cast::<PyDateTime>()?)?, &mut [0; 20]))
        }
        Kind::Uuid | Kind::Bytes | Kind::Json | Kind::JsonText => {
            return Err(PyValueError::new_err("not a literal column"));
        }
    }
    Ok(())
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

/// Microseconds since 1970-01-01T00:00:00Z of an aware datetime. A naive one has no instant:
/// an error, never a guess.
fn micros(at: &Bound<'_, PyDateTime>) -> PyResult<i64> {
    if at.get_tzinfo().is_none() {
        return Err(PyTypeError::new_err(
            "a naive datetime has no instant to store",
        ));
    }
    // The datetime's own utcoffset: it holds the tzinfo's answer within a day either way.
    let offset = at.call_method0(intern!(at.py(), "utcoffset"))?;
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
