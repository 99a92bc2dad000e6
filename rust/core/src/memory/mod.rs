//! What makes a vector a memory: the record and its attributes
//! ([`record`]) and metadata filters ([`filter`]).

pub mod filter;
pub mod record;

pub use filter::Filter;
pub use record::{Link, Record, Scope};
