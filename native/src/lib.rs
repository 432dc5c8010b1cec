//! token-ledger's native paths: a record's bytes to the parts of a LedgerEvent
//! (producer/ledger_event.py, through consumer/ledger/native.py), its payload's digest from the
//! same parse; and a batch's rows to the array literals its statements read (columns.rs,
//! through consumer/ledger/arrays.py).

mod canonical;
mod columns;
mod event;
mod json;
mod time;

use std::sync::{Mutex, TryLockError};

use pyo3::exceptions::{PyKeyError, PyValueError};
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
    keys: Mutex<KeyCache>,
}

/// The str objects of recently seen object keys, as msgspec keeps them: a batch's payloads
/// share a few dozen keys, and a shared str is not made, hashed and freed again for each dict.
/// Bounded (a producer's keys are unbounded) and not interned (from Python 3.12 on an interned
/// str is never freed).
struct KeyCache {
    slots: Vec<Option<(Box<str>, Py<PyString>)>>,
}

impl KeyCache {
    const SLOTS: usize = 512;
    const LONGEST: usize = 32;

    fn new() -> Self {
        KeyCache {
            slots: (0..Self::SLOTS).map(|_| None).collect(),
        }
    }

    fn get<'py>(&mut self, py: Python<'py>, key: &str) -> Bound<'py, PyString> {
        if key.len() > Self::LONGEST {
            return PyString::new(py, key);
        }
        // FNV-1a: the slot of a key.
        let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3)
        });
        let slot = &mut self.slots[(hash % Self::SLOTS as u64) as usize];
        if let Some((cached, text)) = slot {
            if **cached == *key {
                return text.bind(py).clone();
            }
        }
        let text = PyString::new(py, key);
        *slot = Some((key.into(), text.clone().unbind()));
        text
    }
}

#[pymethods]
impl Decoder {
    #[new]
    #[pyo3(signature = (*, started, finalized, appended, usage, call, legacy, entry, measures, max, calls))]
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
                max,
                calls,
            },
            uuid_type: uuid.getattr("UUID")?.unbind(),
            unknown_safety: uuid.getattr("SafeUUID")?.getattr("unknown")?.unbind(),
            utc: utc.unbind(),
            keys: Mutex::new(KeyCache::new()),
        })
    }

    /// (type, event_id, occurred_at, thread_id, search_space_id, user_id, turn_id, role,
    /// digest, payload, unknown fields) of a record value, or None when the reference decoder
    /// must decide.
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
        // Never wait for the key cache: its holder may be this thread (a finalizer that a
        // collection inside `python` runs) or another thread waiting for the GIL this one holds.
        let mut cache = match self.keys.try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        let payload = self.python(py, &event.payload, cache.as_deref_mut())?;
        drop(cache);
        let payload = payload.cast_into::<PyDict>()?;
        // The envelope's values are the payload's own objects: one UUID, one str each. Every
        // event has the first five (event.rs writes them); turn_id and role only some.
        let field = |name: &Bound<'py, PyString>| -> PyResult<Bound<'py, PyAny>> {
            payload
                .get_item(name)?
                .ok_or_else(|| PyKeyError::new_err(name.clone().unbind()))
        };
        let optional = |name: &Bound<'py, PyString>| -> PyResult<Bound<'py, PyAny>> {
            Ok(payload
                .get_item(name)?
                .unwrap_or_else(|| py.None().into_bound(py)))
        };
        let parts: [Bound<'py, PyAny>; 11] = [
            field(intern!(py, "type"))?,
            field(intern!(py, "event_id"))?,
            occurred_at.into_any(),
            field(intern!(py, "thread_id"))?,
            field(intern!(py, "search_space_id"))?,
            field(intern!(py, "user_id"))?,
            optional(intern!(py, "turn_id"))?,
            optional(intern!(py, "role"))?,
            PyBytes::new(py, &digest).into_any(),
            payload.clone().into_any(),
            event.unknown.into_pyobject(py)?.into_any(),
        ];
        Ok(Some(PyTuple::new(py, parts)?))
    }
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

    /// The Python value of a parsed one; object keys' str objects from `keys` when it is free.
    fn python<'py>(
        &self,
        py: Python<'py>,
        value: &Value<'_>,
        mut keys: Option<&mut KeyCache>,
    ) -> PyResult<Bound<'py, PyAny>> {
        Ok(match value {
            Value::Null => py.None().into_bound(py),
            Value::Bool(flag) => PyBool::new(py, *flag).to_owned().into_any(),
            Value::Int(number) => number.into_pyobject(py)?.into_any(),
            Value::Str(text) => PyString::new(py, text).into_any(),
            Value::Uuid(uuid) => self.uuid(py, *uuid)?,
            Value::Array(items) => {
                let list = PyList::empty(py);
                for item in items {
                    list.append(self.python(py, item, keys.as_deref_mut())?)?;
                }
                list.into_any()
            }
            Value::Object(entries) => {
                let dict = PyDict::new(py);
                for (key, item) in entries {
                    let key = match keys.as_deref_mut() {
                        Some(cache) => cache.get(py, key),
                        None => PyString::new(py, key),
                    };
                    dict.set_item(key, self.python(py, item, keys.as_deref_mut())?)?;
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
