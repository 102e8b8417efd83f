//! Test support: a cache saved straight to the S3 test server (not through
//! any proxy) under key `k`, with its source moved aside as the expected tree
//! — the starting point of the fault and reopen tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use crate::common::cli::Sandbox;
use crate::common::s3::TestS3;

pub struct Saved {
    /// Its store is the test's S3 prefix.
    pub sb: Sandbox,
    pub s3: TestS3,
    /// What the cache holds, as a tree on disk.
    pub expected: PathBuf,
}

impl Saved {
    /// `build(dir)` fills the tree saved as `cache`; None (skip) without S3.
    pub fn on_s3(test: &str, build: impl FnOnce(&Path)) -> Option<Saved> {
        let s3 = TestS3::from_env(test)?;
        let sb = s3.sandbox();
        let src = sb.work().join("cache");
        build(&src);
        sb.ok(&[
            "save",
            "-q",
            "--endpoint-url",
            &s3.endpoint,
            "--key",
            "k",
            "cache",
        ]);
        let expected = sb.dir.path().join("expected");
        std::fs::rename(&src, &expected).unwrap();
        Some(Saved { sb, s3, expected })
    }
}
