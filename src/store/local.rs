//! [`LocalStore`]: an object store over a local directory, the embedded default.
//!
//! It behaves like S3 where cachemount depends on it: writes are atomic
//! (temp file + fsync + rename), and every object has an ETag that changes
//! whenever the object is replaced or touched — emulated from the file's
//! (inode, size, mtime in ns) — so the pinned-read / 412 path works and is
//! tested the same way on both stores. A composition copies the base's
//! prefix file to file (`copy_file_range`), checked against the base's version
//! like a pinned read.
//!
//! A writer killed mid-write leaves its temp file behind; the next write into
//! the same directory removes temp files that have not been modified for
//! [`STALE_TEMP_AGE`] (see [`LocalStore::sweep_stale_temps`] for why that rule
//! is safe).

use std::fs::{self, File};
use std::io;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::buffers;

use super::{
    Composition, ListedObject, NameTooLong, ObjectMeta, ObjectStore, ObjectVersion, PutSource,
    RefreshOutcome, StoreError, StoreResult, TransferCounters, TransferCounts,
};

/// Names of in-flight writes start with this; `list` skips them.
const TEMP_PREFIX: &str = ".cachemount-tmp-";
/// A temp file older than this (by mtime) is a killed writer's and is removed.
pub const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);
/// The longest temp file name [`temp_name`] makes (prefix, pid, counter, nanoseconds).
const TEMP_NAME_MAX: usize = TEMP_PREFIX.len() + 10 + 1 + 20 + 1 + 8;
/// Linux's limits on one file name (NAME_MAX) and a whole path (PATH_MAX,
/// its terminating NUL included).
const NAME_MAX: usize = 255;
const PATH_MAX: usize = 4095;

/// A directory holding objects as files; keys map to relative paths (`/`-separated).
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
    /// Shared with the clones that run each operation on a blocking thread.
    counters: Arc<TransferCounters>,
}

impl LocalStore {
    /// A store rooted at `root`. The directory is created by the first `put`, so
    /// opening a store that does not exist yet is fine (reads answer NotFound).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalStore {
            root: root.into(),
            counters: Arc::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Maps a key to its file, refusing keys that could escape the root.
    fn path_of(&self, key: &str) -> StoreResult<PathBuf> {
        let invalid = |why: &str| StoreError::other(key, format!("invalid key: {why}"));
        if key.is_empty() || key.starts_with('/') || key.ends_with('/') {
            return Err(invalid("must be a non-empty relative path"));
        }
        for part in key.split('/') {
            if part.is_empty() || part == "." || part == ".." || part.starts_with(TEMP_PREFIX) {
                return Err(invalid("empty, `.`, `..` or temp-file component"));
            }
        }
        if !Path::new(key)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(invalid("not a plain relative path"));
        }
        Ok(self.root.join(key))
    }

    fn location(&self, key: &str) -> String {
        self.root.join(key).display().to_string()
    }

    /// Maps an io error on `key`: a missing file (or store dir) is NotFound.
    fn io_err(&self, key: &str, what: &str, e: io::Error) -> StoreError {
        match e.kind() {
            io::ErrorKind::NotFound => StoreError::NotFound(self.location(key)),
            io::ErrorKind::PermissionDenied => StoreError::AccessDenied(self.location(key)),
            _ => StoreError::Io {
                context: format!("{what} {}", self.location(key)),
                error: e,
            },
        }
    }
}

/// The emulated ETag: any rewrite (new inode), size change, or touch (new mtime)
/// gives a new one, like S3 where every PUT or self-copy is a new version.
fn version_of(meta: &fs::Metadata) -> ObjectVersion {
    let mtime_ns = (meta.mtime() as i128) * 1_000_000_000 + meta.mtime_nsec() as i128;
    ObjectVersion {
        etag: format!("{:x}-{:x}-{:x}", meta.ino(), meta.size(), mtime_ns),
        version_id: None,
    }
}

