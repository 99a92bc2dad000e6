//! The one mapping from core errors to Python exceptions. The classes are
//! defined in Python (`engramdb/errors.py`) so they can inherit from both
//! `EngramError` and the matching built-in (`ValueError`, `KeyError`).

use engramdb_core::Error;
use pyo3::prelude::*;
use pyo3::types::PyType;

fn class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyType>> {
    Ok(py
        .import("engramdb.errors")?
        .getattr(name)?
        .cast_into::<PyType>()?)
}

pub fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let name = match &e {
        Error::DimensionMismatch { .. } => "DimensionMismatchError",
        Error::InvalidValue(_) => "InvalidVectorError",
        Error::EmptyInput(_) => "EmptyInputError",
        Error::InvalidArgument(_) => "InvalidArgumentError",
        Error::NotFound(_) => "NotFoundError",
        Error::DuplicateId(_) => "DuplicateIdError",
        Error::Locked(_) => "StoreLockedError",
        Error::ReadOnly => "ReadOnlyError",
        Error::Closed => "StoreClosedError",
        Error::Corruption { .. } => "CorruptionError",
        Error::FormatVersion { .. } => "FormatVersionError",
        Error::Io { .. } => "StorageIOError",
    };
    let msg = e.to_string();
    match class(py, name) {
        Ok(cls) => PyErr::from_type(cls, msg),
        Err(import_err) => import_err,
    }
}
