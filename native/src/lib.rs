//! token-ledger's native paths: a record's bytes to the parts of a LedgerEvent
//! (producer/ledger_event.py, through consumer/ledger/native.py), its payload's digest from the
//! same parse; and a batch's rows to the array literals its statements read (columns.rs,
//! through consumer/ledger/arrays.py).

mod canonical;
mod columns;
mod event;
mod json;
mod scan;
mod stored;
mod time;

use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyBytes, PyDateTime, PyDict, PyList, PyString, PyTuple, PyType, PyTzInfo,
};

use crate::json::Value;

#[pyclass(frozen)]
struct Decoder {
    fields: event::Fields,
    uuid_type: Py<PyAny>,
    unknown_safety: Py<PyAny>,
    utc: Py<PyTzInfo>,
}

#[pymethods]
impl Decoder {
    #[new]
    #[pyo3(signature = (*, started, finalized, appended, usage, call, legacy, entry, measures, kinds, max, calls))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        started: Vec<String>,
        finalized: Vec<String>,
        appended: Vec<String>,
        usage: Vec<String>,
        call: Vec<String>,
        legacy: Vec<String>,
        entry: Vec<String>,
        measures: Vec<String>,
        kinds: Vec<String>,
        max: i64,
        calls: usize,
    ) -> PyResult<Self> {
        if calls == 0 {
            return Err(PyValueError::new_err("calls must be at least 1"));
        }
        let uuid = py.import("uuid")?;
        let utc = py
            .import("datetime")?
            .getattr("UTC")?
            .cast_into::<PyTzInfo>()?;
        Ok(Decoder {
            fields: event::Fields {
                started,
                finalized,
                appended,
                usage,
                call,
                legacy,
                entry,
                measures,
                kinds,
                max,
                calls,
            },
            uuid_type: uuid.getattr("UUID")?.unbind(),
            unknown_safety: uuid.getattr("SafeUUID")?.getattr("unknown")?.unbind(),
            utc: utc.unbind(),
        })
    }

    /// (type, event_id, occurred_at, thread_id, search_space_id, user_id, turn_id, role,
    /// digest, content, usage, unknown fields) of a record value, or None when the reference
    /// decoder must decide. `content` is the JSON text of the content its message stores;
    /// `usage` None, or (the USAGE_MEASURES totals..., breakdown, call details' JSON text).
    fn decode<'py>(
        &self,
        py: Python<'py>,
        value: &[u8],
        max_bytes: usize,
        max_nesting: usize,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        if value.is_empty() || value.len() > max_bytes {
            return Ok(None);
        }
        if value
            .iter()
            .filter(|&&byte| byte == b'[' || byte == b'{')
            .count()
            > max_nesting
        {
            return Ok(None);
        }
        let Some(document) = json::parse(value, max_nesting) else {
            return Ok(None);
        };
        let Some(event) = event::decode(document, &self.fields) else {
            return Ok(None);
        };
        let (Some(content), Some(usage)) =
            (stored::content(&event), stored::usage(&event, &self.fields))
        else {
            return Ok(None);
        };
        let digest = canonical::digest(&event.payload);
        let at = event.occurred_at;
        let occurred_at = PyDateTime::new(
            py,
            at.year,
            at.month,
            at.day,
            at.hour,
            at.minute,
            at.second,
            at.microsecond,
            Some(self.utc.bind(py)),
        )?;
        let payload = match &event.payload {
            Value::Object(entries) => entries.as_slice(),
            _ => &[],
        };
        let text = |name: &str| -> Bound<'py, PyAny> {
            match event::get(payload, name) {
                Some(Value::Str(text)) => PyString::new(py, text).into_any(),
                _ => py.None().into_bound(py),
            }
        };
        let usage = match usage {
            None => py.None().into_bound(py),
            Some(usage) => self.usage(py, usage)?,
        };
        let parts: [Bound<'py, PyAny>; 12] = [
            PyString::intern(py, event.kind).into_any(),
            self.uuid(py, event.event_id)?,
            occurred_at.into_any(),
            event.thread_id.into_pyobject(py)?.into_any(),
            event.search_space_id.into_pyobject(py)?.into_any(),
            match event.user_id {
                Some(user_id) => self.uuid(py, user_id)?,
                None => py.None().into_bound(py),
            },
            text("turn_id"),
            match event::get(payload, "role") {
                Some(Value::Str(role)) => PyString::intern(py, role).into_any(),
                _ => py.None().into_bound(py),
            },
            PyBytes::new(py, &digest).into_any(),
            json_str(py, &content)?,
            usage,
            event.unknown.into_pyobject(py)?.into_any(),
        ];
        Ok(Some(PyTuple::new(py, parts)?))
    }
}