fn object_meta(meta: &fs::Metadata) -> ObjectMeta {
    ObjectMeta {
        size: meta.size(),
        version: version_of(meta),
        last_modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
    }
}

/// Runs blocking file-system work off the async executor threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::other("", format!("file-system task failed: {e}")))?
}

/// A name unique among concurrent writers (in this and other processes).
fn temp_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{TEMP_PREFIX}{}-{}-{nanos:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Creates a temp file that must be new: a name planted in a shared store
/// directory (a file or a symlink) fails instead of being written through.
fn create_temp(path: &Path) -> io::Result<File> {
    File::options().write(true).create_new(true).open(path)
}

impl LocalStore {
    /// Removes the temp files in `dir` that have not been modified for
    /// [`STALE_TEMP_AGE`]: writes killed before their rename. Best effort
    /// (a failure is logged; the write goes on).
    ///
    /// Age is the rule, not the writer's pid: a store directory may be shared
    /// by hosts or containers whose pids mean nothing here. It is safe because
    /// a live writer's temp file is always recent: it is created (or linked
    /// and then touched) when the write starts, every write into it moves its
    /// mtime, and no write stalls for an hour between two of them.
    fn sweep_stale_temps(dir: &Path) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        let Some(cutoff) = SystemTime::now().checked_sub(STALE_TEMP_AGE) else {
            return;
        };
        for entry in entries.flatten() {
            if !entry
                .file_name()
                .as_bytes()
                .starts_with(TEMP_PREFIX.as_bytes())
            {
                continue;
            }
            let path = entry.path();
            let stale =
                fs::symlink_metadata(&path).is_ok_and(|md| md.modified().is_ok_and(|m| m < cutoff));
            if !stale {
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => tracing::info!(
                    "removed {}, a write to the store that did not finish (its writer was killed)",
                    path.display()
                ),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!("cannot remove the stale temp file {}: {e}", path.display())
                }
            }
        }
    }

    /// Writes `key` atomically: `fill` writes the content into a new temp file in
    /// the key's directory, which is fsynced and renamed over the key (and the
    /// rename made durable). The temp file is removed on any failure. `what` says
    /// what was being written, for the error.
    fn write_atomically(
        &self,
        key: &str,
        what: impl FnOnce() -> String,
        fill: impl FnOnce(&Path) -> io::Result<File>,
    ) -> StoreResult<ObjectMeta> {
        let path = self.path_of(key)?;
        let dir = path
            .parent()
            .expect("a joined key has a parent")
            .to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| self.io_err(key, "creating the directory of", e))?;
        Self::sweep_stale_temps(&dir);
        let tmp = dir.join(temp_name());
        let result = (|| {
            let out = fill(&tmp)?;
            out.sync_all()?;
            // rename keeps the inode and mtime, so this is the version readers will see.
            let meta = out.metadata()?;
            fs::rename(&tmp, &path)?;
            // Make the rename itself durable.
            File::open(&dir)?.sync_all()?;
            Ok(object_meta(&meta))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(|e: io::Error| StoreError::Io {
            context: format!("{} {}", what(), self.location(key)),
            error: e,
        })
    }

    fn put_blocking(&self, key: &str, source: PutSource) -> StoreResult<ObjectMeta> {
        let what = || match &source {
            PutSource::File(src) => format!("writing {} to", src.display()),
            PutSource::Bytes(_) => "writing".to_string(),
        };
        let meta = self.write_atomically(key, what, |tmp| {
            Ok(match &source {
                PutSource::Bytes(bytes) => {
                    let mut out = create_temp(tmp)?;
                    io::Write::write_all(&mut out, bytes)?;
                    out
                }
                // Same filesystem: take the file over with a hard link instead of
                // copying an archive of gigabytes (the caller is done with it).
                // The link is touched: a sweep must see it as a live write
                // (its mtime was the source's, which may be old).
                PutSource::File(src) => match fs::hard_link(src, tmp) {
                    Ok(()) => {
                        let out = File::options().write(true).open(tmp)?;
                        out.set_modified(SystemTime::now())?;
                        out
                    }
                    Err(_) => {
                        let mut out = create_temp(tmp)?;
                        io::copy(&mut File::open(src)?, &mut out)?;
                        out
                    }
                },
            })
        })?;
        // The whole object counts, even when a hard link wrote none of it: it is
        // what the caller handed to the store.
        self.counters.uploaded(meta.size);
        Ok(meta)
    }

    /// [`ObjectStore::compose`]: the prefix is copied from an fd whose version
    /// was checked (`io::copy` between files is `copy_file_range` on Linux, so
    /// the kernel may share or copy the blocks without a trip through memory),
    /// then the tail is appended, all into a temp file renamed into place.
    fn compose_blocking(&self, key: &str, composition: Composition) -> StoreResult<ObjectMeta> {
        let Composition {
            base_key,
            base_version,
            prefix_len,
            tail,
        } = composition;
        // One fd for the check and the copy, as in get_range: a concurrent
        // replace of the base cannot make us check one version and copy another.
        let base = File::open(self.path_of(&base_key)?)
            .map_err(|e| self.io_err(&base_key, "opening", e))?;
        let base_meta = base
            .metadata()
            .map_err(|e| self.io_err(&base_key, "stat of", e))?;
        if version_of(&base_meta) != base_version {
            return Err(StoreError::PreconditionFailed(self.location(&base_key)));
        }
        if prefix_len > base_meta.size() {
            return Err(StoreError::InvalidRange {
                key: self.location(&base_key),
                range: 0..prefix_len,
                size: base_meta.size(),
            });
        }
        let mut tail_len = 0;
        let what = || {
            format!(
                "composing {prefix_len} bytes of {} and {} into",
                self.location(&base_key),
                tail.display()
            )
        };
        let meta = self.write_atomically(key, what, |tmp| {
            let mut out = create_temp(tmp)?;
            let copied = io::copy(&mut io::Read::take(&base, prefix_len), &mut out)?;
            if copied != prefix_len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the base ended after {copied} of {prefix_len} bytes"),
                ));
            }
            tail_len = io::copy(&mut File::open(&tail)?, &mut out)?;
            Ok(out)
        })?;
        self.counters.copied(prefix_len);
        self.counters.uploaded(tail_len);
        Ok(meta)
    }

    fn get_range_blocking(
        &self,
        key: &str,
        range: Range<u64>,
        pin: Option<ObjectVersion>,
    ) -> StoreResult<Bytes> {
        let path = self.path_of(key)?;
        // Everything below uses this one fd: a concurrent replace cannot make us
        // check one version and read another.
        let file = File::open(&path).map_err(|e| self.io_err(key, "opening", e))?;
        let meta = file
            .metadata()
            .map_err(|e| self.io_err(key, "stat of", e))?;
        if let Some(pin) = pin {
            if version_of(&meta) != pin {
                return Err(StoreError::PreconditionFailed(self.location(key)));
            }
        }
        if range.start > range.end || range.end > meta.size() {
            return Err(StoreError::InvalidRange {
                key: self.location(key),
                range,
                size: meta.size(),
            });
        }
        // A reused buffer, as the S3 store's bodies: a mount reads range
        // after range, and fresh memory is faulted in and zeroed first.
        let len = (range.end - range.start) as usize;
        let mut buf = buffers::get_body(len);
        buf.resize(len, 0);
        file.read_exact_at(&mut buf, range.start)
            .map_err(|e| self.io_err(key, "reading", e))?;
        self.counters.downloaded(buf.len() as u64);
        Ok(buffers::get_body_bytes(buf))
    }

    fn refresh_blocking(&self, key: &str, older_than: SystemTime) -> StoreResult<RefreshOutcome> {
        let path = self.path_of(key)?;
        let meta = fs::metadata(&path).map_err(|e| self.io_err(key, "stat of", e))?;
        let modified = meta
            .modified()
            .map_err(|e| self.io_err(key, "mtime of", e))?;
        if modified > older_than {
            return Ok(RefreshOutcome::StillFresh);
        }
        // A new mtime is a new emulated ETag, as AWS's self-copy gives a new ETag.
        filetime::set_file_mtime(&path, filetime::FileTime::now())
            .map_err(|e| self.io_err(key, "touching", e))?;
        Ok(RefreshOutcome::Refreshed)
    }

    fn list_blocking(&self, prefix: &str) -> StoreResult<Vec<ListedObject>> {
        // Walk only the deepest directory the prefix names; the rest is a name filter.
        let dir_part = prefix.rsplit_once('/').map_or("", |(dir, _)| dir);
        let start = if dir_part.is_empty() {
            self.root.clone()
        } else {
            self.path_of(dir_part)?
        };
        let mut out = Vec::new();
        let mut stack = vec![(start, dir_part.to_string())];
        while let Some((dir, key_dir)) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e)
                    if e.kind() == io::ErrorKind::NotFound
                        || e.kind() == io::ErrorKind::NotADirectory =>
                {
                    continue
                }
                Err(e) => return Err(self.io_err(&key_dir, "listing", e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| self.io_err(&key_dir, "listing", e))?;
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if name.starts_with(TEMP_PREFIX) {
                    continue;
                }
                let key = if key_dir.is_empty() {
                    name
                } else {
                    format!("{key_dir}/{name}")
                };
                let file_type = entry
                    .file_type()
                    .map_err(|e| self.io_err(&key, "listing", e))?;
                if file_type.is_dir() {
                    // Descend only where keys under this directory can match.
                    if prefix.starts_with(&format!("{key}/")) || key.starts_with(prefix) {
                        stack.push((entry.path(), key));
                    }
                } else if file_type.is_file() && key.starts_with(prefix) {
                    let meta = match entry.metadata() {
                        Ok(meta) => meta,
                        // Deleted between readdir and stat: not there any more.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(self.io_err(&key, "stat of", e)),
                    };
                    out.push(ListedObject {
                        key,
                        size: meta.size(),
                        last_modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    });
                }
            }
        }
        // S3 lists in key order; callers may rely on a stable order.
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

