//! Local trees: walking the paths `save` archives ([`walk`]) and writing an
//! archive's entries back to disk safely ([`extract`]).

pub mod extract;
pub mod walk;
