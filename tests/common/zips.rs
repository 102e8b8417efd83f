//! Test support: zips that cachemount did not write, made with the `zip`
//! crate the way Buildkite cache v2 lays them out (manifest first, `_0/`
//! anchored at the working dir), and crafted ones written record by record
//! ([`RawZip`]) that declare whatever a test needs.

#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::path::Path;

use cachemount::archive::zip::{self as zip_fmt, HeaderFields};
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

/// A zip written record by record, whose headers declare exactly what the
/// test says — right or wrong (sizes, counts, names, modes): crafted
/// archives that no zip library would write. Records are encoded by
/// cachemount's own [`HeaderFields`], so only the declared values are made up.
pub struct RawZip {
    pub bytes: Vec<u8>,
    central: Vec<HeaderFields>,
}

/// How an entry's central-directory record describes it.
pub struct Declared<'a> {
    pub name: &'a [u8],
    pub method: u16,
    /// Full st_mode (type and permission bits).
    pub unix_mode: u32,
    /// The uncompressed size the headers declare.
    pub size: u64,
    pub crc32: u32,
}

impl RawZip {
    /// An empty zip; [`RawZip::buildkite`] starts with the cache manifest.
    pub fn new() -> Self {
        RawZip {
            bytes: Vec::new(),
            central: Vec::new(),
        }
    }

    /// Starts with Buildkite's manifest, `_0` anchored at the working dir.
    pub fn buildkite() -> Self {
        let mut z = Self::new();
        let json = br#"{"version":2,"mappings":{"_0":"."}}"#;
        z.add(
            Declared {
                name: b".buildkite/cache-manifest.json",
                method: zip_fmt::METHOD_STORED,
                unix_mode: 0o100644,
                size: json.len() as u64,
                crc32: crc32fast::hash(json),
            },
            json,
        );
        z
    }

    /// Adds an entry: a local header, then `data` as its compressed bytes.
    /// Returns the offset of its data.
    pub fn add(&mut self, d: Declared<'_>, data: &[u8]) -> u64 {
        let fields = HeaderFields {
            name: d.name.to_vec(),
            method: d.method,
            crc32: d.crc32,
            compressed_size: data.len() as u64,
            uncompressed_size: d.size,
            local_header_offset: self.bytes.len() as u64,
            unix_mode: d.unix_mode,
            mtime_secs: 1_700_000_000,
            zip64_local: false,
        };
        self.bytes.extend(fields.encode_local());
        let offset = self.bytes.len() as u64;
        self.bytes.extend_from_slice(data);
        self.central.push(fields);
        offset
    }

    /// The central directory and end records, with the true entry count.
    pub fn finish(self, comment: &[u8]) -> Vec<u8> {
        let entries = self.central.len() as u64;
        self.finish_declaring(entries, None, comment)
    }

    /// The central directory, then end records declaring `entries` entries
    /// and, when given, `cd_size` as the directory's size (whatever it is).
    pub fn finish_declaring(
        mut self,
        entries: u64,
        cd_size: Option<u64>,
        comment: &[u8],
    ) -> Vec<u8> {
        let cd_offset = self.bytes.len() as u64;
        for f in &self.central {
            self.bytes.extend(f.encode_central());
        }
        let real = self.bytes.len() as u64 - cd_offset;
        self.bytes.extend(zip_fmt::encode_end(
            entries,
            cd_offset,
            cd_size.unwrap_or(real),
            comment,
        ));
        self.bytes
    }
}

/// Raw deflate of `len` zero bytes (ratio ~1000:1, deflate's maximum), streamed so the zeros
/// are never all in memory.
pub fn deflated_zeros(len: u64) -> Vec<u8> {
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    let chunk = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        enc.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    enc.finish().unwrap()
}