impl ObjectStore for LocalStore {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    /// Every `/`-separated part of `key` is one file name, and the temp file
    /// written beside the last one must fit in a path too.
    fn check_name(&self, key: &str) -> Result<(), NameTooLong> {
        if let Some(len) = key.split('/').map(str::len).find(|&l| l > NAME_MAX) {
            return Err(NameTooLong {
                limit: "a local file name's limit",
                len,
                max: NAME_MAX,
            });
        }
        let last = key.rsplit('/').next().map_or(0, str::len);
        let path = self.root.join(key).as_os_str().len();
        let len = path - last + last.max(TEMP_NAME_MAX);
        if len > PATH_MAX {
            return Err(NameTooLong {
                limit: "a local path's limit",
                len,
                max: PATH_MAX,
            });
        }
        Ok(())
    }

    fn open_local(&self, key: &str) -> Option<StoreResult<(File, ObjectMeta)>> {
        let opened = self.path_of(key).and_then(|path| {
            let file = File::open(&path).map_err(|e| self.io_err(key, "opening", e))?;
            let meta = file
                .metadata()
                .map_err(|e| self.io_err(key, "stat of", e))?;
            Ok((file, object_meta(&meta)))
        });
        Some(opened)
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        let (this, key) = (self.clone(), key.to_string());
        blocking(move || {
            let meta =
                fs::metadata(this.path_of(&key)?).map_err(|e| this.io_err(&key, "stat of", e))?;
            if !meta.is_file() {
                return Err(StoreError::NotFound(this.location(&key)));
            }
            Ok(object_meta(&meta))
        })
        .await
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        pin: Option<&ObjectVersion>,
    ) -> StoreResult<Bytes> {
        let (this, key, pin) = (self.clone(), key.to_string(), pin.cloned());
        blocking(move || this.get_range_blocking(&key, range, pin)).await
    }

