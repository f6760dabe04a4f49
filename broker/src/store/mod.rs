//! Everything that touches disk. Only this module reads or writes files.

pub mod definitions;

pub use definitions::{DefinitionStore, Definitions, DefinitionsError};
