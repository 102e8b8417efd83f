//! Support code shared by the integration tests (`mod common;` in a test file).

pub mod cli;
pub mod local;
pub mod mount;
pub mod proxy;
pub mod s3;
pub mod saved;
pub mod skip;
pub mod tree;
pub mod zips;