    async fn put(&self, key: &str, source: PutSource) -> StoreResult<ObjectMeta> {
        let (this, key) = (self.clone(), key.to_string());
        blocking(move || this.put_blocking(&key, source)).await
    }

    async fn refresh(&self, key: &str, older_than: SystemTime) -> StoreResult<RefreshOutcome> {
        let (this, key) = (self.clone(), key.to_string());
        blocking(move || this.refresh_blocking(&key, older_than)).await
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<ListedObject>> {
        let (this, prefix) = (self.clone(), prefix.to_string());
        blocking(move || this.list_blocking(&prefix)).await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let (this, key) = (self.clone(), key.to_string());
        blocking(move || match fs::remove_file(this.path_of(&key)?) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other.map_err(|e| this.io_err(&key, "deleting", e)),
        })
        .await
    }

    async fn compose(&self, key: &str, composition: Composition) -> StoreResult<ObjectMeta> {
        let (this, key) = (self.clone(), key.to_string());
        blocking(move || this.compose_blocking(&key, composition)).await
    }

    fn transfer_counts(&self) -> TransferCounts {
        self.counters.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn store() -> (tempfile::TempDir, LocalStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("store"));
        (dir, store)
    }

    #[tokio::test]
    async fn missing_root_reads_as_not_found_and_lists_empty() {
        let (_dir, store) = store();
        assert!(matches!(
            store.head("a").await,
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            store.get_range("a", 0..1, None).await,
            Err(StoreError::NotFound(_))
        ));
        assert!(store.list("").await.unwrap().is_empty());
        store.delete("a").await.unwrap();
    }

