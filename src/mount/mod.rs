//! The mount lifecycle (DESIGN §5): checking that FUSE is usable, preparing
//! mountpoints, serving every path of one archive from one daemon (read-only,
//! or writable through an overlay), learning from its reads (`learn`) and
//! warming the kernel's caches from what it learnt (`warm`), unmounting and
//! reading a mount's counters; the start-up clock.

pub mod control;
pub mod daemon;
pub mod learn;
pub mod overlay;
pub mod preflight;
pub mod private;
pub mod startup;
pub mod warm;
