//! Local trees: walking the paths `save` archives ([`walk`]) and writing an
//! archive's entries back to disk safely ([`extract`]), by directory fd
//! without following symlinks ([`beneath`]).

pub mod beneath;
pub mod extract;
pub mod walk;