    #[tokio::test]
    async fn rejects_keys_escaping_the_root() {
        let (_dir, store) = store();
        for key in [
            "../x",
            "/abs",
            "a//b",
            "a/./b",
            "",
            "dir/",
            ".cachemount-tmp-1",
        ] {
            let put = store
                .put(key, PutSource::Bytes(Bytes::from_static(b"x")))
                .await;
            assert!(
                matches!(put, Err(StoreError::Other { .. })),
                "{key:?}: {put:?}"
            );
        }
    }

    #[tokio::test]
    async fn put_leaves_no_temp_files_and_replace_changes_the_etag() {
        let (_dir, store) = store();
        let first = store
            .put("k/a", PutSource::Bytes(Bytes::from_static(b"one")))
            .await
            .unwrap();
        assert_eq!(store.head("k/a").await.unwrap(), first);
        let second = store
            .put("k/a", PutSource::Bytes(Bytes::from_static(b"two")))
            .await
            .unwrap();
        assert_ne!(
            first.version, second.version,
            "same size, new inode: new ETag"
        );
        let names: Vec<_> = fs::read_dir(store.root().join("k"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["a"]);
    }

    #[tokio::test]
    async fn pinned_read_uses_the_opened_version() {
        let (_dir, store) = store();
        let meta = store
            .put("a", PutSource::Bytes(Bytes::from_static(b"hello world")))
            .await
            .unwrap();
        assert_eq!(
            store
                .get_range("a", 6..11, Some(&meta.version))
                .await
                .unwrap(),
            &b"world"[..]
        );
        assert_eq!(
            store
                .get_range("a", 3..3, Some(&meta.version))
                .await
                .unwrap(),
            &b""[..]
        );
        assert!(matches!(
            store.get_range("a", 6..12, None).await,
            Err(StoreError::InvalidRange { size: 11, .. })
        ));
        // A touch alone (same content, same inode) is a new version, as a self-copy is on S3.
        let past =
            filetime::FileTime::from_system_time(SystemTime::now() - Duration::from_secs(60));
        filetime::set_file_mtime(store.root().join("a"), past).unwrap();
        let pinned = store.get_range("a", 0..1, Some(&meta.version)).await;
        assert!(
            matches!(pinned, Err(StoreError::PreconditionFailed(_))),
            "{pinned:?}"
        );
    }

    #[tokio::test]
    async fn put_from_file_copies_it() {
        let (dir, store) = store();
        let src = dir.path().join("src.bin");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&src, &data).unwrap();
        let meta = store.put("blobs/x", PutSource::File(src)).await.unwrap();
        assert_eq!(meta.size, data.len() as u64);
        let all = store
            .get_range("blobs/x", 0..meta.size, Some(&meta.version))
            .await
            .unwrap();
        assert_eq!(&all[..], &data[..]);
    }

