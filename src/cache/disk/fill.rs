//! Filling an entry frame by frame: a multi-frame file's blocks are decoded
//! one read at a time, so each verified block is written at its offset into
//! a temporary file, its SHA-256 and CRC-32 kept; when the last one arrives
//! the content hash is checked (from the block sums, without reading the
//! file again) and the file is committed like a whole one. Unfinished fills
//! are removed when the process ends; a killed process's are swept by the
//! next one ([`sweep_dead`]), told apart by the `flock` each filler holds.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use parking_lot::Mutex;
use rustix::fs::{flock, FlockOperation};
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

/// A temporary file this old is swept even when its PID names a running
/// process (which is then a later process that reused the PID).
const ORPHAN_AGE: Duration = Duration::from_secs(3600);

/// Removes temporary files (`<key>.<pid>.<n>`) whose filler is gone.
///
/// A filler holds an `flock` on its file for as long as it lives, so a file
/// whose lock can be taken has no filler. The PID (not running, or only a
/// zombie) guards the instant between a filler's create and its lock; a
/// file far older than any fill is swept whatever its PID says.
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
        if !entry::is_entry_name(key) || pid == std::process::id() {
            continue;
        }
        let Ok(file) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(item.path())
        else {
            continue;
        };
        if flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
            continue;
        }
        let old = file
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > ORPHAN_AGE);
        if old || !running(pid) {
            let _ = std::fs::remove_file(item.path());
        }
    }
}

/// Whether `pid` names a process that has not exited (a zombie has).
fn running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may
    // itself hold spaces and parentheses.
    let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
    !matches!(state.and_then(|s| s.chars().next()), Some('Z' | 'X') | None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn temp_name(pid: u32, n: u32) -> String {
        format!("{}.{pid}.{n}", "ab".repeat(32))
    }

    /// A child that has exited but is not reaped yet: a zombie.
    fn zombie() -> std::process::Child {
        let child = Command::new("true").stdin(Stdio::null()).spawn().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while running(child.id()) {
            assert!(std::time::Instant::now() < deadline, "child did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
        child
    }

    #[test]
    fn sweep_removes_unlocked_files_of_exited_or_zombie_fillers_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let mut zombie = zombie();
        let mut reaped = Command::new("true").spawn().unwrap();
        reaped.wait().unwrap();
        let names = [
            temp_name(zombie.id(), 0), // unlocked, filler a zombie: swept
            temp_name(reaped.id(), 1), // unlocked, filler gone: swept
            temp_name(reaped.id(), 2), // locked (a filler lives): kept
            temp_name(1, 3),           // unlocked, PID running, fresh: kept
        ];
        for n in &names {
            File::create(dir.path().join(n)).unwrap();
        }
        let held = File::open(dir.path().join(&names[2])).unwrap();
        flock(&held, FlockOperation::LockExclusive).unwrap();
        sweep_dead(dir.path());
        let left = |n: &str| dir.path().join(n).exists();
        assert!(!left(&names[0]), "the zombie's file stayed");
        assert!(!left(&names[1]), "the exited filler's file stayed");
        assert!(left(&names[2]), "a locked file was swept");
        assert!(left(&names[3]), "a running PID's fresh file was swept");
        zombie.wait().unwrap();
    }
}
