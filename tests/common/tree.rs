//! Test support: seeded trees to save, and a side-by-side comparison of two
//! trees (names, kinds, modes, sizes, ns mtimes, symlink targets, user xattrs,
//! every byte) — the check every round-trip and mount test ends with.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use filetime::FileTime;

/// A small deterministic generator (splitmix64): the same seed, the same tree.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Compressible bytes (text-like), so archives behave like real caches.
    pub fn text(&mut self, len: usize) -> Vec<u8> {
        const WORDS: &[&str] = &[
            "const ",
            "function ",
            "return ",
            "module",
            ".exports",
            " = ",
            "require(",
            "'./lib'",
            ");\n",
            "{\n",
            "}\n",
            "if (",
            "x",
            "y",
            "42",
            "\t",
        ];
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            out.extend_from_slice(WORDS[self.below(WORDS.len() as u64) as usize].as_bytes());
        }
        out.truncate(len);
        out
    }
    /// Incompressible bytes.
    pub fn noise(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// Whether the filesystem under `dir` keeps user xattrs (tmpfs and ext4 do;
/// some overlays don't). Without them the xattr checks are a skip
/// (tests/common/skip.rs): a failure in CI, a logged SKIP elsewhere.
pub fn supports_xattrs(dir: &Path) -> bool {
    let probe = dir.join(".xattr-probe");
    let _ = fs::write(&probe, b"");
    let ok = xattr::set(&probe, "user.probe", b"1").is_ok();
    let _ = fs::remove_file(&probe);
    if !ok {
        crate::common::skip::missing(
            "xattr checks",
            crate::common::skip::Need::Xattrs,
            &format!("{} keeps no user xattrs", dir.display()),
        );
    }
    ok
}

pub fn set_mtime(path: &Path, secs: i64, nanos: u32) {
    let t = FileTime::from_unix_time(secs, nanos);
    filetime::set_symlink_file_times(path, t, t).unwrap();
}

/// The round-trip tree: nested and empty dirs, modes, relative and absolute
/// symlinks, empty files, a file of many frames, a one-frame file, xattrs, ns mtimes.
pub fn feature_tree(root: &Path, seed: u64) {
    let mut rng = Rng::new(seed);
    fs::create_dir_all(root.join("nested/deeper/deepest")).unwrap();
    fs::create_dir_all(root.join("empty-dir")).unwrap();
    fs::create_dir_all(root.join("private")).unwrap();
    fs::write(root.join("empty-file"), b"").unwrap();
    fs::write(root.join("one-frame.js"), rng.text(300_000)).unwrap();
    fs::write(
        root.join("many-frames.bin"),
        [rng.text(5 << 20), rng.noise(3 << 20), rng.text(123_457)].concat(),
    )
    .unwrap();
    fs::write(root.join("nested/deeper/deepest/leaf.txt"), b"leaf\n").unwrap();
    fs::write(root.join("nested/tiny"), b"x").unwrap();
    fs::write(root.join("private/secret"), rng.text(1000)).unwrap();
    fs::write(root.join("script.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(root.join("script.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(
        root.join("private/secret"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    fs::set_permissions(root.join("private"), fs::Permissions::from_mode(0o710)).unwrap();
    // The sticky bit round-trips; setuid/setgid do not (a restore grants
    // nothing: tests/untrusted_targets.rs).
    fs::set_permissions(root.join("nested/tiny"), fs::Permissions::from_mode(0o1755)).unwrap();
    std::os::unix::fs::symlink("deeper/deepest/leaf.txt", root.join("nested/rel-link")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("missing-target", root.join("dangling-link")).unwrap();
    if supports_xattrs(root) {
        xattr::set(
            root.join("one-frame.js"),
            "user.origin",
            b"registry.npmjs.org",
        )
        .unwrap();
        xattr::set(root.join("nested"), "user.dir-attr", b"\x00binary\xff").unwrap();
    }
    // Distinct ns mtimes everywhere, directories last (writing children changes them).
    let mut paths = Vec::new();
    collect(root, &mut paths);
    paths.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for (i, p) in paths.iter().enumerate() {
        set_mtime(p, 1_600_000_000 + i as i64 * 1000, 123_456_789 + i as u32);
    }
}

/// The one version-tagged generator: `len` bytes in `block`-sized blocks,
/// each starting with the line `"{version} {name} {index:08}\n"` and filled
/// with noise (incompressible), so a reader can tell which version of which
/// file every block it got came from.
pub fn tagged(version: &str, name: &str, len: usize, block: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len + block);
    let mut index = 0;
    while out.len() < len {
        let mut b = format!("{version} {name} {index:08}\n").into_bytes();
        assert!(b.len() < block, "block too small for its tag");
        b.extend(rng.noise(block - b.len()));
        out.extend_from_slice(&b);
        index += 1;
    }
    out.truncate(len);
    out
}

/// The version tag of each `block`-sized block of [`tagged`] bytes (blocks
/// too short to hold a tag are skipped).
pub fn block_versions(data: &[u8], block: usize) -> Vec<String> {
    data.chunks(block)
        .filter(|c| c.len() >= 3)
        .map(|c| {
            let end = c.iter().position(|b| *b == b' ').unwrap_or(c.len().min(16));
            String::from_utf8_lossy(&c[..end]).into_owned()
        })
        .collect()
}

/// `count` small files spread over many directories, node_modules-like.
pub fn small_files_tree(root: &Path, seed: u64, count: usize) {
    let mut rng = Rng::new(seed);
    for i in 0..count {
        let pkg = i / 20;
        let dir = root.join(format!("pkg-{:04}/lib/sub-{}", pkg, (i / 5) % 4));
        fs::create_dir_all(&dir).unwrap();
        let len = 100 + rng.below(6000) as usize;
        fs::write(dir.join(format!("file-{i}.js")), rng.text(len)).unwrap();
    }
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            collect(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// Everything a user could notice about one path.
#[derive(Debug, PartialEq, Eq)]
pub struct Observed {
    pub kind: &'static str,
    pub mode: u32,
    pub size: u64,
    pub mtime: (i64, i64),
    pub link: Option<PathBuf>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub content_sha: Option<String>,
}

/// Walks `root` into path → observation (content as a SHA-256, to keep diffs readable).
pub fn observe(root: &Path) -> BTreeMap<PathBuf, Observed> {
    use sha2::{Digest, Sha256};
    let mut paths = Vec::new();
    collect(root, &mut paths);
    paths
        .into_iter()
        .map(|p| {
            let md = fs::symlink_metadata(&p).unwrap();
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                "dir"
            } else if ft.is_symlink() {
                "symlink"
            } else {
                "file"
            };
            let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = if ft.is_symlink() {
                Vec::new()
            } else {
                xattr::list(&p)
                    .map(|names| {
                        names
                            .filter(|n| n.as_bytes().starts_with(b"user."))
                            .map(|n| {
                                (
                                    n.as_bytes().to_vec(),
                                    xattr::get(&p, &n).unwrap().unwrap_or_default(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            };
            xattrs.sort();
            let observed = Observed {
                kind,
                mode: md.mode() & 0o7777,
                size: if ft.is_dir() { 0 } else { md.len() },
                mtime: (md.mtime(), md.mtime_nsec()),
                link: ft.is_symlink().then(|| fs::read_link(&p).unwrap()),
                xattrs,
                content_sha: ft
                    .is_file()
                    .then(|| hex::encode(Sha256::digest(fs::read(&p).unwrap()))),
            };
            (p.strip_prefix(root).unwrap().to_path_buf(), observed)
        })
        .collect()
}

/// Panics with the first difference between two trees.
pub fn assert_same_tree(expected: &Path, actual: &Path) {
    let a = observe(expected);
    let b = observe(actual);
    let a_names: Vec<_> = a.keys().collect();
    let b_names: Vec<_> = b.keys().collect();
    assert_eq!(a_names, b_names, "the trees hold different paths");
    for (path, obs) in &a {
        assert_eq!(Some(obs), b.get(path), "{} differs", path.display());
    }
}
