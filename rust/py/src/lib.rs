//! `engramdb._native`: the PyO3 binding of engramdb-core. Only translation
//! lives here: numpy arrays in and out ([`store`]), errors ([`error`]), and
//! the one helper that releases the GIL around core calls ([`gil`]).

mod error;
mod gil;
mod hits;
mod lsh;
mod spann;
mod store;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<store::NativeStore>()?;
    m.add_class::<lsh::NativeLsh>()?;
    m.add_class::<spann::NativeSpann>()?;
    m.add_function(wrap_pyfunction!(store::verify_store, m)?)?;
    m.add_function(wrap_pyfunction!(gil::set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(gil::get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_name, m)?)?;
    Ok(())
}

/// Which SIMD kernel family this CPU uses: "avx2+fma" or "portable".
#[pyfunction]
fn kernel_name() -> &'static str {
    engramdb_core::distance::kernel_name()
}
