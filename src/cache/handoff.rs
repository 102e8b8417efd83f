//! Blocks handed on to the kernel's page cache. Replay can push what it
//! fetched into the kernel ([`crate::mount::warm`]), so the build reads those
//! files with no FUSE round trip at all; the fetcher's part is to give out
//! the bytes without counting that as a read, and to count the build's read
//! when it happens, at the file's open (its reads never reach the mount).

use std::sync::Arc;

use bytes::Bytes;

use super::fetch::Fetcher;
use super::plan::{Layout, Piece, Span};
use super::stats::Stats;
use super::version::Version;
use crate::store::ObjectStore;

impl<S: ObjectStore> Fetcher<S> {
    /// Bytes `offset..offset+len` of `entry` if the disk cache or the block
    /// cache hold them, without marking anything read, counting a hit or
    /// starting read-ahead; `None` when they are not all there (nothing is
    /// fetched) or must not be served.
    pub fn peek_cached(
        &self,
        v: &Arc<Version>,
        entry: u32,
        offset: u64,
        len: u32,
    ) -> Option<Bytes> {
        let e = v.entry(entry);
        let layout = Layout::of(e, &self.config);
        let span = Span::of(e, layout, offset, len)?;
        if let Some(data) = self
            .disk
            .as_ref()
            .and_then(|d| d.read(v, entry, offset, len))
        {
            return Some(data);
        }
        let blocks = self
            .cached_blocks(v, entry, layout, &span, |key| self.cache.peek(key))?
            .ok()?;
        span.assemble(v, entry, blocks).ok()
    }

    /// The build opened a file whose bytes `offset..offset+len` were handed
    /// to the kernel: its reads are served there, so its blocks count as read
    /// now (a hit each, and the prefetch's hit on a block's first read).
    pub fn count_kernel_read(&self, v: &Version, entry: u32, offset: u64, len: u32) {
        let e = v.entry(entry);
        let layout = Layout::of(e, &self.config);
        let Some(span) = Span::of(e, layout, offset, len) else {
            return;
        };
        for block in span.blocks() {
            if let Some(hit) = self.cache.get(&Piece { entry, block }.key(v.id)) {
                Stats::inc(&self.stats.hits);
                self.stats.prefetch_hit(hit.origin);
            }
        }
    }
}
