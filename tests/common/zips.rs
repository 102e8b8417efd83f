//! Test support: zips that cachemount did not write, made with the `zip`
//! crate the way Buildkite cache v2 lays them out (manifest first, `_0/`
//! anchored at the working dir).

#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::path::Path;

use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

/// Writes a zip at `path`: the Buildkite manifest (when `with_manifest`),
/// then whatever `build` adds.
pub fn buildkite_zip(path: &Path, with_manifest: bool, build: impl FnOnce(&mut ZipWriter<File>)) {
    let mut zip = ZipWriter::new(File::create(path).unwrap());
    if with_manifest {
        zip.start_file(
            ".buildkite/cache-manifest.json",
            SimpleFileOptions::default(),
        )
        .unwrap();
        zip.write_all(br#"{"version":2,"mappings":{"_0":"."}}"#)
            .unwrap();
    }
    build(&mut zip);
    zip.finish().unwrap();
}

/// Adds a file entry (mode 0640) compressed with `method`.
pub fn add_file(zip: &mut ZipWriter<File>, name: &str, content: &[u8], method: CompressionMethod) {
    let options = SimpleFileOptions::default()
        .compression_method(method)
        .unix_permissions(0o640)
        .large_file(content.len() > 1 << 20);
    zip.start_file(name, options).unwrap();
    zip.write_all(content).unwrap();
}
