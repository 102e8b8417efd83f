//! The block plan of an entry: how its content is cut into blocks
//! ([`Layout`]), which blocks a byte range covers ([`Span`], the one place
//! that arithmetic lives), the unit fetched and decoded together ([`Piece`])
//! and where its bytes are in the archive. Pure functions of the index and
//! the [`FetchConfig`]: no I/O, no state.

use std::ops::{Range, RangeInclusive};

use bytes::Bytes;

use super::blocks::BlockKey;
use super::config::FetchConfig;
use super::error::FetchError;
use super::version::Version;
use crate::archive::zip::LOCAL_HEADER_LEN;
use crate::archive::{Compression, DataOffset, Entry, EntryKind};
use crate::buffers;

/// Block size of entries that are not split into frames (stored, deflate,
/// single-stream zstd): the unit of caching and of random access.
pub const BLOCK_SIZE: u64 = 1 << 20;
/// Extra bytes fetched after a foreign entry's local header, when its data
/// offset is not known yet, to cover the header's name and extra fields.
const LOCAL_HEADER_SLACK: u64 = 1024;

/// How an entry's content is cut into blocks and fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One block per zstd frame, fetched and verified independently.
    Frames,
    /// Raw bytes: blocks are ranges of the data.
    Stored,
    /// One compressed stream small enough to fetch and decode in one go.
    Whole,
    /// One large compressed stream, decoded sequentially.
    Stream,
}

impl Layout {
    pub fn of(e: &Entry, config: &FetchConfig) -> Layout {
        if !e.frames.is_empty() {
            return Layout::Frames;
        }
        match e.compression {
            Compression::Stored => Layout::Stored,
            _ if e.size <= config.whole_max && e.compressed_size <= config.whole_max => {
                Layout::Whole
            }
            _ => Layout::Stream,
        }
    }

    /// An entry with one checksum (the CRC-32 of its content) over more than
    /// one block: served only after a verify pass.
    pub fn needs_pass(self, e: &Entry) -> bool {
        match self {
            Layout::Stream => true,
            Layout::Stored => e.size > BLOCK_SIZE,
            Layout::Frames | Layout::Whole => false,
        }
    }

    pub fn block_size(self, e: &Entry) -> u64 {
        match self {
            Layout::Frames if e.frame_size > 0 => u64::from(e.frame_size),
            Layout::Frames => e.size.max(1),
            _ => BLOCK_SIZE,
        }
    }

    pub fn block_count(self, e: &Entry) -> u32 {
        match self {
            Layout::Frames => e.frames.len() as u32,
            _ => e.size.div_ceil(BLOCK_SIZE) as u32,
        }
    }
}

/// Small enough that fetching its neighbours along with it pays.
pub fn is_small(e: &Entry, config: &FetchConfig) -> bool {
    e.kind == EntryKind::File
        && e.size > 0
        && e.compressed_size <= config.small_file
        && match Layout::of(e, config) {
            Layout::Frames => e.frames.len() == 1,
            Layout::Stored => e.size <= BLOCK_SIZE,
            Layout::Whole => true,
            Layout::Stream => false,
        }
}

/// The unit fetched and decoded together: a frame, a stored block, or a whole entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub entry: u32,
    /// 0 for a whole entry.
    pub block: u32,
}

impl Piece {
    /// The cache key of the piece (of its first block, for a whole entry).
    pub fn key(self, version: u64) -> BlockKey {
        BlockKey {
            version,
            entry: self.entry,
            block: self.block,
        }
    }

    /// Compressed bytes of the piece (what fetching it costs).
    pub fn range_len(self, v: &Version, config: &FetchConfig) -> u64 {
        let e = v.entry(self.entry);
        match Layout::of(e, config) {
            Layout::Frames => u64::from(e.frames[self.block as usize].compressed_len),
            Layout::Stored => BLOCK_SIZE.min(e.size - u64::from(self.block) * BLOCK_SIZE),
            _ => e.compressed_size,
        }
    }

    /// Where the piece's bytes are: exact when the entry's data offset is
    /// known, else from its local header with slack for the header (`true`).
    pub fn range(self, v: &Version, config: &FetchConfig) -> (Range<u64>, bool) {
        let e = v.entry(self.entry);
        let rel = match Layout::of(e, config) {
            Layout::Frames => {
                let (start, _) = e.frame_span(self.block as usize);
                start..start + u64::from(e.frames[self.block as usize].compressed_len)
            }
            Layout::Stored => {
                let start = u64::from(self.block) * BLOCK_SIZE;
                start..(start + BLOCK_SIZE).min(e.size)
            }
            Layout::Whole | Layout::Stream => 0..e.compressed_size,
        };
        match (v.known_offset(self.entry), e.offset) {
            (Some(off), _) => (off + rel.start..off + rel.end, false),
            (None, DataOffset::LocalHeader(lh)) | (None, DataOffset::Data(lh)) => {
                let end = (lh
                    + LOCAL_HEADER_LEN as u64
                    + e.name.len() as u64
                    + 1
                    + LOCAL_HEADER_SLACK
                    + rel.end)
                    .min(v.size);
                (lh..end, true)
            }
        }
    }
}

