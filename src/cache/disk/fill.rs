//! Filling an entry frame by frame: a multi-frame file's blocks are decoded
//! one read at a time, so each verified block is written at its offset into
//! a temporary file, its SHA-256 and CRC-32 kept; when the last one arrives
//! the content hash is checked (from the block sums, without reading the
//! file again) and the file is committed like a whole one. Unfinished fills
//! are removed when the process ends; a killed process's are swept by the
//! next one ([`sweep_dead`]).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use super::entry::{self, EntryKey};
use super::DiskCache;
use crate::archive::Entry;

/// Fills in progress at once; more files read partly at the same time are
/// not cached (each holds a temporary file and a sum per block).
const MAX_FILLS: usize = 64;

struct Fill {
    file: File,
    tmp: PathBuf,
    /// Per block: its SHA-256 and CRC-32 state, once written.
    sums: Vec<Option<([u8; 32], crc32fast::Hasher)>>,
    left: u32,
}

#[derive(Default)]
pub struct Fills {
    map: Mutex<HashMap<EntryKey, Fill>>,
}

impl Fills {
    /// Removes the temporary files of unfinished fills.
    pub fn abandon(&self) {
        for (_, f) in self.map.lock().drain() {
            let _ = std::fs::remove_file(&f.tmp);
        }
    }
}

impl DiskCache {
    /// Adds verified block `block` (of `count`, `block_size` bytes each) of
    /// `e` to its fill; returns whether this completed and filed the entry.
    pub(super) fn fill_block(
        &self,
        key: EntryKey,
        e: &Entry,
        block: u32,
        data: &[u8],
        block_size: u64,
        count: u32,
    ) -> bool {
        let start = u64::from(block) * block_size;
        if block >= count || data.len() as u64 != block_size.min(e.size.saturating_sub(start)) {
            return false;
        }
        let mut map = self.fills.map.lock();
        if !map.contains_key(&key) {
            if map.len() >= MAX_FILLS {
                return false;
            }
            let Some((file, tmp)) = self.temp_file(&key) else {
                return false;
            };
            map.insert(
                key,
                Fill {
                    file,
                    tmp,
                    sums: (0..count).map(|_| None).collect(),
                    left: count,
                },
            );
        }
        let fill = map.get_mut(&key).expect("inserted above");
        if fill.sums[block as usize].is_some() {
            return false;
        }
        if let Err(err) = fill.file.write_all_at(data, start) {
            let f = map.remove(&key).expect("present");
            let _ = std::fs::remove_file(&f.tmp);
            drop(map);
            self.write_failed(&err);
            return false;
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(data);
        fill.sums[block as usize] = Some((Sha256::digest(data).into(), crc));
        fill.left -= 1;
        if fill.left > 0 {
            return false;
        }
        let f = map.remove(&key).expect("present");
        drop(map);
        let mut sums = Vec::with_capacity(f.sums.len());
        let mut crc = crc32fast::Hasher::new();
        for (sha, part) in f.sums.into_iter().flatten() {
            sums.push(sha);
            crc.combine(&part);
        }
        if !entry::may_file(e, &sums) {
            let _ = std::fs::remove_file(&f.tmp);
            tracing::warn!(
                "content of {} does not match its content hash: not cached",
                String::from_utf8_lossy(&e.name)
            );
            return false;
        }
        self.commit(key, f.file, &f.tmp, Ok(crc.finalize()), e.size)
    }
}

/// Removes temporary files (`<key>.<pid>.<n>`) whose process is gone.
pub fn sweep_dead(tmp: &Path) {
    let Ok(read) = std::fs::read_dir(tmp) else {
        return;
    };
    for item in read.flatten() {
        let name = item.file_name();
        let Some(name) = name.to_str() else { continue };
        let mut parts = name.split('.');
        let (Some(key), Some(pid), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if entry::is_entry_name(key) && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(item.path());
        }
    }
}
