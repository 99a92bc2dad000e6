//! What makes a vector a memory: the record and its attributes
//! ([`record`]) and metadata filters ([`filter`]).

pub mod decay;
pub mod filter;
pub mod links;
pub mod record;

pub use decay::{DecayPolicy, Weights};
pub use filter::Filter;
pub use record::{Link, Record, Scope};