/// What a read of an entry covers: the bytes `offset..end` (clamped to the
/// entry's size), in blocks `first..=last` of `block_size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub offset: u64,
    pub end: u64,
    pub block_size: u64,
    pub first: u32,
    pub last: u32,
}

impl Span {
    /// The span of a read of `len` bytes at `offset`; `None` when it reads
    /// nothing (no bytes asked for, or at or past the end).
    pub fn of(e: &Entry, layout: Layout, offset: u64, len: u32) -> Option<Span> {
        if offset >= e.size || len == 0 {
            return None;
        }
        let end = (offset + u64::from(len)).min(e.size);
        let block_size = layout.block_size(e);
        Some(Span {
            offset,
            end,
            block_size,
            first: (offset / block_size) as u32,
            last: ((end - 1) / block_size) as u32,
        })
    }

    pub fn blocks(&self) -> RangeInclusive<u32> {
        self.first..=self.last
    }

    pub fn block_count(&self) -> usize {
        (self.last - self.first + 1) as usize
    }

    /// The span's bytes from its blocks (`blocks[i]` is block `first + i`);
    /// a block missing or shorter than the index says is corruption.
    pub fn assemble(
        &self,
        v: &Version,
        entry: u32,
        blocks: Vec<Option<Bytes>>,
    ) -> Result<Bytes, FetchError> {
        let (offset, end) = (self.offset, self.end);
        let len = (end - offset) as usize;
        let mut parts = Vec::with_capacity(blocks.len());
        for (i, block) in blocks.into_iter().enumerate() {
            let block = block.ok_or_else(|| {
                FetchError::Corrupt(format!(
                    "{}: block {} is missing after its fetch",
                    v.name(entry),
                    self.first as usize + i
                ))
            })?;
            let block_start = (self.first as u64 + i as u64) * self.block_size;
            let from = offset.saturating_sub(block_start) as usize;
            let to = ((end - block_start) as usize).min(block.len());
            if from > to {
                return Err(FetchError::Corrupt(format!(
                    "{}: block {} is shorter than the index says",
                    v.name(entry),
                    self.first as usize + i
                )));
            }
            parts.push(block.slice(from..to));
        }
        if parts.iter().map(Bytes::len).sum::<usize>() != len {
            return Err(FetchError::Corrupt(format!(
                "{}: blocks are shorter than the index says",
                v.name(entry)
            )));
        }
        if let [one] = &parts[..] {
            return Ok(one.clone());
        }
        // A read across blocks (the kernel's reads need not start where a
        // block does) is copied into a reused buffer: a fresh one was faulted
        // in and zeroed by the kernel first, a tenth of the daemon's CPU on
        // a sequential `cat`.
        let copied = buffers::filled(len, |out| {
            let mut at = 0;
            for part in &parts {
                out[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
            Ok::<(), std::convert::Infallible>(())
        });
        Ok(copied.unwrap_or_else(|never| match never {}))
    }
}

#[cfg(test)]
mod tests {
    //! The block-range arithmetic over a real archive saved into the local
    //! store: each span is checked against the bytes the fetcher returns for
    //! it, which must be the file's.

    use std::sync::Arc;

    use super::*;
    use crate::cache::version::{open_version, Refresh};
    use crate::cache::{Fetcher, Stats};
    use crate::paths::{Anchors, PathSpec};
    use crate::progress::Progress;
    use crate::store::layout;
    use crate::store::local::LocalStore;

    const MIB: u64 = 1 << 20;

    struct Saved {
        _dir: tempfile::TempDir,
        version: Arc<Version>,
        fetcher: Arc<Fetcher<LocalStore>>,
        multi: Vec<u8>,
        stored: Vec<u8>,
    }

    /// `multi.bin` (3.5 MiB of text: four zstd frames) and `stored.bin`
    /// (5000 random bytes: stored, zstd would not shrink them).
    async fn saved() -> Saved {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        let src = work.join("cache");
        std::fs::create_dir_all(&src).unwrap();
        let multi: Vec<u8> = (0..3 * MIB + MIB / 2)
            .map(|i| b"block plan "[(i % 11) as usize] ^ ((i / 4093) as u8 & 7))
            .collect();
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let stored: Vec<u8> = (0..5000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(src.join("multi.bin"), &multi).unwrap();
        std::fs::write(src.join("stored.bin"), &stored).unwrap();
        let anchors = Anchors {
            cwd: work,
            home: dir.path().join("home"),
        };
        let store = LocalStore::new(dir.path().join("store"));
        let spec = PathSpec::parse("cache", &anchors).unwrap();
        crate::save::save(
            &store,
            "k",
            &[spec],
            &anchors,
            Default::default(),
            Progress::new("", true),
        )
        .await
        .unwrap();
        let blob = layout::resolve(&store, "k", &[])
            .await
            .unwrap()
            .pointer
            .blob_key();
        let stats = Arc::new(Stats::default());
        let version = open_version(&store, &blob, None, None, Refresh::Never, Some(&stats))
            .await
            .unwrap();
        let fetcher = Fetcher::new(Arc::new(store), 64 << 20, stats, FetchConfig::default());
        Saved {
            _dir: dir,
            version: Arc::new(version),
            fetcher,
            multi,
            stored,
        }
    }

    impl Saved {
        fn entry(&self, file: &str) -> u32 {
            let i = self
                .version
                .index
                .entries
                .iter()
                .position(|e| e.name.ends_with(file.as_bytes()));
            i.expect("saved entry") as u32
        }

        /// The span of the read, after checking that the fetcher's bytes for
        /// it are `want`'s.
        async fn span(&self, file: &str, want: &[u8], offset: u64, len: u32) -> Option<Span> {
            let entry = self.entry(file);
            let e = self.version.entry(entry);
            let span = Span::of(e, Layout::of(e, &FetchConfig::default()), offset, len);
            let got = self
                .fetcher
                .read(&self.version, entry, offset, len)
                .await
                .unwrap();
            let from = (offset as usize).min(want.len());
            let to = (offset + u64::from(len)).min(want.len() as u64) as usize;
            assert_eq!(
                &got[..],
                &want[from..to.max(from)],
                "{file} at {offset}+{len}"
            );
            span
        }
    }

    fn span(offset: u64, end: u64, block_size: u64, first: u32, last: u32) -> Option<Span> {
        Some(Span {
            offset,
            end,
            block_size,
            first,
            last,
        })
    }

    #[tokio::test]
    async fn a_multi_frame_file_is_cut_into_its_frames() {
        let s = saved().await;
        let e = s.version.entry(s.entry("multi.bin"));
        assert_eq!(Layout::of(e, &FetchConfig::default()), Layout::Frames);
        assert_eq!(Layout::Frames.block_size(e), MIB);
        assert_eq!(Layout::Frames.block_count(e), 4);
        let size = s.multi.len() as u64;
        // Inside one block.
        assert_eq!(
            s.span("multi.bin", &s.multi, 10, 100).await,
            span(10, 110, MIB, 0, 0)
        );
        assert_eq!(
            s.span("multi.bin", &s.multi, MIB, MIB as u32).await,
            span(MIB, 2 * MIB, MIB, 1, 1)
        );
        // Across blocks.
        assert_eq!(
            s.span("multi.bin", &s.multi, MIB - 10, 20).await,
            span(MIB - 10, MIB + 10, MIB, 0, 1)
        );
        assert_eq!(
            s.span("multi.bin", &s.multi, MIB - 10, 2 * MIB as u32 + 20)
                .await,
            span(MIB - 10, 3 * MIB + 10, MIB, 0, 3)
        );
        // At the entry's end: clamped to its size, in its short last frame.
        assert_eq!(
            s.span("multi.bin", &s.multi, size - 5, 100).await,
            span(size - 5, size, MIB, 3, 3)
        );
        assert_eq!(
            s.span("multi.bin", &s.multi, 0, u32::MAX).await,
            span(0, size, MIB, 0, 3)
        );
    }

    #[tokio::test]
    async fn a_stored_entry_is_cut_into_fixed_blocks() {
        let s = saved().await;
        let e = s.version.entry(s.entry("stored.bin"));
        assert_eq!(Layout::of(e, &FetchConfig::default()), Layout::Stored);
        assert_eq!(Layout::Stored.block_size(e), BLOCK_SIZE);
        assert_eq!(
            s.span("stored.bin", &s.stored, 100, 200).await,
            span(100, 300, BLOCK_SIZE, 0, 0)
        );
        assert_eq!(
            s.span("stored.bin", &s.stored, 4990, 100).await,
            span(4990, 5000, BLOCK_SIZE, 0, 0)
        );
    }

    #[tokio::test]
    async fn an_empty_read_or_one_past_the_end_covers_no_block() {
        let s = saved().await;
        let size = s.multi.len() as u64;
        assert_eq!(s.span("multi.bin", &s.multi, 10, 0).await, None);
        assert_eq!(s.span("multi.bin", &s.multi, size, 10).await, None);
        assert_eq!(s.span("multi.bin", &s.multi, size + MIB, 10).await, None);
        assert_eq!(s.span("stored.bin", &s.stored, 5000, 1).await, None);
    }
}