    #[tokio::test]
    async fn list_walks_subdirectories_and_filters_by_name_prefix() {
        let (_dir, store) = store();
        for key in [
            "keys/node-1",
            "keys/node-2",
            "keys/nodejs",
            "keys/py-1",
            "keys/sub/deep",
            "blobs/sha256/ab",
        ] {
            store
                .put(key, PutSource::Bytes(Bytes::from_static(b"{}")))
                .await
                .unwrap();
        }
        let keys = |v: Vec<ListedObject>| v.into_iter().map(|o| o.key).collect::<Vec<_>>();
        assert_eq!(
            keys(store.list("keys/node-").await.unwrap()),
            ["keys/node-1", "keys/node-2"]
        );
        assert_eq!(keys(store.list("keys/s").await.unwrap()), ["keys/sub/deep"]);
        assert_eq!(store.list("").await.unwrap().len(), 6);
        assert!(store.list("nothing/here").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_write_sweeps_stale_temp_files_of_its_directory() {
        let (_dir, store) = store();
        store
            .put("k/a", PutSource::Bytes(Bytes::from_static(b"one")))
            .await
            .unwrap();
        let dir = store.root().join("k");
        let old = filetime::FileTime::from_system_time(
            SystemTime::now() - STALE_TEMP_AGE - Duration::from_secs(60),
        );
        for name in [".cachemount-tmp-1-0-0", ".cachemount-tmp-live"] {
            fs::write(dir.join(name), b"partial").unwrap();
        }
        filetime::set_file_mtime(dir.join(".cachemount-tmp-1-0-0"), old).unwrap();
        store
            .put("k/b", PutSource::Bytes(Bytes::from_static(b"two")))
            .await
            .unwrap();
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [".cachemount-tmp-live", "a", "b"]);
    }

    #[tokio::test]
    async fn a_linked_temp_file_is_not_stale_and_a_planted_name_is_not_written_through() {
        let (dir, store) = store();
        let src = dir.path().join("old-archive");
        fs::write(&src, b"archive").unwrap();
        let old = filetime::FileTime::from_system_time(SystemTime::now() - 2 * STALE_TEMP_AGE);
        filetime::set_file_mtime(&src, old).unwrap();
        store.put("blobs/x", PutSource::File(src)).await.unwrap();
        let md = fs::metadata(store.root().join("blobs/x")).unwrap();
        assert!(md.modified().unwrap() > SystemTime::now() - Duration::from_secs(60));
        assert!(create_temp(&store.root().join("blobs/x")).is_err());
    }

    #[test]
    fn names_are_checked_against_local_limits() {
        let store = LocalStore::new("/store");
        store
            .check_name(&format!("keys/{}", "k".repeat(255)))
            .unwrap();
        let long_name = store.check_name(&format!("keys/{}", "k".repeat(256)));
        assert_eq!(
            long_name.unwrap_err().to_string(),
            "256 bytes long, over a local file name's limit of 255 bytes"
        );
        let deep = LocalStore::new(format!("/{}", "d/".repeat(2100)));
        let err = deep.check_name("keys/k").unwrap_err();
        assert!(
            err.len > PATH_MAX && err.limit == "a local path's limit",
            "{err}"
        );
    }
}