/// A str of JSON text the canonical writer wrote (UTF-8 by construction).
fn json_str<'py>(py: Python<'py>, text: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    let text =
        std::str::from_utf8(text).map_err(|error| PyValueError::new_err(error.to_string()))?;
    Ok(PyString::new(py, text).into_any())
}

impl Decoder {
    /// A uuid.UUID, made as msgspec makes one: allocated, then its slots set past the class's
    /// immutability guard, with no parsing of its text in Python.
    fn uuid<'py>(&self, py: Python<'py>, value: u128) -> PyResult<Bound<'py, PyAny>> {
        let uuid_type = self.uuid_type.bind(py).cast::<PyType>()?;
        // SAFETY: UUID is a heap type whose tp_alloc is PyType_GenericAlloc; the new reference
        // is owned by the Bound, and its two slots are set before it is shared.
        unsafe {
            let allocated = ffi::PyType_GenericAlloc(uuid_type.as_ptr().cast(), 0);
            let uuid = Bound::from_owned_ptr_or_err(py, allocated)?;
            let int = value.into_pyobject(py)?;
            if ffi::PyObject_GenericSetAttr(
                uuid.as_ptr(),
                intern!(py, "int").as_ptr(),
                int.as_ptr(),
            ) != 0
                || ffi::PyObject_GenericSetAttr(
                    uuid.as_ptr(),
                    intern!(py, "is_safe").as_ptr(),
                    self.unknown_safety.as_ptr(),
                ) != 0
            {
                return Err(PyErr::fetch(py));
            }
            Ok(uuid)
        }
    }

    /// (totals..., breakdown, call details) of a usage row.
    fn usage<'py>(
        &self,
        py: Python<'py>,
        usage: stored::Usage<'_, '_>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let breakdown = match usage.breakdown {
            stored::Breakdown::Sent(None) => PyDict::new(py).into_any(),
            stored::Breakdown::Sent(Some(sent)) => self.python(py, sent)?,
            stored::Breakdown::Summed(models) => {
                let breakdown = PyDict::new(py);
                for (model, sums) in models {
                    let counts = PyDict::new(py);
                    for (name, sum) in sums {
                        counts.set_item(PyString::intern(py, name), sum)?;
                    }
                    breakdown.set_item(PyString::new(py, model), counts)?;
                }
                breakdown.into_any()
            }
        };
        let mut parts: Vec<Bound<'py, PyAny>> = Vec::with_capacity(usage.totals.len() + 2);
        for total in usage.totals {
            parts.push(total.into_pyobject(py)?.into_any());
        }
        parts.push(breakdown);
        parts.push(json_str(py, &usage.call_details)?);
        Ok(PyTuple::new(py, parts)?.into_any())
    }

    /// The Python value of a parsed one.
    fn python<'py>(&self, py: Python<'py>, value: &Value<'_>) -> PyResult<Bound<'py, PyAny>> {
        Ok(match value {
            Value::Null => py.None().into_bound(py),
            Value::Bool(flag) => PyBool::new(py, *flag).to_owned().into_any(),
            Value::Int(number) => number.into_pyobject(py)?.into_any(),
            Value::Str(text) => PyString::new(py, text).into_any(),
            Value::Uuid(uuid) => self.uuid(py, *uuid)?,
            Value::Array(items) => {
                let list = PyList::empty(py);
                for item in items {
                    list.append(self.python(py, item)?)?;
                }
                list.into_any()
            }
            Value::Object(entries) => {
                let dict = PyDict::new(py);
                for (key, item) in entries {
                    dict.set_item(PyString::new(py, key), self.python(py, item)?)?;
                }
                dict.into_any()
            }
        })
    }
}

/// The digest's canonical text of a JSON document (tests hold it to producer/canonical.py's
/// `ascii_text`), or None for a document the native parser leaves to the slower paths.
#[pyfunction]
fn ascii_text<'py>(
    py: Python<'py>,
    value: &[u8],
    max_nesting: usize,
) -> Option<Bound<'py, PyBytes>> {
    json::parse(value, max_nesting)
        .map(|document| PyBytes::new(py, &canonical::ascii_text(&document)))
}

#[pymodule]
fn token_ledger_native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<Decoder>()?;
    module.add_class::<columns::Columns>()?;
    module.add_function(wrap_pyfunction!(ascii_text, module)?)?;
    let known = PyDict::new(module.py());
    for (name, fields) in event::KNOWN {
        known.set_item(name, PyTuple::new(module.py(), *fields)?)?;
    }
    module.add("KNOWN_FIELDS", known)?;
    Ok(())
}
